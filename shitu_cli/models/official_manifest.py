"""shitu.yaml for an official PaddleClas / PaddleDetection inference model, from what their deploy
configs (and a detector's infer_cfg.yml) say about its input size, preprocessing and labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# PaddleDetection's Resize `interp` is an OpenCV flag.
CV2_INTERP_NAMES = {0: "nearest", 1: "linear", 2: "cubic", 3: "area"}
IMAGENET_LABELS = "ppcls/utils/imagenet1k_label_list.txt"


def official_manifest(model, model_dir: Path, model_file: str, params_file: str, origin: str):
    """The shitu.yaml for an official inference model (a registry.OfficialModel), from what PaddleClas's
    deploy configs say about it."""
    from shitu_cli.models.manifest import ModelManifest, Preprocess

    extra: dict[str, Any] = {"official_name": model.name, "source": origin}
    if model.task == "det":
        return _det_manifest(model, model_dir, model_file, params_file, extra)
    if model.task == "rec":
        # PP-ShiTuV2 recognition: straight 224x224 resize, ImageNet normalisation (inference_general.yaml).
        return ModelManifest(task="rec", arch=model.arch, input_size=(224, 224), model_file=model_file,
                             params_file=params_file, preprocess=Preprocess(resize="direct"), embedding_dim=512, extra=extra)
    labels = imagenet_labels()
    if not labels:
        extra["labels_note"] = "ImageNet-1k class ids 0-999; the label list was not found in the paddleclas wheel"
    return ModelManifest(task="cls", arch=model.arch, input_size=(224, 224), model_file=model_file, params_file=params_file,
                         preprocess=Preprocess(resize="short", resize_short=256), labels=labels, extra=extra)


def _det_manifest(model, model_dir: Path, model_file: str, params_file: str, extra: dict[str, Any]):
    from shitu_cli.models.manifest import ModelManifest, Preprocess

    size, preprocess, labels = (640, 640), Preprocess(resize="direct", interpolation="cubic"), ["foreground"]
    infer_cfg = _read_infer_cfg(model_dir / "infer_cfg.yml")
    if infer_cfg is not None:
        extra["infer_cfg"] = "infer_cfg.yml"
        size, preprocess = _det_preprocess(infer_cfg, size, preprocess)
        if isinstance(infer_cfg.get("label_list"), list) and infer_cfg["label_list"]:
            labels = [str(label) for label in infer_cfg["label_list"]]
        if isinstance(infer_cfg.get("NMS"), dict):
            extra["nms"] = {k: v for k, v in infer_cfg["NMS"].items() if isinstance(v, (int, float, str))}
    extra["output"] = "boxes [N, 6]: class, score, x1, y1, x2, y2 in original pixels, plus a box count"
    return ModelManifest(task="det", arch=model.arch, input_size=size, model_file=model_file, params_file=params_file,
                         preprocess=preprocess, labels=labels, input_names=["image", "scale_factor"], extra=extra)


def _read_infer_cfg(path: Path) -> dict[str, Any] | None:
    import yaml

    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # safe_load: data only, no tags that run code
    except (yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _det_preprocess(infer_cfg: dict[str, Any], size: tuple[int, int], preprocess):
    """Input size, interpolation and normalisation from PaddleDetection's infer_cfg.yml `Preprocess` list."""
    import dataclasses

    for op in infer_cfg.get("Preprocess") or []:
        if not isinstance(op, dict):
            continue
        if op.get("type") == "Resize" and isinstance(op.get("target_size"), list) and len(op["target_size"]) == 2:
            size = (int(op["target_size"][0]), int(op["target_size"][1]))
            preprocess = dataclasses.replace(preprocess, interpolation=CV2_INTERP_NAMES.get(op.get("interp"), "linear"))
        if op.get("type") == "NormalizeImage" and len(op.get("mean") or []) == 3 and len(op.get("std") or []) == 3:
            preprocess = dataclasses.replace(preprocess, mean=tuple(map(float, op["mean"])), std=tuple(map(float, op["std"])))
    return size, preprocess


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names shipped in the paddleclas wheel (found without importing paddle)."""
    import importlib.util

    spec = importlib.util.find_spec("paddleclas")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / IMAGENET_LABELS
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            return [line.split(" ", 1)[1].strip() if " " in line else line.strip() for line in lines if line.strip()]
    return []
