"""Recognition features: RGB images in, L2-normalised float32 embeddings out, in batches."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from shitu_cli.errors import BadInput, ShituError, WorkFailed
from shitu_cli.infer.predictor import PredictorOptions, build_predictor
from shitu_cli.infer.preprocess import preprocess_batch

DEFAULT_BATCH_SIZE = 32


@dataclass
class EmbedFailure:
    path: str
    reason: str


def l2_normalise(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


# image -> (the crop to embed, its box in the image or None for the whole image)
MainObject = Callable[[np.ndarray], "tuple[np.ndarray, list[float] | None]"]


class Embedder:
    """A rec model (task "rec") as a batched `embed(images) -> [N, D]` function."""

    def __init__(self, model_dir: Path | str, options: PredictorOptions | None = None, batch_size: int = DEFAULT_BATCH_SIZE):
        if batch_size < 1:
            raise BadInput(f"--batch-size must be at least 1, got {batch_size}")
        self.model_dir = Path(model_dir)
        self.predictor = build_predictor(self.model_dir, options, task="rec")
        self.manifest = self.predictor.manifest
        self.batch_size = batch_size
        if not self.manifest.embedding_dim:
            raise BadInput("rec model manifest has no embedding_dim", hint="re-export it with `shitu train-rec`", path=self.model_dir)

    @property
    def dim(self) -> int:
        return int(self.manifest.embedding_dim)

    @property
    def model_hash(self) -> str | None:
        return self.manifest.model_hash

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 images of any sizes -> [N, D] unit vectors, in batches of batch_size."""
        chunks = [self._run(images[start : start + self.batch_size]) for start in range(0, len(images), self.batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)

    def _run(self, images: Sequence[np.ndarray]) -> np.ndarray:
        batch = preprocess_batch(images, self.manifest.preprocess, tuple(self.manifest.input_size))
        features = self.predictor.run(batch)[0]
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise WorkFailed(f"rec model returned features of shape {tuple(features.shape)}, manifest says dim {self.dim}",
                             path=self.model_dir)
        return l2_normalise(features)

    def embed_files(self, paths: Sequence[Path | str], progress: Callable[..., None] | None = None,
                    workers: int = 2, main_object: MainObject | None = None
                    ) -> tuple[list[int], np.ndarray, list[EmbedFailure], list[list[float] | None]]:
        """Embed image files; bad files are skipped. Returns (positions embedded, vectors, failures,
        boxes): with `main_object`, each image's main-object crop is embedded and its box returned.

        Decoding runs in a small thread pool (Pillow and OpenCV release the GIL) while the
        model works on the previous batch.
        """
        from shitu_cli.data.images import read_image

        def load(position: int):
            try:
                return position, read_image(paths[position]), None
            except ShituError as exc:
                return position, None, EmbedFailure(Path(paths[position]).as_posix(), exc.message)

        done, vectors, failures, boxes = [], [], [], []
        started, seen = time.perf_counter(), 0
        batches = [range(start, min(start + self.batch_size, len(paths))) for start in range(0, len(paths), self.batch_size)]
        with ThreadPoolExecutor(max(1, workers)) as pool:
            pending = [pool.submit(load, p) for p in batches[0]] if batches else []
            for number in range(len(batches)):
                loaded = [job.result() for job in pending]
                # Start decoding the next batch before running the model on this one.
                pending = [pool.submit(load, p) for p in batches[number + 1]] if number + 1 < len(batches) else []
                good = [(pos, rgb) for pos, rgb, _ in loaded if rgb is not None]
                failures.extend(f for _, _, f in loaded if f is not None)
                crops = [main_object(rgb) if main_object else (rgb, None) for _, rgb in good]
                if good:
                    vectors.append(self._run([crop for crop, _ in crops]))
                    done.extend(pos for pos, _ in good)
                    boxes.extend(box for _, box in crops)
                seen += len(loaded)
                if progress:
                    progress(len(loaded), **{"img/s": seen / max(time.perf_counter() - started, 1e-9)})
        return done, (np.concatenate(vectors) if vectors else np.zeros((0, self.dim), np.float32)), failures, boxes
