"""The detection stage: an RGB image in, mainbody boxes (original pixels, clipped, best first) out.

Preprocessing follows the exported model's infer_cfg.yml (direct resize, mean/std
normalisation, HWC->CHW) but runs as one cv2.resize plus one cv2.LUT pass per channel
that normalises and writes the CHW plane at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shitu_cli.errors import ManifestError
from shitu_cli.infer.predictor import PredictorOptions, build_predictor

INTERPOLATIONS = {"nearest": 0, "linear": 1, "cubic": 2, "area": 3, "lanczos": 4}  # cv2.INTER_* values


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original image pixels
    score: float
    label: str


@dataclass(frozen=True)
class DetPreprocess:
    """What the net expects: (height, width), cv2 interpolation flag, and a per-channel
    uint8 -> float32 lookup table that already holds the normalisation."""

    size: tuple[int, int]
    interpolation: int
    table: np.ndarray  # [3, 256] float32: table[c, v] = normalised value of channel c at pixel value v
    @classmethod
    def from_steps(cls, steps: list[dict[str, Any]], source: Path) -> "DetPreprocess":
        """Build from ppdet's infer_cfg Preprocess list; refuse steps we would silently get wrong."""
        size, interpolation = None, 1
        mean, std, scale = np.zeros(3), np.ones(3), 1.0
        for step in steps:
            kind = step.get("type")
            if kind == "Resize":
                if step.get("keep_ratio", False):
                    raise ManifestError("Resize with keep_ratio is not supported by the det stage", path=source)
                size = (int(step["target_size"][0]), int(step["target_size"][1]))
                interpolation = int(step.get("interp", 1))
            elif kind == "NormalizeImage":
                if step.get("norm_type", "mean_std") == "mean_std":
                    mean, std = np.asarray(step["mean"], float), np.asarray(step["std"], float)
                scale = 1 / 255.0 if step.get("is_scale", True) else 1.0
            elif kind != "Permute":
                raise ManifestError(f"preprocessing step {kind!r} is not supported by the det stage", path=source)
        if size is None:
            raise ManifestError("preprocessing has no Resize step", path=source)
        values = np.arange(256, dtype=np.float64)  # with is_scale False, mean/std are in pixel units
        table = (values[None, :] * scale - mean[:, None]) / std[:, None]
        return cls(size, interpolation, np.ascontiguousarray(table, dtype=np.float32))

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image [1,3,H,W] float32, scale_factor [1,2] = (H/h, W/w)) for one HxWx3 uint8 RGB image."""
        import cv2

        height, width = rgb.shape[:2]
        net_h, net_w = self.size
        resized = cv2.resize(rgb, (net_w, net_h), interpolation=self.interpolation)
        blob = np.empty((1, 3, net_h, net_w), np.float32)
        # cv2.LUT into each CHW plane: normalise + transpose in one SIMD pass per channel
        # (np.take with out= takes a slow buffered path here, ~20x slower).
        for channel, plane in enumerate(cv2.split(resized)):
            cv2.LUT(plane, self.table[channel].reshape(256, 1), dst=blob[0, channel])
        scale_factor = np.array([[net_h / height, net_w / width]], np.float32)
        return blob, scale_factor


def postprocess(boxes: np.ndarray, count: int | None, labels: list[str], image_size: tuple[int, int],
                thresh: float, max_boxes: int) -> list[Detection]:
    """ppdet NMS rows (class, score, x1, y1, x2, y2) -> Detections: score >= thresh, clipped to the
    image (width, height), empty boxes dropped, best first, at most max_boxes."""
    rows = np.asarray(boxes, dtype=np.float32).reshape(-1, 6)
    if count is not None:
        rows = rows[: int(count)]
    rows = rows[(rows[:, 0] >= 0) & (rows[:, 1] >= thresh)]  # class -1 pads an empty result
    width, height = image_size
    rows = rows[np.argsort(-rows[:, 1], kind="stable")]
    detections = []
    for cls, score, x1, y1, x2, y2 in rows:
        x1, x2 = float(np.clip(x1, 0, width)), float(np.clip(x2, 0, width))
        y1, y2 = float(np.clip(y1, 0, height)), float(np.clip(y2, 0, height))
        if x2 <= x1 or y2 <= y1:
            continue
        label = labels[int(cls)] if 0 <= int(cls) < len(labels) else str(int(cls))
        detections.append(Detection((x1, y1, x2, y2), float(score), label))
        if len(detections) >= max_boxes:
            break
    return detections


class Detector:
    """A PicoDet exported by `shitu train-det` (or any ppdet export with NMS and a shitu.yaml)."""

    def __init__(self, model_dir: Path | str, options: PredictorOptions | None = None):
        self.model_dir = Path(model_dir)
        # predict's default backend (auto), so a notebook's Detector runs what `shitu predict --det` runs
        self.predictor = build_predictor(self.model_dir, options or PredictorOptions(backend="auto"), task="det")
        self.manifest = self.predictor.manifest
        self.labels = list(self.manifest.labels)
        self.preprocess = DetPreprocess.from_steps(self._preprocess_steps(), self.model_dir)

    def _preprocess_steps(self) -> list[dict[str, Any]]:
        """infer_cfg.yml is what ppdet exported with; the manifest is the fallback for models without it."""
        from shitu_cli.artifacts import read_yaml

        infer_cfg = self.model_dir / str(self.manifest.extra.get("infer_cfg", "infer_cfg.yml"))
        if infer_cfg.is_file():
            steps = (read_yaml(infer_cfg) or {}).get("Preprocess")
            if isinstance(steps, list):
                return steps
        pre = self.manifest.preprocess
        return [
            {"type": "Resize", "target_size": list(self.manifest.input_size), "keep_ratio": False,
             "interp": INTERPOLATIONS.get(pre.interpolation, 1)},
            {"type": "NormalizeImage", "mean": list(pre.mean), "std": list(pre.std),
             "is_scale": bool(self.manifest.extra.get("is_scale", True))},
            {"type": "Permute"},
        ]

    def raw(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The exported net's own outputs for one image: NMS rows [N,6] and the box count."""
        image, scale_factor = self.preprocess(rgb)
        boxes, count = self.predictor.run({"image": image, "scale_factor": scale_factor})[:2]
        return boxes, count

    def detect(self, rgb: np.ndarray, thresh: float = 0.2, max_boxes: int = 5) -> list[Detection]:
        boxes, count = self.raw(rgb)
        height, width = rgb.shape[:2]
        return postprocess(boxes, int(np.asarray(count).reshape(-1)[0]), self.labels, (width, height), thresh, max_boxes)
