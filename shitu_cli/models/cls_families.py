"""The classifier families train-cls builds from the paddleclas wheel's `legendary_models`: which
architectures each holds, the input sizes each can take, and the name of its classifier layer.

Only plain data and checks live here (no paddle import), so the CLI can list and check models instantly.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from shitu_cli.errors import BadInput


@dataclass(frozen=True)
class ClsFamily:
    name: str
    archs: tuple[str, ...]
    description: str
    head: str = "fc"  # the classifier layer: its weights are "<head>.weight" / "<head>.bias"
    size_multiple: int = 1  # the input side must be a multiple of this
    min_size: int = 16
    fixed_size: int | None = None  # the only input side the network takes (a flattening or window head)
    size_rule: str = ""  # why the size rule holds, shown when a size is refused
    recipes: tuple[str, ...] = ()  # shipped recipes/cls names made for this family
    onednn_skip_passes: tuple[str, ...] = ()  # Paddle Inference passes its export must run without

    def input_rule(self, arch: str) -> str:
        fixed = self.fixed_for(arch)
        if fixed:
            return f"{fixed} only"
        if self.size_multiple > 1:
            return f"multiple of {self.size_multiple}"
        return f">= {self.min_size}"

    def fixed_for(self, arch: str) -> int | None:
        if self.fixed_size:
            return self.fixed_size
        match = re.search(r"_(\d{3})$", arch)  # SwinTransformer_*_224 / _384: the window grid is fixed
        return int(match.group(1)) if match and self.name == "SwinTransformer" else None


def _scaled(prefix: str, scales: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{s}" for s in scales.split())


_LCNET_SCALES = "x0_25 x0_35 x0_5 x0_75 x1_0 x1_5 x2_0 x2_5"
_MBV3_SCALES = "x0_35 x0_5 x0_75 x1_0 x1_25"
_HRNET_WIDTHS = "18 30 32 40 44 48 60 64"
_SWIN = ("tiny_patch4_window7_224", "small_patch4_window7_224", "base_patch4_window7_224",
         "base_patch4_window12_384", "large_patch4_window7_224", "large_patch4_window12_384")

# Each rule below was measured on paddle 3.3.1 by training-mode steps, export and Paddle Inference with
# and without oneDNN at small sizes (32-96 px); see tests/test_cls_families.py for the ones kept tested.
FAMILIES: tuple[ClsFamily, ...] = (
    ClsFamily("PP-LCNet", _scaled("PPLCNet_", _LCNET_SCALES), "PP-LCNet: the CPU-first PaddleClas net", recipes=("pplcnet", "tiny", "digits")),
    ClsFamily("PP-LCNetV2", ("PPLCNetV2_small", "PPLCNetV2_base", "PPLCNetV2_large"), "PP-LCNetV2 (re-parameterised before export)"),
    ClsFamily("ResNet", _scaled("ResNet", "18 34 50 101 152"), "ResNet v1.5 (the original stem)"),
    ClsFamily(
        "ResNet-vd", _scaled("ResNet", "18_vd 34_vd 50_vd 101_vd 152_vd 200_vd"),
        "ResNet-D: 3-conv stem, avg-pool shortcuts; the SSLD teachers", size_multiple=32,
        size_rule="oneDNN inference of its ceil-mode avg-pool shortcut fails on an odd feature map (Paddle 3.3)",
        recipes=("resnet-cpu", "resnet50_vd-imagenet"),
    ),
    ClsFamily("MobileNetV1", ("MobileNetV1_x0_25", "MobileNetV1_x0_5", "MobileNetV1_x0_75", "MobileNetV1"), "MobileNetV1"),
    ClsFamily("MobileNetV3", _scaled("MobileNetV3_small_", _MBV3_SCALES) + _scaled("MobileNetV3_large_", _MBV3_SCALES),
              "MobileNetV3 small / large"),
    ClsFamily("MobileNetV4", ("MobileNetV4_conv_small", "MobileNetV4_conv_medium", "MobileNetV4_conv_large"),
              "MobileNetV4 (convolutional)", head="classifier"),
    ClsFamily("MobileNetV4-hybrid", ("MobileNetV4_hybrid_medium", "MobileNetV4_hybrid_large"), "MobileNetV4 with attention",
              head="classifier", size_multiple=32,
              size_rule="its attention reshapes keys strided by 2 on the 1/16 map as H // 2, which fits an even map only"),
    ClsFamily("ESNet", _scaled("ESNet_", "x0_25 x0_5 x0_75 x1_0"), "ESNet (PP-PicoDet's backbone)"),
    ClsFamily("PP-HGNet", ("PPHGNet_tiny", "PPHGNet_small", "PPHGNet_base"), "PP-HGNet (GPU-first)"),
    ClsFamily("PP-HGNetV2", _scaled("PPHGNetV2_", "B0 B1 B2 B3 B4 B5 B6"), "PP-HGNetV2"),
    ClsFamily(
        "HRNet", _scaled("HRNet_W", " ".join(f"{w}_C" for w in _HRNET_WIDTHS.split()))
        + ("SE_HRNet_W64_C",),  # the wheel's ppcls.arch exports only this one SE variant
        "HRNet classifiers", size_multiple=32,
        size_rule="its branches are fused by upsampling x2/x4/x8, so every branch's map must divide evenly",
        # Paddle 3.3's oneDNN placement of its nearest upsample fails at run time ("ConvertPirAttribute2
        # RuntimeAttribute not support ArrayAttribute<DoubleAttribute>"); the rest keeps oneDNN.
        onednn_skip_passes=("onednn_placement_pass",),
    ),
    ClsFamily("InceptionV3", ("InceptionV3",), "Inception v3 (published at 299 px)", min_size=75,
              size_rule="its unpadded stride-2 convs leave no map below 75 px"),
    ClsFamily("VGG", _scaled("VGG", "11 13 16 19"), "VGG", head="fc3", fixed_size=224,
              size_rule="its first fully connected layer reads a 7x7x512 map, i.e. a 224 px input"),
    ClsFamily("SwinTransformer", tuple(f"SwinTransformer_{s}" for s in _SWIN), "Swin Transformer", head="head",
              size_rule="its attention windows and position bias are built for the size in its name"),
)

_BY_ARCH = {arch: family for family in FAMILIES for arch in family.archs}


def all_archs() -> tuple[str, ...]:
    return tuple(_BY_ARCH)


def family_of(arch: str) -> ClsFamily:
    """The family of a known architecture; BadInput listing the families for anything else."""
    family = _BY_ARCH.get(arch)
    if family is None:
        close = difflib.get_close_matches(arch, list(_BY_ARCH), n=1)
        listed = "; ".join(f"{f.name}: {_span(f.archs)}" for f in FAMILIES)
        hint = (f"did you mean {close[0]}? " if close else "") + f"choose from {listed} (`shitu models families` lists them all)"
        raise BadInput(f"unknown model {arch!r}", hint=hint)
    return family


def export_extra(arch: str) -> dict[str, list[str]]:
    """What an export of `arch` records in its shitu.yaml for the predictor (passes to leave out)."""
    passes = family_of(arch).onednn_skip_passes
    return {"onednn_skip_passes": list(passes)} if passes else {}


def head_key(arch: str) -> str:
    """The state-dict key of the classifier's weight matrix ([features, classes]) for `arch`."""
    return f"{family_of(arch).head}.weight"


def check_input_size(arch: str, size: int) -> None:
    """Refuse an input size the architecture cannot train, export or run at, with the nearest that works."""
    family = family_of(arch)
    fixed = family.fixed_for(arch)
    why = f" ({family.size_rule})" if family.size_rule else ""
    if fixed and size != fixed:
        raise BadInput(f"{arch} takes {fixed} px inputs only, got --input-size {size}{why}", hint=f"use --input-size {fixed}")
    if size < family.min_size:
        raise BadInput(f"{arch} needs --input-size >= {family.min_size}, got {size}{why}", hint=f"use --input-size {family.min_size} or more")
    step = family.size_multiple
    if step > 1 and size % step:
        lower, upper = max(step, size // step * step), (size // step + 1) * step
        raise BadInput(f"{arch} needs an --input-size that is a multiple of {step}, got {size}{why}",
                       hint=f"use --input-size {lower} or {upper}")


def _span(archs: tuple[str, ...]) -> str:
    return archs[0] if len(archs) == 1 else f"{archs[0]} ... {archs[-1]}"


@dataclass
class FamilyRow:
    """One family as `shitu models families` shows it."""

    family: str
    models: list[str]
    input_size: str
    head: str
    recipes: list[str]
    pretrained: list[str]  # names from `shitu models list` whose weights fit one of its models
    description: str


def family_rows() -> list[FamilyRow]:
    from shitu_cli.models.registry import OFFICIAL_MODELS, WEIGHTS

    rows = []
    for family in FAMILIES:
        weights = [m.name for m in OFFICIAL_MODELS.values() if m.kind == WEIGHTS and m.arch in family.archs]
        rules = sorted({family.input_rule(a) for a in family.archs})
        rows.append(FamilyRow(family.name, list(family.archs), ", ".join(rules), f"{family.head}.weight",
                              list(family.recipes), weights, family.description))
    return rows
