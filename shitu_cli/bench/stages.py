"""One benchmark setting (backend x threads x oneDNN x precision x batch): its models, and the stage-by-stage
processing of a batch of files with the code `shitu predict` runs, split where the clock needs to see the seams."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from shitu_cli.bench.timing import StageTimer
from shitu_cli.errors import WorkFailed
from shitu_cli.infer.predictor import PredictorOptions, build_predictor

END_TO_END = "end to end"
OK = "ok"  # a setting row's status when it ran


@dataclass(frozen=True)
class Setting:
    backend: str
    threads: int
    mkldnn: bool | None  # None where the backend has no such switch (onnxruntime, openvino)
    precision: str
    batch: int

    @property
    def label(self) -> str:
        parts = [self.backend, self.precision, f"{self.threads}t"]
        if self.mkldnn is not None:
            parts.append("onednn" if self.mkldnn else "no-onednn")
        if self.batch != 1:
            parts.append(f"b{self.batch}")
        return " ".join(parts)


class SettingRun:
    """The models of one setting and the stage-by-stage processing of one batch of files.

    Each stage calls the code `shitu predict` runs (Detector, pipeline crops, preprocess,
    predictor, faiss search), split where the clock needs to see the seams.
    """

    def __init__(self, setting: Setting, dirs: dict[str, Path], int8_dirs: dict[str, Path], index_dir: Path | None = None):
        from shitu_cli.infer.pipeline import PipelineOptions

        self.setting = setting
        self.pipeline_options = PipelineOptions()
        self.predictors, self.manifests = {}, {}
        self.detector = None
        for task, model_dir in dirs.items():
            # An int8 setting quantizes the models that have an int8 twin; the others stay fp32.
            quantized = setting.precision == "int8" and task in int8_dirs
            precision = "fp32" if setting.precision == "int8" and not quantized else setting.precision
            options = PredictorOptions(
                backend=setting.backend, threads=setting.threads,
                mkldnn=True if setting.mkldnn is None else setting.mkldnn, precision=precision,
            )
            path = int8_dirs[task] if quantized else model_dir
            try:
                self._load(task, path, options)
            except WorkFailed as exc:
                # Name the model: with det + rec + cls, "cannot convert" alone does not say which.
                raise WorkFailed(f"{task}: {exc.message}", hint=exc.hint, path=exc.path) from None
        self.index = _load_index(index_dir, setting.threads) if index_dir is not None and "rec" in dirs else None

    def _load(self, task: str, path: Path, options: PredictorOptions) -> None:
        if task == "det":
            from shitu_cli.infer.detector import Detector

            self.detector = Detector(path, options)
            self.predictors[task] = self.detector.predictor
        else:
            self.predictors[task] = build_predictor(path, options, task=task)
        self.manifests[task] = self.predictors[task].manifest

    def size_mb(self) -> float:
        files = [f for p in self.predictors.values() for f in p.model_files]
        return sum(Path(f).stat().st_size for f in files) / 1e6

    def process(self, paths: Sequence[Path], timer: StageTimer) -> dict[str, list[np.ndarray]]:
        """Decode, detect, crop, preprocess, infer and search one batch of files; return each model's outputs."""
        from shitu_cli.data.images import read_image

        n = len(paths)
        outputs: dict[str, list[np.ndarray]] = {}
        with timer.stage(END_TO_END, n):
            with timer.stage("decode", n):
                images = [read_image(p) for p in paths]
            boxes = self._detect(images, timer, outputs) if self.detector else [None] * n
            if "rec" in self.predictors:
                features = self._embed(images, boxes, timer, outputs)
                if self.index is not None:
                    with timer.stage("search", n):
                        self._search(features)
            if "cls" in self.predictors:
                self._classify(images, timer, outputs)
        return outputs

    def _detect(self, images: list[np.ndarray], timer: StageTimer, outputs: dict[str, list[np.ndarray]]) -> list:
        from shitu_cli.infer.detector import postprocess

        n, options, found = len(images), self.pipeline_options, []
        for rgb in images:
            with timer.stage("det preprocess", n):
                image, scale_factor = self.detector.preprocess(rgb)
            with timer.stage("det inference", n):
                raw, count = self.detector.predictor.run({"image": image, "scale_factor": scale_factor})[:2]
            with timer.stage("det postprocess", n):
                height, width = rgb.shape[:2]
                detections = postprocess(raw, int(np.asarray(count).reshape(-1)[0]), self.detector.labels,
                                         (width, height), options.det_thresh, options.max_boxes)
            found.append(detections)
            outputs.setdefault("det", []).append(np.array([d.box for d in detections], np.float32).reshape(-1, 4))
        return found

    def _embed(self, images: list[np.ndarray], detections: list, timer: StageTimer, outputs: dict[str, list[np.ndarray]]) -> np.ndarray:
        from shitu_cli.infer.embedder import l2_normalise
        from shitu_cli.infer.pipeline import boxes_to_recognise, crop
        from shitu_cli.infer.preprocess import preprocess_batch

        n, manifest = len(images), self.manifests["rec"]
        with timer.stage("crop + rec preprocess", n):
            crops = []
            for rgb, found in zip(images, detections):
                if found is None:
                    crops.append(rgb)  # no detector: the whole image is the one crop
                    continue
                height, width = rgb.shape[:2]
                crops.extend(crop(rgb, box) for box, _ in boxes_to_recognise(found, width, height, self.pipeline_options.whole_image))
            batch = preprocess_batch(crops, manifest.preprocess, tuple(manifest.input_size)) if crops else None
        with timer.stage("rec inference", n):
            features = l2_normalise(self.predictors["rec"].run(batch)[0]) if batch is not None else np.zeros((0, 1), np.float32)
        outputs.setdefault("rec", []).append(features)
        return features

    def _search(self, features: np.ndarray) -> None:
        from shitu_cli.index import backend
        from shitu_cli.infer.pipeline import NEIGHBOURS_PER_LABEL, top_labels

        stored, topk = self.index, self.pipeline_options.topk
        if len(features) and stored.index.ntotal:
            scores, ids = backend.search(stored.index, features, min(stored.index.ntotal, topk * NEIGHBOURS_PER_LABEL + 8))
            for row_scores, row_ids in zip(scores, ids):
                top_labels(row_scores, row_ids, stored.items, topk)

    def _classify(self, images: list[np.ndarray], timer: StageTimer, outputs: dict[str, list[np.ndarray]]) -> None:
        from shitu_cli.infer.preprocess import preprocess_batch

        n, manifest = len(images), self.manifests["cls"]
        with timer.stage("cls preprocess", n):
            batch = preprocess_batch(images, manifest.preprocess, tuple(manifest.input_size))
        with timer.stage("cls inference", n):
            outputs.setdefault("cls", []).append(self.predictors["cls"].run(batch)[0])


def _load_index(index_dir: Path, threads: int):
    from shitu_cli.index import backend, load_index

    backend.set_threads(threads)
    return load_index(Path(index_dir))


def batches(paths: Sequence[Path], size: int) -> list[list[Path]]:
    return [list(paths[i : i + size]) for i in range(0, len(paths), size)]


def with_threads(threads: int, func: Callable[[], Any]) -> Any:
    """Preprocessing (OpenCV) gets the same thread budget as inference."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(threads)
    try:
        return func()
    finally:
        cv2.setNumThreads(before)
