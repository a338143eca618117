"""train-det datasets: a COCO (train.json + val.json) or VOC folder validated and normalised to COCO
jsons with absolute file names and category ids 1..K, as ppdet reads them."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shitu_cli.artifacts import atomic_write_text, sha256_file
from shitu_cli.data.images import image_size
from shitu_cli.errors import BadInput
from shitu_cli.train.image_check import SkippedImage, unreadable_images

MERGED_CLASS = "foreground"


@dataclass
class DetDataset:
    """A dataset normalised for ppdet: COCO jsons with absolute file names and ids 1..K."""

    source: Path
    kind: str  # coco | voc
    train_json: Path
    val_json: Path
    labels: list[str]
    train_images: int
    val_images: int
    train_boxes: int
    val_boxes: int
    checksums: dict[str, str] = field(default_factory=dict)
    skipped: list[SkippedImage] = field(default_factory=list)  # listed images that cannot be read, left out


# ---------------------------------------------------------------- datasets


def prepare_dataset(root: Path, work_dir: Path, merge_classes: bool = False) -> DetDataset:
    """Validate a COCO (train.json/val.json) or VOC dataset dir and write normalised COCO jsons."""
    root = Path(root)
    if not root.is_dir():
        raise BadInput("dataset folder not found", path=root, hint="pass a folder made by `shitu split-dataset`")
    if (root / "train.json").is_file():
        kind, train, val = "coco", read_coco(root / "train.json"), read_coco(_val_json(root))
        image_dir = coco_image_dir(root, train)
    elif (root / "Annotations").is_dir():
        kind, (train, val), image_dir = "voc", _voc_splits(root), root
    else:
        raise BadInput("no train.json (COCO) or Annotations/ (VOC) in the dataset folder", path=root,
                       hint="run `shitu split-dataset` to write train.json and val.json")
    labels = [MERGED_CLASS] if merge_classes else [c["name"] for c in sorted(train["categories"], key=lambda c: c["id"])]
    work_dir.mkdir(parents=True, exist_ok=True)
    counts, skipped = {}, []
    for split, document in (("train", train), ("val", val)):
        normal = _normalise(document, labels, image_dir, merge_classes, root / f"{split}.json", skipped)
        if not normal["annotations"]:
            raise BadInput(f"the {split} split has no box annotations", path=root / f"{split}.json",
                           hint="a detector needs boxes: check the annotations' image_id and bbox fields")
        atomic_write_text(work_dir / f"{split}.json", json.dumps(normal, ensure_ascii=False))
        counts[split] = (len(normal["images"]), len(normal["annotations"]))
    checksums = {p.name: sha256_file(p) for p in (root / "train.json", root / "val.json") if p.is_file()}
    return DetDataset(root, kind, work_dir / "train.json", work_dir / "val.json", labels,
                      counts["train"][0], counts["val"][0], counts["train"][1], counts["val"][1], checksums, skipped)


def _val_json(root: Path) -> Path:
    path = root / "val.json"
    if not path.is_file():
        raise BadInput("val.json is missing: evaluation needs a validation split", path=path,
                       hint="run `shitu split-dataset DIR --val 0.2`")
    return path


def read_coco(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"not a readable COCO json ({exc.__class__.__name__}: {exc})", path=path) from None
    if not isinstance(document, dict) or not all(isinstance(document.get(k), list) for k in ("images", "annotations", "categories")):
        raise BadInput("not a COCO detection json (needs images, annotations and categories lists)", path=path)
    if not document["categories"]:
        raise BadInput("COCO json has no categories", path=path)
    return document


def coco_image_dir(root: Path, document: dict[str, Any]) -> Path:
    """file_name is relative to the dataset dir, or to its images/ folder."""
    first = next(iter(document["images"]), None)
    if first is not None and not (root / first["file_name"]).is_file() and (root / "images" / first["file_name"]).is_file():
        return root / "images"
    return root


def _normalise(document: dict[str, Any], labels: list[str], image_dir: Path, merge: bool, source: Path,
               skipped: list[SkippedImage]) -> dict[str, Any]:
    """Absolute file names, category ids 1..K in label order, area/iscrowd/size filled in; images that are
    missing or do not decode are left out (with their boxes) and added to `skipped`."""
    names = {c["id"]: c["name"] for c in document["categories"]}
    new_id = {name: i + 1 for i, name in enumerate(labels)}
    paths = {image["id"]: (image_dir / image["file_name"]).resolve() for image in document["images"]}
    bad = unreadable_images(list(paths.values()))
    images = []
    for image in document["images"]:
        path = paths[image["id"]]
        if path in bad:
            skipped.append(SkippedImage(image["file_name"], bad[path].reason))
            continue
        entry = {"id": image["id"], "file_name": str(path)}
        entry["width"], entry["height"] = image.get("width") or 0, image.get("height") or 0
        if not (entry["width"] and entry["height"]):
            entry["width"], entry["height"] = image_size(path)
        images.append(entry)
    if document["images"] and not images:
        example = skipped[-1]
        raise BadInput(f"none of the {len(document['images'])} images listed in {source.name} can be read "
                       f"(e.g. {example.path!r}: {example.reason})", path=image_dir,
                       hint="file_name must be relative to the dataset folder")
    known = {i["id"] for i in images}
    annotations = []
    for ann in document["annotations"]:
        name = names.get(ann.get("category_id"))
        if name is None or (not merge and name not in new_id):
            raise BadInput(f"annotation {ann.get('id')} has category {ann.get('category_id')!r}, unknown to train.json",
                           path=source, hint="train and val must share one category list")
        x, y, w, h = (float(v) for v in ann["bbox"])
        if ann["image_id"] not in known or w <= 0 or h <= 0:
            continue
        annotations.append({"id": len(annotations) + 1, "image_id": ann["image_id"],
                            "category_id": 1 if merge else new_id[name], "bbox": [x, y, w, h],
                            "area": float(ann.get("area") or w * h), "iscrowd": int(ann.get("iscrowd", 0))})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(labels)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _voc_splits(root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """VOC: JPEGImages/ + Annotations/*.xml + train/val list files, converted to COCO documents."""
    documents = []
    for split in ("train", "val"):
        list_file = next((p for p in (root / f"{split}.txt", root / "ImageSets" / "Main" / f"{split}.txt") if p.is_file()), None)
        if list_file is None:
            raise BadInput(f"VOC dataset has no {split}.txt list", path=root,
                           hint=f"write {split}.txt (one image id, or 'image.jpg annotation.xml', per line)")
        documents.append(_voc_to_coco(root, list_file))
    names = sorted({c["name"] for d in documents for c in d["categories"]})
    for document in documents:  # one category list for both splits
        old = {c["id"]: c["name"] for c in document["categories"]}
        for ann in document["annotations"]:
            ann["category_id"] = names.index(old[ann["category_id"]]) + 1
        document["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    return documents[0], documents[1]


def _voc_to_coco(root: Path, list_file: Path) -> dict[str, Any]:
    images, annotations, names = [], [], {}
    for line in list_file.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) >= 2:
            image_rel, xml_path = parts[0], root / parts[1]
        else:
            xml_path = root / "Annotations" / f"{parts[0]}.xml"
            image_rel = None
        try:
            tree = ElementTree.parse(xml_path).getroot()
        except (OSError, ElementTree.ParseError) as exc:
            raise BadInput(f"cannot read VOC annotation ({exc.__class__.__name__})", path=xml_path) from None
        image_rel = image_rel or f"JPEGImages/{tree.findtext('filename') or parts[0] + '.jpg'}"
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": image_rel})
        for obj in tree.iter("object"):
            name = (obj.findtext("name") or "").strip()
            box = obj.find("bndbox")
            if not name or box is None:
                continue
            x1, y1, x2, y2 = (float(box.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax"))
            cat = names.setdefault(name, len(names) + 1)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": int(obj.findtext("difficult") or 0)})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in names.items()]}
