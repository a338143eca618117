"""The public Python API: `Index` (build, add, remove, sync a gallery index) and `Pipeline` (recognise).

Both wrap the core the CLI uses (shitu_cli.index.build_index, shitu_cli.infer.pipeline.Pipeline);
`shitu serve` calls the same two objects, so a notebook can do all that the server does:

    from shitu_cli import Index, Pipeline
    index = Index.build("gallery/", "index/")
    pipe = Pipeline(index)
    print(pipe("shelf.jpg").recognitions[0].label)
    index.add(["my_cat.jpg"], label="cat"); index.remove("horse"); index.sync()

The gallery folder stays the truth the index mirrors: `add` copies the images into
GALLERY/LABEL/ before indexing them, `remove` moves the removed items' files into the hidden
GALLERY/.removed/ (a later `sync` leaves them out; move them back to restore them).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from shitu_cli.errors import BadInput, ShituError, writing_to

warnings.filterwarnings("ignore", message="No ccache found")  # paddle's JIT, on import: says nothing to a user

REMOVED_DIR = ".removed"
# Options of the index's recipe.yaml that an edit repeats, so added images are embedded as the build embedded them.
BUILD_SETTINGS = ("det", "det_thresh", "predictor_backend", "threads", "mkldnn", "batch_size")
MAX_LABEL_CHARS = 200


def check_label(label: str) -> str:
    """A label becomes a gallery folder name: refuse what cannot be one, or would be hidden from the gallery."""
    text = str(label).strip()
    if not text:
        raise BadInput("the label is empty")
    if len(text) > MAX_LABEL_CHARS:
        raise BadInput(f"the label is {len(text)} characters long, over {MAX_LABEL_CHARS}")
    if any(c in text for c in "/\\\0") or text.startswith(".") or any(ord(c) < 32 for c in text):
        raise BadInput(f"label {text!r} cannot be a folder name", hint="no slashes, control characters or leading dot")
    return text


class Index:
    """A gallery index folder written by `shitu build-index` (or `Index.build`)."""

    def __init__(self, path: Path | str = "index"):
        from shitu_cli.index.store import read_index_manifest

        self.path = Path(path)
        read_index_manifest(self.path)  # refuse a folder that holds no index now, not at the first edit
        self._edit_lock = threading.Lock()  # one edit at a time in this process; the file lock covers others

    @classmethod
    def build(cls, gallery: Path | str, path: Path | str = "index", rec: Path | str | None = None,
              det: Path | str | None = None, **options: Any) -> "Index":
        """Build (or re-sync) the index at `path` from a gallery folder of label folders or a list file."""
        from shitu_cli.index import build_index

        build_index(gallery, path, rec=rec, det=det, **options)
        return cls(path)

    def __repr__(self) -> str:
        return f"Index({self.path.as_posix()!r})"

    # ---- reading

    def load(self):
        """The committed generation: faiss index, id map and manifest (a StoredIndex)."""
        from shitu_cli.index.store import load_index

        return load_index(self.path)

    def _items(self):
        """The committed generation's items (id -> GalleryItem). They live in the id map; an external
        store opened along with them (a Milvus client, which holds a milvus-lite folder) is let go at once."""
        stored = self.load()
        stored.close()
        return stored.items

    @property
    def manifest(self):
        from shitu_cli.index.store import read_index_manifest

        return read_index_manifest(self.path)

    @property
    def gallery(self) -> Path | None:
        recorded = self.manifest.gallery
        return Path(recorded) if recorded else None

    def labels(self) -> dict[str, int]:
        """label -> how many items the index holds for it."""
        counts: dict[str, int] = {}
        for item in self._items().values():
            counts[item.label] = counts.get(item.label, 0) + 1
        return dict(sorted(counts.items()))

    # ---- editing

    def add(self, images: Sequence[Path | str | np.ndarray], label: str, names: Sequence[str] | None = None):
        """Copy `images` (files, or RGB uint8 arrays written as PNG) into GALLERY/LABEL/ and index them.

        Returns the build report; `report.added_items` lists (id, path) of this call's images in the
        committed index. Content already indexed is not copied (report.duplicates says where it is).
        """
        label = check_label(label)
        gallery = self._gallery_folder("add images")
        if not images:
            raise BadInput("no images to add")
        with self._edit_lock:
            copied = _copy_into(gallery / label, images, names)
            try:
                report = self._build(gallery, append=True, only=copied)
            except BaseException:
                for path in copied:
                    path.unlink(missing_ok=True)
                raise
            indexed = {item.path: item_id for item_id, item in self._items().items()}
            mine = {p.resolve().as_posix() for p in copied}
            # another process's edit may have indexed this call's file already: then it is added, not a duplicate
            report.duplicates = [d for d in report.duplicates if d.path in mine and d.path not in indexed]
            report.added_items = [(indexed[p.resolve().as_posix()], p.resolve().as_posix()) for p in copied
                                  if p.resolve().as_posix() in indexed]
            for path in copied:  # a duplicate of indexed content: keep the gallery equal to the index
                if path.resolve().as_posix() not in indexed:
                    path.unlink(missing_ok=True)
        return report

    def remove(self, label: str | None = None, paths: Iterable[str] | None = None, ids: Iterable[int] | None = None):
        """Drop a label's items, or the items of these gallery paths or ids, from the index; their files
        inside the gallery move to GALLERY/.removed/ so that `sync` does not bring them back."""
        import tempfile

        from shitu_cli.index import build_index

        chosen = [x is not None for x in (label, paths, ids)]
        if sum(chosen) != 1:
            raise BadInput("name exactly one of: a label, gallery paths, item ids")
        with self._edit_lock:
            items = self._items()
            gone = _paths_of_label(items, label) if label is not None else _paths_of(items, paths, ids)
            with tempfile.TemporaryDirectory() as tmp:
                listed = Path(tmp) / "remove.txt"
                listed.write_text("".join(f"{p}\n" for p in gone), encoding="utf-8")
                report = build_index(None, self.path, remove=str(listed))
            report.removed_paths = gone
            self._retire_files(gone)
        return report

    def sync(self):
        """Make the index match its gallery folder again (new files added, deleted ones dropped, changed re-embedded)."""
        gallery = self.gallery
        if gallery is None:
            raise BadInput("the index records no gallery to sync from", path=self.path)
        with self._edit_lock:
            return self._build(gallery, append=False)

    def _build(self, gallery: Path, append: bool, only: list[Path] | None = None):
        from shitu_cli.index import build_index

        return build_index(gallery, self.path, append=append, only=only, **self._build_settings())

    def _build_settings(self) -> dict[str, Any]:
        """The embedding settings the index was built with (its recipe.yaml), so edits embed alike."""
        from shitu_cli.artifacts import read_yaml

        recipe = self.path / "recipe.yaml"
        try:
            options = (read_yaml(recipe) or {}).get("options") or {}
        except (ShituError, OSError, AttributeError):
            return {}
        return {k: options[k] for k in BUILD_SETTINGS if options.get(k) is not None}

    def _gallery_folder(self, doing: str) -> Path:
        gallery = self.gallery
        if gallery is None or not gallery.is_dir():
            raise BadInput(f"cannot {doing}: the index's gallery is not a folder ({gallery})",
                           hint="build the index from a folder of label folders", path=self.path)
        return gallery

    def _retire_files(self, paths: Iterable[str]) -> None:
        gallery = self.gallery
        if gallery is None or not gallery.is_dir():
            return
        root = gallery.resolve()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        for text in paths:
            path = Path(text)
            try:
                rel = path.resolve().relative_to(root)
            except ValueError:
                continue  # not a gallery file: nothing to keep sync from re-adding
            if path.is_file():
                target = root / REMOVED_DIR / stamp / rel
                with writing_to(target):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, target)
                if path.parent != root and not any(path.parent.iterdir()):
                    path.parent.rmdir()  # an emptied label folder would only be clutter


def _paths_of_label(items, label: str) -> list[str]:
    gone = sorted({item.path for item in items.values() if item.label == label})
    if not gone:
        import difflib

        labels = sorted({item.label for item in items.values()})
        close = difflib.get_close_matches(label, labels, n=1)
        raise BadInput(f"no label {label!r} in the index", hint=f"did you mean {close[0]!r}?" if close else None)
    return gone


def _paths_of(items, paths, ids) -> list[str]:
    if ids is not None:
        wanted = [int(i) for i in ids]
        missing = [i for i in wanted if i not in items]
        if missing:
            raise BadInput(f"no item with id {missing[0]} in the index")
        return sorted({items[i].path for i in wanted})
    known = {item.path for item in items.values()}
    wanted = [Path(p).resolve().as_posix() if Path(p).is_absolute() or Path(p).exists() else str(p) for p in paths]
    missing = [p for p in wanted if p not in known]
    if missing:
        raise BadInput("no such item in the index", path=missing[0])
    return sorted(set(wanted))


def _copy_into(folder: Path, images: Sequence[Path | str | np.ndarray], names: Sequence[str] | None) -> list[Path]:
    """Write each image into `folder` under a name no other file there has; returns the paths written."""
    from shitu_cli.artifacts import atomic_write_bytes
    from shitu_cli.data.images import is_image_name, read_image

    written: list[Path] = []
    try:
        for position, image in enumerate(images):
            name = names[position] if names is not None else None
            if isinstance(image, np.ndarray):
                data, suffix = _png_bytes(image), ".png"
                stem = Path(name).stem if name else "added"
            else:
                read_image(image)  # refuse what is not an image before it enters the gallery
                data, suffix = Path(image).read_bytes(), Path(image).suffix.lower()
                stem = Path(name or image).stem
                if not is_image_name(Path(f"x{suffix}")):
                    suffix = ".jpg" if data[:2] == b"\xff\xd8" else ".png"
            target = _free_name(folder, _safe_stem(stem), suffix)
            with writing_to(target):
                atomic_write_bytes(target, data)
            written.append(target)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def _png_bytes(rgb: np.ndarray) -> bytes:
    import cv2

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or min(rgb.shape[:2]) < 1:
        raise BadInput(f"an image array must be HxWx3 uint8 RGB, got shape {rgb.shape} {rgb.dtype}")
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise BadInput("could not encode the image array as PNG")
    return encoded.tobytes()


def _safe_stem(stem: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_ " else "_" for c in stem).strip(" _") or "image"
    return cleaned[:80]


def _free_name(folder: Path, stem: str, suffix: str) -> Path:
    candidate, n = folder / f"{stem}{suffix}", 1
    while candidate.exists():
        candidate, n = folder / f"{stem}-{n}{suffix}", n + 1
    return candidate


class Pipeline:
    """Recognise objects in images against an index; sees each new generation of the index once it commits.

    `Pipeline(index)` uses the index's own rec model; `det` adds a mainbody detector (a model dir or
    name). Other keywords are PipelineOptions (topk, rec_thresh, nms_thresh, det_thresh, max_boxes,
    whole_image). Calling it with an image path or an RGB uint8 array gives an ImageResult.
    """

    def __init__(self, index: Index | Path | str = "index", det: Path | str | None = None, rec: Path | str | None = None,
                 backend: str = "auto", threads: int = 1, mkldnn: bool = True, batch_size: int = 32, **options: Any):
        from shitu_cli.infer.pipeline import Pipeline as CorePipeline, PipelineOptions
        from shitu_cli.infer.predictor import PredictorOptions
        from shitu_cli.models.registry import resolve_model_dir

        self.index = index if isinstance(index, Index) else Index(index)
        predictor_options = PredictorOptions(backend=backend, threads=threads, mkldnn=mkldnn)
        self.det_dir = resolve_model_dir(det) if det is not None else None
        detector = None
        if self.det_dir is not None:
            from shitu_cli.infer.detector import Detector

            detector = Detector(self.det_dir, predictor_options)
        self._lock = threading.Lock()
        self._stamp = _manifest_stamp(self.index.path)
        self._core = CorePipeline(self.index.path, rec=resolve_model_dir(rec) if rec is not None else None, detector=detector,
                                  options=PipelineOptions(**options), predictor_options=predictor_options, batch_size=batch_size)

    def current(self):
        """The core pipeline on the index's committed generation, reloaded when a writer has committed since."""
        from shitu_cli.index.store import load_index

        with self._lock:
            stamp = _manifest_stamp(self.index.path)
            if stamp != self._stamp:
                self._core = self._core.with_index(load_index(self.index.path))
                self._stamp = stamp
            return self._core

    @property
    def generation(self) -> int:
        return self.current().index.manifest.generation

    def __call__(self, image: Path | str | np.ndarray, name: str = "image"):
        """One ImageResult for a file path (unreadable: `error` set) or an RGB uint8 array."""
        from shitu_cli.infer.pipeline import ImageResult

        core = self.current()
        if not isinstance(image, np.ndarray):
            return core.predict_file(image)
        recognitions = core.recognise(image)
        return ImageResult(name, recognitions, core.options.whole_image, (image.shape[1], image.shape[0]))

    def recognise(self, rgb: np.ndarray):
        """The recognitions (box, label, score, matches) in one RGB uint8 image."""
        return self.current().recognise(rgb)

    def predict_file(self, path: Path | str):
        """Read and recognise one file, as the core pipeline does (an unreadable file: `error` set)."""
        return self.current().predict_file(path)


def _manifest_stamp(index_dir: Path) -> tuple[int, int, int]:
    # A commit replaces manifest.yaml by rename: a new inode, so the stamp changes even within one mtime tick.
    stat = (Path(index_dir) / "manifest.yaml").stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


class Detect:
    """The detector alone, as `shitu predict IMAGE --det DET --det-only`: each box with the detector's own
    class and score (a multi-class `train-det` export: PP-YOLOE, YOLOv3, PicoDet with --keep-classes).

    >>> Detect("runs/det/export", det_thresh=0.3)("street.jpg").recognitions[0].label
    """

    def __init__(self, det: Path | str, backend: str = "auto", threads: int = 1, mkldnn: bool = True, **options: Any):
        from shitu_cli.infer.detect_only import DetectionOnly
        from shitu_cli.infer.detector import Detector
        from shitu_cli.infer.pipeline import PipelineOptions
        from shitu_cli.infer.predictor import PredictorOptions
        from shitu_cli.models.registry import resolve_model_dir

        self.det_dir = resolve_model_dir(det)
        detector = Detector(self.det_dir, PredictorOptions(backend=backend, threads=threads, mkldnn=mkldnn))
        self._core = DetectionOnly(detector, PipelineOptions(**options))

    def __call__(self, image: Path | str | np.ndarray, name: str = "image"):
        """One ImageResult for a file path (unreadable: `error` set) or an RGB uint8 array."""
        from shitu_cli.infer.pipeline import ImageResult

        if not isinstance(image, np.ndarray):
            return self._core.predict_file(image)
        return ImageResult(name, self._core.recognise(image), "off", (image.shape[1], image.shape[0]))
