"""Official PP-ShiTu / PP-LCNet models by name, the local model cache, and name-or-path resolution.

Every command that takes a model calls `resolve_model_dir` (inference models) or
`resolve_weights` (.pdparams training weights), so users may pass a name from
`shitu models list` wherever a path is accepted.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shitu_cli.artifacts import atomic_write_text
from shitu_cli.errors import BadInput, ManifestError

OFFICIAL_BASE_URL = "https://paddle-imagenet-models-name.bj.bcebos.com"
BASE_URL_ENV = "SHITU_MODEL_BASE_URL"  # a mirror, or a loopback server in tests
REGISTRY_FILE = "registry.json"
REGISTRY_FORMAT = 1
INFERENCE, WEIGHTS = "inference model", "training weights"
LCNET_SCALES = ("x0_25", "x0_35", "x0_5", "x0_75", "x1_0", "x1_5", "x2_0", "x2_5")
# Parameter counts (millions) of the ImageNet PP-LCNet scales, for an approximate size.
LCNET_PARAMS_M = dict(zip(LCNET_SCALES, (1.5, 1.6, 1.9, 2.4, 3.0, 4.5, 6.5, 9.0)))


@dataclass(frozen=True)
class OfficialModel:
    name: str
    task: str  # det | rec | cls
    kind: str  # INFERENCE (a tar holding a Paddle inference model) or WEIGHTS (.pdparams)
    url_path: str  # relative to the base URL, so a mirror only needs the same layout
    arch: str
    approx_mb: float | None  # None where we could not estimate it honestly
    description: str

    @property
    def file_name(self) -> str:
        return self.url_path.rsplit("/", 1)[-1]

    @property
    def url(self) -> str:
        return f"{base_url()}/{self.url_path}"


def _official_models() -> dict[str, OfficialModel]:
    rec_dir = "dygraph/rec/models"
    models = [
        OfficialModel("PP-ShiTuV2-det", "det", INFERENCE,
                      f"{rec_dir}/inference/picodet_PPLCNet_x2_5_mainbody_lite_v1.0_infer.tar",
                      "PicoDet-LCNet_x2_5", 30, "PP-ShiTuV2 mainbody detector (1 class: foreground), 640x640"),
        OfficialModel("PP-ShiTuV2-rec", "rec", INFERENCE,
                      f"{rec_dir}/inference/PP-ShiTuV2/general_PPLCNetV2_base_pretrained_v1.0_infer.tar",
                      "PPLCNetV2_base_ShiTu", 19, "PP-ShiTuV2 general recogniser, 512-d embeddings, 224x224"),
        OfficialModel("PP-ShiTuV2-rec-pretrained", "rec", WEIGHTS,
                      f"{rec_dir}/pretrain/PPShiTuV2/general_PPLCNetV2_base_pretrained_v1.0.pdparams",
                      "PPLCNetV2_base_ShiTu", None, "PP-ShiTuV2 recogniser training weights (for train-rec --pretrained)"),
        # ImageNet weights of the PP-ShiTuV2 backbone's family: they fit PPLCNetV2_base_ShiTu but for its last conv
        OfficialModel("PPLCNetV2_base-pretrained", "cls", WEIGHTS,
                      "dygraph/legendary_models/PPLCNetV2_base_pretrained.pdparams", "PPLCNetV2_base", 26,
                      "PP-LCNetV2 base ImageNet-1k training weights (for train-rec/train-cls --pretrained)"),
    ]
    for scale in LCNET_SCALES:
        arch = f"PPLCNet_{scale}"
        approx = round(LCNET_PARAMS_M[scale] * 4 + 0.5)
        models.append(OfficialModel(arch, "cls", INFERENCE, f"dygraph/inference/{arch}_infer.tar", arch, approx,
                                    f"PP-LCNet {scale} ImageNet-1k classifier, 224x224"))
        models.append(OfficialModel(f"{arch}-pretrained", "cls", WEIGHTS,
                                    f"dygraph/legendary_models/{arch}_pretrained.pdparams", arch, approx,
                                    f"PP-LCNet {scale} ImageNet-1k training weights (for --pretrained)"))
    models += _legendary_weights()
    return {m.name: m for m in models}


# ImageNet-1k training weights of other train-cls families, at the addresses the paddleclas wheel's own
# legendary_models load from (MODEL_URLS; an SSLD file is the same name with _ssld_pretrained). Upstream
# publishes no checksums for them, so, as for every entry here, the sha256 of the first download is
# recorded in the cache's registry.json and every later download or use must match it (trust on first use).
LEGENDARY_WEIGHTS_M = {  # architecture -> (parameters in millions, 1000 classes; has an SSLD variant)
    "ResNet18_vd": (11.7, False), "ResNet34_vd": (21.8, True), "ResNet50_vd": (25.6, True),
    "ResNet101_vd": (44.6, True), "ResNet152_vd": (60.2, False), "ResNet200_vd": (74.9, False),
    "MobileNetV3_small_x1_0": (2.9, True), "MobileNetV3_large_x1_0": (5.5, True),
}


def _legendary_weights() -> list[OfficialModel]:
    models = []
    for arch, (params_m, has_ssld) in LEGENDARY_WEIGHTS_M.items():
        approx = round(params_m * 4 + 0.5)
        models.append(OfficialModel(f"{arch}-pretrained", "cls", WEIGHTS, f"dygraph/legendary_models/{arch}_pretrained.pdparams",
                                    arch, approx, f"{arch} ImageNet-1k training weights (for --pretrained)"))
        if has_ssld:
            models.append(OfficialModel(f"{arch}_ssld-pretrained", "cls", WEIGHTS,
                                        f"dygraph/legendary_models/{arch}_ssld_pretrained.pdparams", arch, approx,
                                        f"{arch} SSLD-distilled ImageNet-1k training weights (for --pretrained)"))
    return models


OFFICIAL_MODELS = _official_models()


def base_url() -> str:
    """$SHITU_MODEL_BASE_URL, else `model_base_url` from `shitu config`, else the official host."""
    from shitu_cli.settings import get_setting

    return (get_setting("model_base_url").value or OFFICIAL_BASE_URL).strip().rstrip("/")


def cache_root() -> Path:
    """$SHITU_HOME/models, else the XDG cache dir (~/.cache/shitu/models)."""
    shitu_home = os.environ.get("SHITU_HOME")
    if shitu_home:
        return Path(shitu_home).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "shitu" / "models"


def downloads_dir() -> Path:
    return cache_root() / "downloads"


def official_model(name: str) -> OfficialModel:
    if name in OFFICIAL_MODELS:
        return OFFICIAL_MODELS[name]
    close = difflib.get_close_matches(name, list(OFFICIAL_MODELS), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "see `shitu models list`"
    raise BadInput(f"unknown model name {name!r}", hint=hint)


def model_for_file(file_name: str) -> OfficialModel | None:
    """The official model whose download is called `file_name` (for `shitu models add` without --name)."""
    return next((m for m in OFFICIAL_MODELS.values() if m.file_name == file_name), None)


# ---------------------------------------------------------------- cache registry


@dataclass
class CachedModel:
    """One entry of the cache's registry.json: where a model lives and the sha256 first seen for it."""

    name: str
    kind: str
    task: str | None
    path: str  # relative to the cache root: a model dir, or a .pdparams file
    source: str  # the URL it was pulled from, or the local path it was added from
    file_name: str
    sha256: str  # of the downloaded file (trust on first use: upstream publishes no sums)
    bytes: int
    added: str  # ISO time
    extra: dict[str, Any] = field(default_factory=dict)

    def location(self) -> Path:
        return cache_root() / self.path


def read_registry() -> dict[str, CachedModel]:
    path = cache_root() / REGISTRY_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {name: CachedModel(**entry) for name, entry in data.get("models", {}).items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise ManifestError(f"model cache registry is unreadable ({exc.__class__.__name__})", path=path,
                            hint="move it aside; `shitu models pull` rebuilds it") from None


def write_registry(entries: dict[str, CachedModel]) -> None:
    document = {"format_version": REGISTRY_FORMAT, "models": {n: asdict(e) for n, e in sorted(entries.items())}}
    atomic_write_text(cache_root() / REGISTRY_FILE, json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def is_cached(entry: CachedModel | None) -> bool:
    if entry is None:
        return False
    location = entry.location()
    if entry.kind == WEIGHTS:
        return location.is_file()
    return (location / "shitu.yaml").is_file()


# ---------------------------------------------------------------- listing


@dataclass
class ModelRow:
    name: str
    task: str | None
    kind: str
    approx_mb: float | None
    cached: bool
    path: Path | None
    url: str | None
    description: str


def list_models() -> list[ModelRow]:
    """Official models first (in a stable order), then anything else added to the cache."""
    registry = read_registry()
    rows = []
    for model in OFFICIAL_MODELS.values():
        entry = registry.get(model.name)
        cached = is_cached(entry)
        rows.append(ModelRow(model.name, model.task, model.kind, model.approx_mb, cached,
                             entry.location() if cached else None, model.url, model.description))
    for name, entry in sorted(registry.items()):
        if name not in OFFICIAL_MODELS and is_cached(entry):
            rows.append(ModelRow(name, entry.task, entry.kind, round(entry.bytes / 2**20, 1), True,
                                 entry.location(), None, f"added from {entry.source}"))
    return rows


# ---------------------------------------------------------------- name-or-path resolution


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.startswith(".") or text.endswith((".pdparams", ".tar", ".yaml"))


def _cached_entry(name: str, kind: str) -> CachedModel | None:
    """The registry entry for a known name (official or added), or None when `name` is no model name."""
    entry = read_registry().get(name)
    official = OFFICIAL_MODELS.get(name)
    if official is None and entry is None:
        return None
    actual_kind = official.kind if official else entry.kind
    if actual_kind != kind:
        other = "resolve_weights / --pretrained" if actual_kind == WEIGHTS else "a model dir option (--rec, --det, --model)"
        raise BadInput(f"{name!r} is {actual_kind}, not {kind}", hint=f"use it with {other}")
    if not is_cached(entry):
        raise BadInput(f"model {name!r} is not downloaded yet", hint=f"run `shitu models pull {name}`")
    return entry


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A model dir path (returned as is, if it exists) or a model name -> its cached dir."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BadInput("expected a model folder, found a file", path=path,
                           hint="pass the folder holding shitu.yaml, or a name from `shitu models list`")
        return path
    if not _looks_like_path(text):
        entry = _cached_entry(text, INFERENCE)
        if entry is not None:
            return entry.location()
        return _unknown(text, INFERENCE)
    raise BadInput("model folder not found", path=path, hint="pass an exported model dir or a name from `shitu models list`")


def resolve_weights(name_or_path: str | os.PathLike) -> Path:
    """A .pdparams path (returned as is, if it exists) or a weights name -> its cached .pdparams file."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_file() or path.suffix != ".pdparams":
            raise BadInput("expected a .pdparams weights file", path=path,
                           hint="pass a .pdparams file, or a name like PPLCNet_x1_0-pretrained from `shitu models list`")
        return path
    if not _looks_like_path(text):
        entry = _cached_entry(_weights_name(text), WEIGHTS)
        if entry is not None:
            _check_weights_sum(entry)
            return entry.location()
        return _unknown(text, WEIGHTS)
    raise BadInput("weights file not found", path=path, hint="pass a .pdparams file or a name from `shitu models list`")


def resolve_training_weights(name_or_path: str | os.PathLike) -> Path:
    """`resolve_weights`, where an official inference model's name stands for its training weights
    (PP-ShiTuV2-rec -> PP-ShiTuV2-rec-pretrained, PPLCNet_x1_0 -> PPLCNet_x1_0-pretrained): what
    train --pretrained means by a model name."""
    text = str(name_or_path)
    twin = OFFICIAL_MODELS.get(f"{text}-pretrained")
    official = OFFICIAL_MODELS.get(text)
    if not Path(text).expanduser().exists() and official and official.kind == INFERENCE and twin and twin.kind == WEIGHTS:
        return resolve_weights(twin.name)
    return resolve_weights(text)


def _check_weights_sum(entry: CachedModel) -> None:
    """Weights are used only while they match the sha256 recorded when they were pulled or added."""
    from shitu_cli.artifacts import sha256_file

    if sha256_file(entry.location()) != entry.sha256:
        raise BadInput(f"cached weights {entry.name} changed since they were installed (sha256 differs)",
                       path=entry.location(), hint=f"`shitu models pull {entry.name} --force` downloads them again")


def _weights_name(text: str) -> str:
    """`ResNet50_vd_ssld` as short for `ResNet50_vd_ssld-pretrained`, where the short name is no model itself."""
    full = f"{text}-pretrained"
    known = text in OFFICIAL_MODELS or text in read_registry()
    return full if not known and full in OFFICIAL_MODELS else text


OFFICIAL_REC = "PP-ShiTuV2-rec"


def default_rec_model() -> tuple[Path, str]:
    """The rec model to use when none is named, and a few words saying which it is.

    `shitu config set rec ...` (or $SHITU_REC) first, then the official PP-ShiTuV2 recogniser
    if `shitu models pull` has cached it, then the small built-in demo recogniser.
    """
    from shitu_cli.settings import get_setting

    configured = get_setting("rec")
    if configured.value:
        return resolve_model_dir(configured.value), f"the configured rec model ({configured.source})"
    entry = read_registry().get(OFFICIAL_REC)
    if is_cached(entry):
        return entry.location(), f"the official {OFFICIAL_REC} (cached)"
    from shitu_cli.demo import DEMO_MODELS

    built_in = DEMO_MODELS / "rec"
    if (built_in / "shitu.yaml").is_file():
        return built_in, (f"the built-in demo recogniser (a small model trained on the demo objects; "
                          f"`shitu models pull {OFFICIAL_REC}` or `shitu config set rec DIR` for a real one)")
    raise BadInput("no --rec given and no default rec model is available",
                   hint=f"pass --rec DIR, run `shitu models pull {OFFICIAL_REC}`, or `shitu config set rec DIR`")


def _unknown(text: str, kind: str) -> Path:
    names = [m.name for m in OFFICIAL_MODELS.values() if m.kind == kind]
    close = difflib.get_close_matches(text, names, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "pass a path, or a name from `shitu models list`"
    raise BadInput(f"{text!r} is neither an existing path nor a known model name", hint=hint)
