"""`shitu split-dataset` end to end on small generated trees, some files deliberately broken, in all formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_image
from shitu_cli.data.lists import read_image_list, read_labels, read_pair_list, read_rec_list


def make_class_tree(root: Path, sizes: dict[str, int]) -> Path:
    for c, (name, n) in enumerate(sizes.items()):
        for i in range(n):
            write_image(root / name / f"{i:02d}.jpg", seed=100 * c + i, size=(16, 16))
    return root


def break_some_files(root: Path, class_name: str) -> set[str]:
    """A truncated JPEG, a text file named .jpg and a README: what real folders hold. Returns their paths."""
    good = write_image(root / class_name / "cut.jpg", seed=999, size=(32, 32))
    good.write_bytes(good.read_bytes()[:200])
    (root / class_name / "notes.jpg").write_text("not a picture", encoding="utf-8")
    (root / class_name / "README.txt").write_text("about this class", encoding="utf-8")
    return {f"{class_name}/cut.jpg", f"{class_name}/notes.jpg", f"{class_name}/README.txt"}


def list_paths(*lists: Path) -> list[str]:
    return [rel for path in lists for rel, _ in read_image_list(path)]


def run_json(cli, *args):
    result = cli("split-dataset", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout), result


# --- imagenet


def test_imagenet_split_is_stratified_and_skips_broken_files(cli, tmp_path):
    root = make_class_tree(tmp_path / "data", {"apple": 10, "草莓": 10, "café au lait": 10})
    broken = break_some_files(root, "apple")

    result = cli("split-dataset", root, "--val", "0.2", "--test", "0.1")

    assert result.exit_code == 0, result.stderr
    assert "detected format: imagenet" in result.stderr
    lists = [root / f"{part}_list.txt" for part in ("train", "val", "test")]
    paths = [list_paths(p) for p in lists]
    assert sorted(sum(paths, [])) == sorted(f"{c}/{i:02d}.jpg" for c in ("apple", "草莓", "café au lait") for i in range(10))
    assert [len(p) for p in paths] == [21, 6, 3]
    assert read_labels(root / "labels.txt") == ["apple", "café au lait", "草莓"]
    assert ("草莓/00.jpg", 2) in read_image_list(lists[0]) + read_image_list(lists[1]) + read_image_list(lists[2])
    for name in broken:
        assert name in result.stdout  # the skipped table names every broken file
    assert "train" in result.stdout and "per class" in result.stdout


def test_imagenet_json_reports_counts_classes_and_skips(cli, tmp_path):
    root = make_class_tree(tmp_path / "data", {"a": 10, "b": 20})
    broken = break_some_files(root, "b")

    report, result = run_json(cli, root, "--out", tmp_path / "out", "--seed", "7")

    assert report["format"] == "imagenet" and report["seed"] == 7
    assert report["counts"] == {"train": 21, "val": 6, "test": 3}
    assert report["per_class"]["a"] == {"train": 7, "val": 2, "test": 1}
    assert {s["path"] for s in report["skipped"]} == broken
    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    assert "truncated" in reasons["b/cut.jpg"] and "not an image" in reasons["b/notes.jpg"]
    assert report["dataset_dir"] == root.resolve().as_posix()
    assert sorted(Path(f).name for f in report["files"]) == ["labels.txt", "test_list.txt", "train_list.txt", "val_list.txt"]
    assert not (root / "train_list.txt").exists()  # --out was honoured


def test_lists_stay_relative_to_the_dataset_and_use_forward_slashes(cli, tmp_path):
    root = tmp_path / "data"
    for i in range(6):
        write_image(root / "shoes" / "left side" / f"{i}.jpg", seed=i, size=(8, 8))
        write_image(root / "hats" / f"{i}.png", seed=i, size=(8, 8))

    report, _ = run_json(cli, root, "--out", tmp_path / "elsewhere")

    text = "".join((tmp_path / "elsewhere" / f"{p}_list.txt").read_text(encoding="utf-8") for p in ("train", "val", "test"))
    assert "shoes/left side/0.jpg\t1\n" in text  # a path with a space: TAB-separated, as PaddleClas can be told to read
    assert "\\" not in text and str(tmp_path) not in text


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(cli, tmp_path):
    root = make_class_tree(tmp_path / "data", {"a": 12, "b": 9})
    for out, seed in (("one", "3"), ("two", "3"), ("three", "4")):
        run_json(cli, root, "--out", tmp_path / out, "--seed", seed)

    def content(out):
        return [(tmp_path / out / f"{p}_list.txt").read_bytes() for p in ("train", "val", "test")]

    assert content("one") == content("two")
    assert content("one") != content("three")


def test_class_with_too_few_images_warns_and_stays_in_train(cli, tmp_path):
    root = make_class_tree(tmp_path / "data", {"many": 10, "rare": 2})

    report, result = run_json(cli, root)

    assert "warning:" in result.stderr and "'rare'" in result.stderr and "kept in train" in result.stderr
    assert report["per_class"]["rare"] == {"train": 2, "val": 0, "test": 0}
    assert any("rare" in w for w in report["warnings"])


def test_default_seed_is_recorded_in_the_recipe(cli, tmp_path):
    import yaml

    root = make_class_tree(tmp_path / "data", {"a": 5, "b": 5})

    run_json(cli, root)

    recipe = yaml.safe_load((root / "recipe.yaml").read_text(encoding="utf-8"))
    assert recipe["seed"] == recipe["options"]["seed"] == 42
    assert recipe["options"]["format"] == "imagenet"
    assert recipe["options"]["dataset_dir"] == root.resolve().as_posix()
    assert set(recipe["outputs"]) == {"train_list.txt", "val_list.txt", "test_list.txt", "labels.txt"}
    assert recipe["inputs"]["images_found"] == 10 and recipe["versions"]["shitu"]


def test_a_second_split_into_the_dataset_ignores_the_first_outputs(cli, tmp_path):
    root = make_class_tree(tmp_path / "data", {"a": 5, "b": 5})
    run_json(cli, root, "--out", root / "splits")
    first = (root / "splits" / "train_list.txt").read_bytes()

    report, _ = run_json(cli, root, "--out", tmp_path / "again")

    assert sorted(report["per_class"]) == ["a", "b"] and not report["skipped"]
    assert (tmp_path / "again" / "train_list.txt").read_bytes() == first


# --- rec


def test_rec_holds_out_whole_classes_for_gallery_and_query(cli, tmp_path):
    sizes = {"red apple": 6, "梨": 6, "plum": 6, "fig": 6}
    root = make_class_tree(tmp_path / "data", sizes)
    broken = break_some_files(root, "fig")

    report, result = run_json(cli, root, "--format", "rec", "--val", "0.5", "--test", "0.2")

    assert "detected format" not in result.stderr
    train, gallery, query = (read_rec_list(root / f"{p}_list.txt") for p in ("train", "gallery", "query"))
    train_labels = {label for _, label in train}
    held = {label for _, label in gallery}
    assert len(train_labels) == 2 and len(held) == 2 and not train_labels & held
    assert {label for _, label in query} == held
    assert len(query) == 2 and len(gallery) == 10  # round(6 * 0.2) = 1 query per held-out class
    assert sorted(rel for rel, _ in train + gallery + query) == sorted(f"{c}/{i:02d}.jpg" for c in sizes for i in range(6))
    assert all(rel.split("/")[0] == label for rel, label in train + gallery + query)
    assert "red apple/00.jpg\tred apple\n" in "".join((root / f"{p}_list.txt").read_text(encoding="utf-8") for p in ("train", "gallery", "query"))
    assert read_labels(root / "labels.txt") == sorted(sizes)
    assert {s["path"] for s in report["skipped"]} == broken


def test_rec_summary_table_names_the_roles(cli, tmp_path):
    root = make_class_tree(tmp_path / "data", {"a": 4, "b": 4, "c": 4})

    result = cli("split-dataset", root, "--format", "rec")

    assert result.exit_code == 0, result.stderr
    assert "gallery" in result.stdout and "query" in result.stdout


# --- coco


def coco_doc(names: list[str], unannotated: int = 2) -> dict:
    images = [{"id": i + 1, "file_name": name, "width": 16, "height": 16} for i, name in enumerate(names)]
    annotations = []
    for image in images[unannotated:]:
        annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0})
        annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": 2, "bbox": [0, 0, 8, 8], "area": 64, "iscrowd": 1,
                            "segmentation": {"counts": [0, 64], "size": [16, 16]}})
    return {"info": {"description": "tiny"}, "licenses": [{"id": 1, "name": "CC0"}], "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "crowd of boxes"}]}


def test_coco_split_keeps_metadata_crowds_and_unannotated_images(cli, tmp_path):
    root = tmp_path / "coco"
    names = [f"{i:02d}.jpg" for i in range(20)]
    for i, name in enumerate(names[:-1]):
        write_image(root / "images" / name, seed=i, size=(16, 16))
    (root / "images" / "11.jpg").write_bytes(b"\xff\xd8\xff broken")
    doc = coco_doc(names)
    (root / "annotations.json").write_text(json.dumps(doc), encoding="utf-8")

    report, result = run_json(cli, root)

    assert "detected format: coco" in result.stderr
    parts = {p: json.loads((root / f"{p}.json").read_text(encoding="utf-8")) for p in ("train", "val", "test")}
    ids = [img["id"] for part in parts.values() for img in part["images"]]
    assert sorted(ids) == sorted(set(range(1, 21)) - {12, 20})  # 11.jpg corrupt, 19.jpg missing
    assert report["counts"] == {"train": 12, "val": 4, "test": 2}  # 18 images: round(3.6), round(1.8)
    for part in parts.values():
        assert part["info"] == doc["info"] and part["licenses"] == doc["licenses"] and part["categories"] == doc["categories"]
        own = {img["id"] for img in part["images"]}
        assert all(ann["image_id"] in own for ann in part["annotations"])
    crowds = [ann for part in parts.values() for ann in part["annotations"] if ann["iscrowd"]]
    assert len(crowds) == 16  # every crowd annotation of a kept image survives
    assert sum(report["extra"]["unannotated_images"].values()) == 2
    assert {s["path"] for s in report["skipped"]} == {"images/11.jpg", "images/19.jpg"}
    assert any("no annotations" in w for w in report["warnings"])


def test_coco_in_annotations_folder_with_images_beside(cli, tmp_path):
    root = tmp_path / "coco"
    names = [f"pics\\{i}.jpg" for i in range(10)]  # written on Windows by PaddleX 2
    for i in range(10):
        write_image(root / "pics" / f"{i}.jpg", seed=i, size=(8, 8))
    (root / "annotations").mkdir()
    (root / "annotations" / "instances.json").write_text(json.dumps(coco_doc(names, 0)), encoding="utf-8")

    report, _ = run_json(cli, root, "--val", "0.3", "--test", "0")

    assert report["counts"] == {"train": 7, "val": 3, "test": 0}
    train = json.loads((root / "train.json").read_text(encoding="utf-8"))
    assert all("/" in img["file_name"] and "\\" not in img["file_name"] for img in train["images"])
    for _ in range(2):  # earlier outputs in annotations/ are not mistaken for the source json
        again, _ = run_json(cli, root, "--val", "0.3", "--test", "0", "--out", root / "annotations")
        assert again["counts"] == report["counts"]


def test_coco_with_invalid_json_names_the_file(cli, tmp_path):
    root = tmp_path / "coco"
    write_image(root / "images" / "0.jpg")
    (root / "annotations.json").write_text("{ not json", encoding="utf-8")

    result = cli("split-dataset", root)

    assert result.exit_code == 2
    assert "annotations.json" in result.stderr and "not valid JSON" in result.stderr


# --- voc


def voc_xml(name: str, *labels: str) -> str:
    objects = "".join(f"<object><name>{label}</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>" for label in labels)
    return f"<annotation><filename>{name}</filename>{objects}</annotation>"


def test_voc_pairs_images_with_xml_and_collects_labels(cli, tmp_path):
    root = tmp_path / "voc"
    for i in range(10):
        write_image(root / "JPEGImages" / f"{i}.jpg", seed=i, size=(16, 16))
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        labels = ("dog", "cat") if i % 2 else ("person",)
        (root / "Annotations" / f"{i}.xml").write_text(voc_xml(f"{i}.jpg", *labels), encoding="utf-8")
    write_image(root / "JPEGImages" / "lonely.jpg")  # no xml
    (root / "Annotations" / "3.xml").write_text("<annotation><object>", encoding="utf-8")  # broken xml
    (root / "Annotations" / "orphan.xml").write_text(voc_xml("orphan.jpg", "zebra"), encoding="utf-8")

    report, result = run_json(cli, root)

    assert "detected format: voc" in result.stderr
    pairs = [pair for p in ("train", "val", "test") for pair in read_pair_list(root / f"{p}_list.txt")]
    assert sorted(pairs) == sorted((f"JPEGImages/{i}.jpg", f"Annotations/{i}.xml") for i in range(10) if i != 3)
    assert report["counts"] == {"train": 6, "val": 2, "test": 1}
    assert read_labels(root / "labels.txt") == ["cat", "dog", "person", "zebra"]  # from every xml
    assert {s["path"] for s in report["skipped"]} == {"Annotations/3.xml", "JPEGImages/3.jpg", "JPEGImages/lonely.jpg"}


# --- bad usage: exit 2, one line naming the problem, nothing written


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("val, test", [("0.7", "0.3"), ("0.5", "0.9"), ("1.5", "0"), ("-0.1", "0.1")])
def test_impossible_fractions_exit_2(cli, tmp_path, val, test):
    root = make_class_tree(tmp_path / "data", {"a": 3})

    result = cli("split-dataset", root, "--val", val, "--test", test)

    one_line_error(result, "--val" if float(val) + float(test) >= 1 or not 0 <= float(val) < 1 else "--test")
    assert not (root / "train_list.txt").exists()


def test_missing_dataset_dir_exits_2(cli, tmp_path):
    one_line_error(cli("split-dataset", tmp_path / "nowhere"), "nowhere", "not found")


def test_empty_tree_exits_2(cli, tmp_path):
    (tmp_path / "empty").mkdir()

    one_line_error(cli("split-dataset", tmp_path / "empty"), "empty", "cannot tell the dataset format")


def test_tree_of_non_images_exits_2_and_writes_nothing(cli, tmp_path):
    (tmp_path / "data" / "docs").mkdir(parents=True)
    (tmp_path / "data" / "docs" / "a.txt").write_text("x", encoding="utf-8")

    one_line_error(cli("split-dataset", tmp_path / "data", "--format", "imagenet"), "no images found")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["docs"]


def test_tree_of_only_broken_images_exits_2(cli, tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_text("nope", encoding="utf-8")

    one_line_error(cli("split-dataset", root), "none of the 1 images can be read")


def test_unknown_format_exits_2(cli, tmp_path):
    root = make_class_tree(tmp_path / "data", {"a": 3})

    one_line_error(cli("split-dataset", root, "--format", "yolo"), "unknown format 'yolo'", "coco")


def test_out_that_is_a_file_exits_2(cli, tmp_path):
    root = make_class_tree(tmp_path / "data", {"a": 3})
    (tmp_path / "taken").write_text("", encoding="utf-8")

    one_line_error(cli("split-dataset", root, "--out", tmp_path / "taken"), "taken", "is a file")
