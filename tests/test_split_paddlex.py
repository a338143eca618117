"""split-dataset --format paddlex / paddlex-rec: PaddleX 3 lists written, then read back (round trip)."""

from __future__ import annotations

import json

from shitu_cli.data.lists import read_labelled_list
from synth import make_class_tree


def test_paddlex_cls_lists_round_trip(cli, tmp_path):
    data = tmp_path / "flowers"
    for name in make_class_tree(data, n_classes=3, per_class=5, size=32, seed=1):
        (data / name).rename(data / name.replace(" ", "_"))  # PaddleX's usual space-free paths: `path id` lines
    result = cli("split-dataset", data, "--format", "paddlex", "--val", "0.4", "--test", "0", "--json")
    assert result.exit_code == 0, result.stderr
    label_txt = (data / "label.txt").read_text(encoding="utf-8").splitlines()
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    assert label_txt == [f"{i} {name}" for i, name in enumerate(classes)]
    assert (data / "train.txt").is_file() and (data / "val.txt").is_file() and not (data / "test.txt").exists()
    line = (data / "train.txt").read_text(encoding="utf-8").splitlines()[0]
    path, class_id = line.rsplit(" ", 1)
    assert (data / path).is_file() and classes[int(class_id)] == path.split("/")[0]
    for recipe_kept in (True, False):
        if not recipe_kept:
            (data / "recipe.yaml").unlink()  # a PaddleX dataset made elsewhere: ids named by label.txt alone
        listed = read_labelled_list(data / "train.txt") + read_labelled_list(data / "val.txt")
        assert len(listed) == 15
        assert all(item.label == item.path.parent.name and item.path.is_file() for item in listed)


def test_paddlex_rec_lists_round_trip_through_build_index(cli, tmp_path):
    from tiny_rec import export_tiny_rec

    data = tmp_path / "products"
    make_class_tree(data, n_classes=4, per_class=4, size=32, seed=2)
    result = cli("split-dataset", data, "--format", "paddlex-rec", "--val", "0.5", "--test", "0")
    assert result.exit_code == 0, result.stderr
    # these class names hold spaces, so a TAB separates path and id (as the imagenet lists do)
    assert "list lines: `path<TAB>class_id` (class names in label.txt)" in result.stdout
    assert {p.name for p in data.glob("*.txt")} == {"train.txt", "gallery.txt", "query.txt", "label.txt"}
    gallery = read_labelled_list(data / "gallery.txt")
    assert gallery and all(item.label == item.path.parent.name for item in gallery)
    rec = export_tiny_rec(tmp_path / "rec", embedding_dim=16, input_size=32)
    built = cli("build-index", data / "gallery.txt", "-o", tmp_path / "index", "--rec", rec, "--json")
    assert built.exit_code == 0, built.stderr
    assert json.loads(built.stdout)["count"] == len(gallery)
    labels = {item["label"] for item in json.loads((tmp_path / "index" / "gen-000001" / "id_map.json").read_text(encoding="utf-8")).values()}
    assert labels == {item.label for item in gallery}
