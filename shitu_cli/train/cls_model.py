"""The train-cls network: building it (PP-LCNet, ResNet, ... see models.cls_families), loading pretrained
weights (arrays only), the softmax export wrapper, and the batch-level target tricks (label smoothing,
mixup, CutMix)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from shitu_cli.errors import BadInput


def build_classifier(arch: str, num_classes: int):
    from shitu_cli.models.ppcls import build_arch

    return build_arch({"name": arch, "class_num": num_classes})


def load_pretrained(model, path: Path, arch: str) -> str:
    """Load a local .pdparams into `model`; a classifier head of another class count is left fresh.

    Returns a sentence saying what was loaded; raises BadInput naming the file when it does not fit.
    """
    from shitu_cli.models.cls_families import family_of
    from shitu_cli.models.legacy import load_weights
    from shitu_cli.models.registry import resolve_weights

    path = resolve_weights(path)  # a .pdparams path, or a name such as PPLCNet_x1_0-pretrained
    state = load_weights(path)  # arrays only: a downloaded pickle never runs code
    if not isinstance(state, dict) or not state:
        raise BadInput("not a paddle state dict", path=path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and list(state[k].shape) != list(own[k].shape)]
    head_layer = family_of(arch).head  # fc for most, fc3 (VGG), classifier (MobileNetV4), head (Swin)
    head = {k for k in missing + wrong if k.startswith(f"{head_layer}.")}
    body_problems = [k for k in missing + wrong if k not in head]
    if body_problems:
        raise BadInput(
            f"does not fit {arch}: {len(body_problems)} of {len(own)} weights missing or of another shape (e.g. {body_problems[0]})",
            hint=f"pass {arch} weights, or choose the --model they belong to",
            path=path,
        )
    model.set_state_dict({k: v for k, v in state.items() if k in own and k not in head})
    if head:
        found = state.get(f"{head_layer}.weight")
        classes = f"{found.shape[1]} classes" if found is not None and len(found.shape) == 2 else "another shape"
        return f"loaded {len(own) - len(head)} weights from {path.name}; the classifier head ({classes} there) starts fresh"
    return f"loaded all {len(own)} weights from {path.name}"


class WithSoftmax:
    """Factory for the export wrapper (a paddle Layer), kept lazy so importing this module stays cheap."""

    @staticmethod
    def wrap(model):
        import paddle

        class _Softmax(paddle.nn.Layer):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x):
                return paddle.nn.functional.softmax(self.net(x), axis=-1)

        return _Softmax(model)


# ----------------------------------------------------------------------------- losses


def smooth_targets(labels: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
    """One-hot rows with `smoothing` spread evenly over all classes."""
    targets = np.full((len(labels), num_classes), smoothing / num_classes, np.float32)
    targets[np.arange(len(labels)), labels] += 1.0 - smoothing
    return targets


def mix_batch(images: np.ndarray, targets: np.ndarray, mixup: float, cutmix: float,
              rng: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mixup or CutMix (one per batch, chosen evenly when both are on) with a shuffled copy of the batch."""
    modes = [m for m, alpha in (("mixup", mixup), ("cutmix", cutmix)) if alpha > 0]
    if not modes or len(images) < 2:
        return images, targets
    mode = modes[rng.randint(len(modes))]
    alpha = mixup if mode == "mixup" else cutmix
    lam = float(rng.beta(alpha, alpha))
    order = rng.permutation(len(images))
    if mode == "mixup":
        mixed = lam * images + (1 - lam) * images[order]
    else:
        mixed, lam = _cutmix(images, order, lam, rng)
    return mixed.astype(np.float32), (lam * targets + (1 - lam) * targets[order]).astype(np.float32)


def _cutmix(images: np.ndarray, order: np.ndarray, lam: float, rng: Any) -> tuple[np.ndarray, float]:
    height, width = images.shape[2:]
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy, cx = rng.randint(height), rng.randint(width)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    mixed = images.copy()
    mixed[:, :, top:bottom, left:right] = images[order][:, :, top:bottom, left:right]
    # The label weight follows the area actually pasted, which clipping at the border can shrink.
    return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)


def _inference_form(model):
    """A copy with PPLCNetV2's parallel depthwise branches fused into one conv each (same outputs)."""
    import copy

    fused = copy.deepcopy(model)
    for layer in fused.sublayers():
        if hasattr(layer, "re_parameterize"):
            layer.re_parameterize()
    return fused
