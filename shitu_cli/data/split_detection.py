"""split-dataset for detection datasets: VOC (JPEGImages/ + Annotations/) and COCO (one annotations json)."""

from __future__ import annotations

import json
from pathlib import Path

from shitu_cli.data.lists import labels_text, pair_list_text
from shitu_cli.data.split_rules import PARTS, split_groups
from shitu_cli.data.split_scan import (
    LAYOUT_HINTS,
    Built,
    Progress,
    Skipped,
    readable_images,
    rel_path,
    require_images,
    sorted_skips,
    unusable_name,
    visible_files,
    whole_set_warning,
)
from shitu_cli.errors import BadInput


# --- voc


def build_voc(root: Path, out_dir: Path, val: float, test: float, seed: int, progress: Progress | None) -> Built:
    from shitu_cli.data.images import is_image_name

    image_dir, xml_dir = root / "JPEGImages", root / "Annotations"
    for folder in (image_dir, xml_dir):
        if not folder.is_dir():
            raise BadInput("a voc dataset needs this folder", hint=LAYOUT_HINTS["voc"], path=folder)
    labels, bad_xml, skipped = set(), set(), []
    for xml in visible_files(xml_dir):
        if xml.suffix.lower() == ".xml":
            names = _voc_object_names(xml)
            if names is None:
                bad_xml.add(xml)
                skipped.append(Skipped(rel_path(xml, root), "not valid VOC xml"))
            labels.update(names or ())
    pairs = {}
    for image in visible_files(image_dir):
        xml = (xml_dir / image.relative_to(image_dir)).with_suffix(".xml")
        reason = unusable_name(image, root, is_image_name)
        if not reason and any(c.isspace() for c in rel_path(image, root)):
            reason = "path holds whitespace, which a voc list line cannot hold"
        if not reason and not xml.is_file():
            reason = f"no annotation {rel_path(xml, root)}"
        if not reason and xml in bad_xml:
            reason = "its annotation is not valid VOC xml"
        if reason:
            skipped.append(Skipped(rel_path(image, root), reason))
        else:
            pairs[image] = xml
    found = len(pairs) + sum(1 for s in skipped if s.path.startswith("JPEGImages/"))
    require_images(root, found, found, "voc")
    if not pairs:
        raise BadInput(f"none of the {found} images has a usable annotation", hint=LAYOUT_HINTS["voc"], path=xml_dir)
    good, bad = readable_images(root, list(pairs), progress)
    require_images(root, found, len(good), "voc")
    xml_of = {rel_path(image, root): rel_path(xml, root) for image, xml in pairs.items() if image in good}
    plan = split_groups({"": list(xml_of)}, val, test, seed)
    files = {f"{part}_list.txt": pair_list_text((rel, xml_of[rel]) for rel in plan.parts[part]).encode("utf-8") for part in PARTS}
    files["labels.txt"] = labels_text(sorted(labels)).encode("utf-8")
    warnings = whole_set_warning(plan, len(xml_of))
    plan.per_group = {}
    inputs = {"images_found": found, "images_used": len(good), "files_skipped": len(skipped) + len(bad), "classes": len(labels)}
    return Built(files, plan, sorted_skips(skipped + bad), warnings, inputs)


def _voc_object_names(xml: Path) -> list[str] | None:
    """Object class names in a VOC xml, or None when it is not parseable VOC."""
    import xml.etree.ElementTree as ElementTree

    try:
        tree = ElementTree.parse(xml)
    except (ElementTree.ParseError, OSError):
        return None
    return [name.text.strip() for name in tree.getroot().iterfind("object/name") if name.text and name.text.strip()]


# --- coco


def coco_candidates(root: Path) -> list[Path]:
    # train/val/test.json are an earlier split's outputs (--out annotations/), not the source.
    folder = root / "annotations"
    found = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return [p for p in found if p.name not in {f"{part}.json" for part in PARTS}]


def _coco_file(root: Path) -> Path:
    if (root / "annotations.json").is_file():
        return root / "annotations.json"
    found = coco_candidates(root)
    if not found:
        raise BadInput("no annotations.json or annotations/*.json", hint=LAYOUT_HINTS["coco"], path=root)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise BadInput(f"found {len(found)} annotation files ({names}); cannot tell which to split", hint="keep one json in annotations/", path=root / "annotations")
    return found[0]


def _load_coco(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise BadInput(f"not valid JSON (line {exc.lineno}: {exc.msg})", path=path) from None
    except UnicodeDecodeError:
        raise BadInput("not UTF-8 text", path=path) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise BadInput("not a COCO file: no `images` list", path=path)
    ids = set()
    for image in doc["images"]:
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise BadInput(f"an image entry lacks `id` or `file_name`: {str(image)[:80]}", path=path)
        if image["id"] in ids:
            raise BadInput(f"image id {image['id']!r} appears twice", path=path)
        ids.add(image["id"])
    if not isinstance(doc.get("annotations", []), list):
        raise BadInput("`annotations` is not a list", path=path)
    return doc


def build_coco(root: Path, out_dir: Path, val: float, test: float, seed: int, progress: Progress | None) -> Built:
    ann_path = _coco_file(root)
    doc = _load_coco(ann_path)
    image_roots = [d for d in (root / "images", ann_path.parent, root) if d.is_dir()]
    located, skipped = {}, []
    for image in doc["images"]:
        name = image["file_name"].replace("\\", "/")
        path = next((r / name for r in image_roots if (r / name).is_file()), None)
        if path is None:  # named where it was first looked for, relative to the dataset like every skip
            skipped.append(Skipped(rel_path(image_roots[0] / name, root), "listed in the annotations but no such file"))
        else:
            located[path] = image
    require_images(root, len(doc["images"]), len(doc["images"]), "coco")
    if not located:
        raise BadInput(f"none of the {len(doc['images'])} images it lists were found", hint=LAYOUT_HINTS["coco"], path=ann_path)
    good, bad = readable_images(root, list(located), progress)
    require_images(root, len(doc["images"]), len(good), "coco")
    kept = {str(located[p]["id"]): located[p] for p in located if p in good}
    plan = split_groups({"": list(kept)}, val, test, seed)
    anns = [(str(a.get("image_id")) if isinstance(a, dict) else None, a) for a in doc.get("annotations", [])]
    annotated = {image_id for image_id, _ in anns}
    files, extra = {}, {"annotations": {}, "unannotated_images": {}}
    for part in PARTS:
        members = set(plan.parts[part])
        images = [_posix_file_name(img) for img in doc["images"] if str(img["id"]) in members]
        part_anns = [a for image_id, a in anns if image_id in members]  # crowd ones too: PaddleX 2 dropped them
        files[f"{part}.json"] = _coco_bytes(doc, images, part_anns)
        extra["annotations"][part] = len(part_anns)
        extra["unannotated_images"][part] = sum(1 for img in images if str(img["id"]) not in annotated)
    listed = {str(img["id"]) for img in doc["images"]}
    orphans = sum(1 for image_id, _ in anns if image_id not in listed)
    dropped = sum(1 for image_id, _ in anns if image_id in listed and image_id not in kept)
    warnings = whole_set_warning(plan, len(kept))
    if orphans:
        warnings.append(f"{orphans} annotation(s) point at no listed image; left out")
    if dropped:
        warnings.append(f"{dropped} annotation(s) belong to skipped images; left out")
    if sum(extra["unannotated_images"].values()):
        warnings.append(f"{sum(extra['unannotated_images'].values())} image(s) have no annotations; kept (as background)")
    extra["annotation_file"] = rel_path(ann_path, root)
    plan.per_group = {}
    inputs = {"images_listed": len(doc["images"]), "images_used": len(kept), "files_skipped": len(skipped) + len(bad),
              "annotations": len(doc.get("annotations", [])), "categories": len(doc.get("categories", []))}
    return Built(files, plan, sorted_skips(skipped + bad), warnings, inputs, extra)


def _posix_file_name(image: dict) -> dict:
    return {**image, "file_name": image["file_name"].replace("\\", "/")}


def _coco_bytes(doc: dict, images: list, anns: list) -> bytes:
    # Every other top-level key (info, licenses, categories, ...) is kept as it was.
    out = {key: value for key, value in doc.items()}
    out["images"], out["annotations"] = images, anns
    return (json.dumps(out, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
