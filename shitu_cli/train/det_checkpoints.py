"""train-det checkpoints: ppdet's per-epoch files kept as `last.*`, optimiser state under structured names
(so a resume in any process finds it), resuming, and starting from pretrained weights."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from shitu_cli.errors import BadInput
from shitu_cli.train import distributed


def keep_last(trainer, checkpoints: Path, epoch: int, epochs: int) -> None:
    """ppdet writes a checkpoint per snapshot epoch ({epoch-1}.* or model_final.*); keep only `last.*`."""
    name = "model_final" if epoch == epochs else str(epoch - 1)
    if not (checkpoints / f"{name}.pdopt").is_file():
        return
    for suffix in (".pdparams", ".pdema"):
        if (checkpoints / f"{name}{suffix}").is_file():
            (checkpoints / f"{name}{suffix}").replace(checkpoints / f"last{suffix}")
    translate_optimizer_state(trainer.model, checkpoints / f"{name}.pdopt", checkpoints / "last.pdopt", to_structured=True)
    (checkpoints / f"{name}.pdopt").unlink()


def translate_optimizer_state(model, source: Path, target: Path, to_structured: bool) -> None:
    """ppdet keys optimiser state by paddle's unique names (conv2d_80.w_0), which depend on how many
    layers the process built before; store structured names so a resume in any process finds them."""
    import paddle

    from shitu_cli.models.legacy import load_state
    from shitu_cli.train.checkpoints import param_names, rename_accumulators

    state = load_state(source)  # arrays only: a swapped last.pdopt never runs code
    if not isinstance(state, dict):
        raise BadInput("not an optimiser checkpoint", path=source, hint="restore the run's own checkpoints")
    extras = {k: state.pop(k) for k in ("last_epoch", "LR_Scheduler") if k in state}
    renamed = rename_accumulators(state, param_names(model), to_structured=to_structured)
    tmp = target.with_name(f".{target.name}.tmp")
    paddle.save({**renamed, **extras}, str(tmp))
    tmp.replace(target)


def resume(trainer, checkpoints: Path) -> None:
    """Resume from last.*: translate the optimiser keys back to this process's names first."""
    from shitu_cli.train.checkpoints import fitting_weights

    for suffix in (".pdparams", ".pdema"):
        if (checkpoints / f"last{suffix}").is_file():
            fitting_weights(trainer.model, checkpoints / f"last{suffix}")  # refuse, not skip, what does not fit
    staging = checkpoints / f".resume{distributed.current_world().rank}"  # each rank stages its own copy
    for suffix in (".pdparams", ".pdema"):
        if (checkpoints / f"last{suffix}").is_file():
            shutil.copyfile(checkpoints / f"last{suffix}", staging.with_suffix(suffix))
    translate_optimizer_state(trainer.model, checkpoints / "last.pdopt", staging.with_suffix(".pdopt"), to_structured=False)
    try:
        trainer.resume_weights(str(staging))
    finally:
        for suffix in (".pdparams", ".pdema", ".pdopt"):
            staging.with_suffix(suffix).unlink(missing_ok=True)


def load_pretrained(trainer, path: Path) -> None:
    """ppdet's own name matching (backbone-only weights fit too; misshapen layers start fresh), over
    the array-only reader; a file of which nothing fits is refused rather than silently ignored."""
    from ppdet.utils.checkpoint import match_state_dict

    from shitu_cli.models.legacy import load_weights

    if not match_state_dict(trainer.model.state_dict(), load_weights(path)):
        raise BadInput("no weight in this file fits the detector", path=path,
                       hint="pass PicoDet / LCNet weights (.pdparams)")
    trainer.load_weights(str(path.with_suffix("")))


def restore_best(trainer, state: dict[str, Any]) -> None:
    """ppdet's Checkpointer forgets the best mAP on resume; give it back so a worse epoch cannot replace it."""
    from ppdet.engine.callbacks import Checkpointer

    for callback in trainer._callbacks:
        if isinstance(callback, Checkpointer) and state.get("best_map") is not None:
            callback.best_ap = state["best_map"]
