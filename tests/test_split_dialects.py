"""The list dialects split-dataset writes: PaddleClas can parse every line, and shitu reads lists written with --out."""

from __future__ import annotations

from pathlib import Path

from conftest import write_image
from shitu_cli.data.lists import read_labelled_list, read_labels


def make_tree(root: Path, names: list[str], per_class: int = 6) -> Path:
    for c, name in enumerate(names):
        for i in range(per_class):
            write_image(root / name / f"{i}.jpg", seed=10 * c + i, size=(12, 12))
    return root


def paddleclas_rows(list_file: Path, delimiter: str) -> list[tuple[str, int]]:
    """What PaddleClas's ImageNetDataset does with each line: strip, split at the delimiter, int() the second field."""
    rows = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        fields = line.strip().split(delimiter)
        assert len(fields) == 2, f"PaddleClas would misread {line!r}"
        rows.append((fields[0], int(fields[1])))
    return rows


def test_a_class_named_coffee_cup_gets_tab_lists_paddleclas_parses_and_says_so(cli, tmp_path):
    root = make_tree(tmp_path / "data", ["coffee cup", "cola"])

    result = cli("split-dataset", root, "--val", "0.2", "--test", "0.1")

    assert result.exit_code == 0, result.stderr
    assert "list lines: `path<TAB>class_id`" in result.stdout
    assert 'delimiter: "\\t"' in result.stderr
    labels = read_labels(root / "labels.txt")
    for part in ("train", "val", "test"):
        for rel, class_id in paddleclas_rows(root / f"{part}_list.txt", "\t"):
            assert rel.split("/")[0] == labels[class_id]
            assert (root / rel).is_file()


def test_plain_names_keep_paddleclas_default_space_lists(cli, tmp_path):
    root = make_tree(tmp_path / "data", ["cola", "tea"])

    result = cli("split-dataset", root)

    assert result.exit_code == 0, result.stderr
    assert "list lines: `path class_id`" in result.stdout
    assert len(paddleclas_rows(root / "train_list.txt", " ")) > 0


def test_lists_written_elsewhere_resolve_against_the_dataset(cli, tmp_path):
    root = make_tree(tmp_path / "data", ["coffee cup", "cola"])
    out = tmp_path / "lists"

    assert cli("split-dataset", root, "--out", out).exit_code == 0
    assert cli("split-dataset", root, "--out", tmp_path / "rec", "--format", "rec", "--val", "0.5").exit_code == 0

    entries = read_labelled_list(out / "train_list.txt") + read_labelled_list(tmp_path / "rec" / "gallery_list.txt")
    assert entries and all(e.path.is_file() for e in entries)
    assert {e.label for e in entries} <= {"coffee cup", "cola"}
    assert all(e.path.parent.name == e.label for e in entries)


def test_split_dataset_without_a_folder_splits_the_current_one(cli, tmp_path, monkeypatch):
    root = make_tree(tmp_path / "products", ["cola", "tea"])
    monkeypatch.chdir(root)

    result = cli("split-dataset", "--val", "0.2", "--test", "0.1")

    assert result.exit_code == 0, result.stderr
    assert read_labels(root / "labels.txt") == ["cola", "tea"]
    assert len(read_labelled_list(root / "train_list.txt")) == 9  # 12 images: 2 val, 1 test
