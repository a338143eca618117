"""The dygraph detector behind a det model, for compression: rebuilt from its train-det run dir (ppdet.yml +
best weights) or, for an export alone, from the ppdet model sections shitu writes beside it
(`ppdet_model.yml`) with the weights read back from the export itself (as arrays, never unpickled).
"""

from __future__ import annotations

import collections
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from shitu_cli.compress.source import SourceModel
from shitu_cli.errors import BadInput



def rebuild_detector(source: SourceModel) -> Any:
    """The dygraph PicoDet of `source` in eval mode: from its run dir, else from the export's own weights."""
    from paddle.utils import unique_name

    from shitu_cli.train.det import ppdet_chatter_to

    # Fresh unique names: weight names (and so the INT8 files) must not depend on what this process built before.
    with ppdet_chatter_to(sys.stderr), unique_name.guard():  # stdout is for results (--json)
        return _rebuild(source)


def has_run_dir(source: SourceModel) -> bool:
    from shitu_cli.train.det import PPDET_CONFIG

    return source.run_dir is not None and (source.run_dir / PPDET_CONFIG).is_file()


def _rebuild(source: SourceModel) -> Any:
    if has_run_dir(source):
        from shitu_cli.train.det import load_trained_model

        return load_trained_model(source.run_dir)
    from shitu_cli.train.det import MODEL_SECTIONS

    sections = source.model_dir / MODEL_SECTIONS
    if not sections.is_file():
        raise BadInput(
            "Paddle PTQ of a detector needs its architecture, and neither a train-det run dir (ppdet.yml) "
            f"nor {MODEL_SECTIONS} is beside this export",
            hint="pass the train-det run dir (RUN_DIR, or RUN_DIR/export inside it)",
            path=source.model_dir,
        )
    return _detector_from_export(source.model_dir, sections)


def _detector_from_export(export_dir: Path, sections: Path) -> Any:
    import paddle
    from ppdet.core.workspace import create

    from shitu_cli.models import ppdet_compat
    from shitu_cli.train.det import load_ppdet_config
    from shitu_cli.train.distributed import World, device_for

    ppdet_compat.apply()
    paddle.set_device(device_for(World()))  # the GPU on a CUDA build, else the CPU
    cfg = load_ppdet_config(sections)
    model = create(cfg.architecture)
    exported = _exported_parameters(export_dir, _model_stem(export_dir))
    model.set_state_dict(_weights_by_creation_order(model, exported, sections))
    model.eval()
    return model


def _exported_parameters(export_dir: Path, stem: str) -> dict[str, Any]:
    """{name: array} of an export's weights. Paddle's loader for old-format programs unpickles a
    `<stem>.pdiparams.info` file beside them with no restriction (official tars ship one), so such
    a model is read from a temporary folder holding only its program and weights."""
    import tempfile

    import paddle

    if not (export_dir / f"{stem}.pdiparams.info").exists():
        return {p.name: p.numpy() for p in paddle.jit.load(str(export_dir / stem)).parameters()}
    with tempfile.TemporaryDirectory(prefix="shitu-export-") as tmp:
        for path in export_dir.glob(f"{stem}.*"):
            if not path.name.endswith(".pdiparams.info"):
                shutil.copyfile(path, Path(tmp) / path.name)
        return {p.name: p.numpy() for p in paddle.jit.load(str(Path(tmp) / stem)).parameters()}


def _model_stem(export_dir: Path) -> str:
    from shitu_cli.models.manifest import read_model_manifest

    return Path(read_model_manifest(export_dir).model_file).stem


def _weights_by_creation_order(model: Any, exported: dict[str, np.ndarray], sections: Path) -> dict[str, np.ndarray]:
    """Map the export's parameters onto the model's structured names.

    An export names each parameter after its layer type and creation count (conv2d_41.w_0), counted
    from whatever the exporting process had built before; the same architecture creates its layers
    in the same order, so the i-th conv2d weight here is the i-th one there. The caller then checks
    that the result reproduces the export, which catches any mismatch this could hide.
    """
    own_state = model.state_dict()
    ours = _group_by_kind({param.name: key for key, param in own_state.items()})
    # Constants the net builds itself (the DFL projection: "buffer.<path>" in train-det exports, "eager_tmp_N"
    # in older ones) are not weights.
    weights = [name for name in exported if not name.startswith(("buffer.", "eager_tmp"))]
    theirs = _group_by_kind({re.sub(r"_0$", "", name): name for name in weights})
    # Start from the model's own values: training-only weights (PicoHead's scale_reg) and buffers the
    # net fills itself are not in an export.
    state: dict[str, np.ndarray] = {key: value.numpy() for key, value in own_state.items()}
    for kind, names in theirs.items():
        mine = ours.get(kind, [])
        if len(mine) != len(names):
            _mismatch(sections, f"it builds {len(mine)} {kind[0]}.{kind[1]} weights, the export has {len(names)}")
        for structured, name in zip(mine, names):
            if tuple(state[structured].shape) != tuple(exported[name].shape):
                _mismatch(sections, f"{structured} is {list(state[structured].shape)} here, "
                                    f"{list(exported[name].shape)} in the export")
            state[structured] = exported[name]
    return state


def _mismatch(sections: Path, detail: str) -> None:
    raise BadInput(f"does not match the export beside it: {detail}",
                   hint="restore the ppdet_model.yml written with this export", path=sections)


def _group_by_kind(names: dict[str, str]) -> dict[tuple[str, str], list[str]]:
    """{(layer type, weight suffix): values of `names` ordered by creation count}, from unique names."""
    groups: dict[tuple[str, str], list[tuple[int, str]]] = collections.defaultdict(list)
    for unique_name, value in names.items():
        match = re.fullmatch(r"(.+?)_(\d+)\.(\w+)", unique_name)
        kind, count = ((match.group(1), match.group(3)), int(match.group(2))) if match else ((unique_name, ""), 0)
        groups[kind].append((count, value))
    return {kind: [value for _, value in sorted(items)] for kind, items in groups.items()}
