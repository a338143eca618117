"""Image classification with an exported cls model: top-k labels and scores, for one image or a folder,
plus the drawn label for --save-vis (Unicode-capable fonts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from shitu_cli.errors import BadInput, ImageReadError
from shitu_cli.infer.draw import draw_labels, encode_image
from shitu_cli.infer.predictor import PredictorOptions

DEFAULT_BATCH = 8


@dataclass
class ClassResult:
    label: str
    score: float  # probability, 0..1
    class_id: int


@dataclass
class ClsImageResult:
    """One input file's outcome: its top-k classes, or the reason it was skipped."""

    path: Path
    top: list[ClassResult] = field(default_factory=list)
    error: str | None = None
    vis_path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Classifier:
    """`Classifier(model_dir).classify(rgbs, topk)`: RGB uint8 images in, top-k (label, score) lists out."""

    def __init__(self, model_dir: Path | str, options: PredictorOptions | None = None, batch_size: int = DEFAULT_BATCH):
        from shitu_cli.infer.predictor import build_predictor

        self.model_dir = Path(model_dir)
        self.predictor = build_predictor(self.model_dir, options, task="cls")
        self.manifest = self.predictor.manifest
        self.batch_size = max(1, batch_size)

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)

    def probabilities(self, rgbs: Sequence[np.ndarray]) -> np.ndarray:
        """(N, classes) probabilities; models exported without a softmax get one applied here."""
        from shitu_cli.infer.preprocess import preprocess_batch

        chunks = []
        for start in range(0, len(rgbs), self.batch_size):
            batch = preprocess_batch(rgbs[start : start + self.batch_size], self.manifest.preprocess, self.manifest.input_size)
            chunks.append(self.predictor.run(batch)[0].astype(np.float32))
        if not chunks:
            return np.zeros((0, len(self.labels)), np.float32)
        scores = np.concatenate(chunks)
        if scores.min() < 0 or not np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
            scores = _softmax(scores)  # e.g. a PaddleClas export whose graph ends at the logits
        return scores

    def classify(self, rgbs: Sequence[np.ndarray], topk: int = 5) -> list[list[ClassResult]]:
        probabilities = self.probabilities(rgbs)
        return [self._top(row, topk) for row in probabilities]

    def _top(self, row: np.ndarray, topk: int) -> list[ClassResult]:
        order = np.argsort(-row, kind="stable")[: max(1, topk)]
        return [ClassResult(self._label(int(i)), float(row[i]), int(i)) for i in order]

    def _label(self, class_id: int) -> str:
        labels = self.manifest.labels
        return labels[class_id] if class_id < len(labels) else str(class_id)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- files and folders


def expand_inputs(paths: Iterable[Path | str]) -> list[tuple[Path, Path]]:
    """(file, name for its drawn copy): files as given, folders as their image files (recursively,
    sorted, named by their path inside the folder). A missing argument or an empty folder is bad input."""
    from shitu_cli.data.images import iter_image_files

    files: list[tuple[Path, Path]] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = [(p, p.relative_to(path)) for p in iter_image_files(path)]
            if not found:
                raise BadInput("folder holds no images", path=path)
            files.extend(found)
        elif path.exists():
            files.append((path, Path(path.name)))
        else:
            raise BadInput("file not found", path=path)
    return files


def predict_cls(
    paths: Iterable[Path | str],
    model_dir: Path | str,
    options: PredictorOptions | None = None,
    topk: int = 5,
    save_vis_dir: Path | str | None = None,
    batch_size: int = DEFAULT_BATCH,
) -> Iterator[ClsImageResult]:
    """Classify every image under `paths`, in order; unreadable files come back with `error` set.

    With `save_vis_dir`, each image is also written there with its top label and score drawn on it.
    """
    from shitu_cli.data.images import read_image

    classifier = Classifier(model_dir, options, batch_size=batch_size)
    files = expand_inputs(paths)
    vis_names: set[str] = set()
    vis_name_of = dict(files)
    for start in range(0, len(files), classifier.batch_size):
        chunk = [path for path, _ in files[start : start + classifier.batch_size]]
        images, results = [], []
        for path in chunk:
            try:
                images.append(read_image(path))
                results.append(ClsImageResult(path))
            except ImageReadError as exc:
                results.append(ClsImageResult(path, error=exc.message))
        good = [r for r in results if r.ok]
        for result, top, rgb in zip(good, classifier.classify(images, topk), images):
            result.top = top
            if save_vis_dir is not None:
                result.vis_path = _save_vis(Path(save_vis_dir), result, rgb, vis_name_of[result.path], vis_names)
        yield from results


def _save_vis(folder: Path, result: ClsImageResult, rgb: np.ndarray, name: Path, taken: set[str]) -> Path:
    from shitu_cli.artifacts import atomic_write_bytes

    lines = [f"{c.label}  {c.score:.2f}" for c in result.top[:3]]
    drawn = draw_labels(rgb, lines)
    target = folder / _unique_name(name, taken)
    atomic_write_bytes(target, encode_image(drawn, target.suffix))
    return target


def _unique_name(name: Path, taken: set[str]) -> str:
    suffix = name.suffix.lower() if name.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png"
    stem = name.with_suffix("").as_posix()
    unique, counter = f"{stem}{suffix}", 1
    while unique in taken:  # two inputs given as files from different folders with one name
        unique, counter = f"{stem}_{counter}{suffix}", counter + 1
    taken.add(unique)
    return unique
