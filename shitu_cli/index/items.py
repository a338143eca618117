"""Gallery items: the id map (id -> path, label, sha256), reading a gallery, and planning an update.

`plan_update` is the pure rule for re-sync and --append: which files to embed, which ids
to drop, which labels to change; it never touches faiss or the disk.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from shitu_cli.errors import BadInput, ManifestError


@dataclass
class GalleryItem:
    """One indexed image (or, with a detector, one crop of it: `box` then says where)."""

    path: str
    label: str
    sha256: str | None = None
    box: list[float] | None = None


@dataclass(frozen=True)
class GalleryEntry:
    """A file the gallery asks to have indexed, with its content hash."""

    path: str  # absolute posix path
    label: str
    sha256: str


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class UpdatePlan:
    embed: list[GalleryEntry] = field(default_factory=list)  # new or changed files
    remove: list[int] = field(default_factory=list)  # ids whose file is gone
    replaced: list[int] = field(default_factory=list)  # ids whose file changed (re-embedded under a new id)
    changed_paths: set[str] = field(default_factory=set)  # the embed entries that replace a changed file
    relabel: dict[int, str] = field(default_factory=dict)  # same content, moved to another label
    unchanged: int = 0
    duplicates: list[Skipped] = field(default_factory=list)  # --append: content already indexed


# ----------------------------------------------------------------------------- id_map.json


def id_map_text(items: Mapping[int, GalleryItem]) -> str:
    """id -> item as JSON, ids ascending; keys are strings because JSON keys must be."""
    return json.dumps({str(i): asdict(items[i]) for i in sorted(items)}, ensure_ascii=False, indent=1) + "\n"


def parse_id_map(text: str, path: Path) -> dict[int, GalleryItem]:
    try:
        raw = json.loads(text)
        return {int(key): GalleryItem(**value) for key, value in raw.items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise ManifestError(f"id map is malformed ({exc.__class__.__name__}: {exc})", path=path) from None


# ----------------------------------------------------------------------------- reading a gallery


def read_gallery(gallery: Path) -> tuple[list[tuple[Path, str]], list[Skipped]]:
    """(path, label) pairs from a folder of label folders or a `path<TAB>label` list file."""
    gallery = Path(gallery)
    if not gallery.exists():
        raise BadInput("gallery not found", hint="pass a folder with one subfolder per label, or a path<TAB>label list", path=gallery)
    pairs, skipped = _from_list(gallery) if gallery.is_file() else _from_folders(gallery)
    if not pairs and gallery.is_file():
        raise BadInput(f"none of the {len(skipped)} listed images exists" if skipped else "the list names no images",
                       hint="list paths are relative to the list's folder, or to the dataset dir of the split-dataset "
                            "recipe.yaml beside it", path=gallery)
    if not pairs:
        raise BadInput("gallery has no images", hint="put images in one subfolder per label, e.g. gallery/cola/1.jpg", path=gallery)
    return pairs, skipped


def _from_folders(root: Path) -> tuple[list[tuple[Path, str]], list[Skipped]]:
    from shitu_cli.data.images import is_image_name, iter_image_files

    pairs, skipped = [], []
    for path in iter_image_files(root):
        rel = path.relative_to(root)
        if len(rel.parts) < 2:
            skipped.append(Skipped(path.resolve().as_posix(), "not inside a label folder"))
        else:
            pairs.append((path.resolve(), rel.parts[0]))
    if not pairs and not skipped and any(p.is_file() and not is_image_name(p) for p in root.rglob("*")):
        raise BadInput("gallery folder has files but none with an image extension", path=root)
    return pairs, skipped


def _from_list(list_file: Path) -> tuple[list[tuple[Path, str]], list[Skipped]]:
    """Either list dialect; paths start where split-dataset's recipe beside the list says the dataset is."""
    from shitu_cli.data.lists import read_labelled_list

    pairs, skipped = [], []
    for entry in read_labelled_list(list_file):
        path = entry.path.resolve()
        if path.is_file():
            pairs.append((path, entry.label))
        else:
            skipped.append(Skipped(path.as_posix(), f"listed in {list_file.name} but not found"))
    return pairs, skipped


def hash_entries(pairs: Iterable[tuple[Path, str]], progress=None) -> tuple[list[GalleryEntry], list[Skipped]]:
    from shitu_cli.artifacts import sha256_file

    entries, skipped = [], []
    for path, label in pairs:
        try:
            entries.append(GalleryEntry(path.as_posix(), label, sha256_file(path)))
        except OSError as exc:
            skipped.append(Skipped(path.as_posix(), f"cannot read ({exc.strerror or exc.__class__.__name__})"))
        if progress:
            progress(1)
    return entries, skipped


# ----------------------------------------------------------------------------- planning


def plan_update(items: Mapping[int, GalleryItem], entries: list[GalleryEntry], append: bool) -> UpdatePlan:
    """What to do so the index holds `entries`.

    Re-sync (append False): the index ends up matching the gallery exactly. By path:
    same content -> unchanged (or relabelled), other content -> re-embedded, gone -> removed.
    Append: only content not indexed yet is added; exact duplicates (sha256) are skipped.
    """
    return _plan_append(items, entries) if append else _plan_sync(items, entries)


def _plan_sync(items: Mapping[int, GalleryItem], entries: list[GalleryEntry]) -> UpdatePlan:
    plan = UpdatePlan()
    by_path: dict[str, list[int]] = {}
    for item_id, item in items.items():
        by_path.setdefault(item.path, []).append(item_id)
    wanted = set()
    for entry in entries:
        wanted.add(entry.path)
        ids = by_path.get(entry.path, [])
        same = [i for i in ids if items[i].sha256 == entry.sha256]
        if not same:
            plan.embed.append(entry)
            plan.replaced.extend(ids)
            if ids:
                plan.changed_paths.add(entry.path)
            continue
        keep = same[0]
        plan.remove.extend([i for i in ids if i != keep])
        if items[keep].label != entry.label:
            plan.relabel[keep] = entry.label
        else:
            plan.unchanged += 1
    plan.remove.extend(i for path, ids in by_path.items() if path not in wanted for i in ids)
    plan.remove.sort()
    plan.replaced.sort()
    return plan


def _plan_append(items: Mapping[int, GalleryItem], entries: list[GalleryEntry]) -> UpdatePlan:
    plan = UpdatePlan()
    seen = {item.sha256: item.path for item in items.values() if item.sha256}
    for entry in entries:
        if entry.sha256 in seen:
            plan.duplicates.append(Skipped(entry.path, f"same content as {seen[entry.sha256]}"))
        else:
            seen[entry.sha256] = entry.path
            plan.embed.append(entry)
    plan.unchanged = len(items)
    return plan


def select_for_removal(items: Mapping[int, GalleryItem], what: str) -> tuple[list[int], str]:
    """Ids named by `what`: a list file of paths (one a line, relative to the list) or a label."""
    target = Path(what)
    if target.is_file():
        wanted = _paths_in_list(target)
        ids = [i for i, item in items.items() if item.path in wanted]
        return sorted(ids), f"{len(wanted)} path(s) listed in {target.name}"
    ids = [i for i, item in items.items() if item.label == what]
    if not ids:
        labels = sorted({item.label for item in items.values()})
        import difflib

        close = [label for label in labels if label.lower() == what.lower()] or difflib.get_close_matches(what, labels, n=1)
        hint = f"did you mean label {close[0]!r}?" if close else "pass a label the index holds or a list file of paths"
        raise BadInput(f"--remove {what!r} is neither a file nor a label in this index", hint=hint)
    return sorted(ids), f"label {what!r}"


def _paths_in_list(list_file: Path) -> set[str]:
    base = list_file.resolve().parent
    wanted = set()
    for line in list_file.read_text(encoding="utf-8-sig").split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        rel = line.split("\t", 1)[0].replace("\\", "/")
        wanted.add((base / rel).resolve().as_posix())
        wanted.add(rel)  # imported PaddleClas items keep their recorded relative paths
    return wanted
