"""A run's checkpoints: last.* for resume, best.pdparams for export, each written atomically and read back
through the array-only unpickler, strictly: a checkpoint that does not fit the model is an error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shitu_cli.artifacts import read_yaml, write_yaml
from shitu_cli.errors import BadInput

CHECKPOINT_DIR = "checkpoints"
LAST_STATE = "last_state.yaml"


class Checkpoints:
    """last.* for resume, best.pdparams for export; each file written atomically."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def best(self) -> Path:
        return self.dir / "best.pdparams"

    @property
    def state_file(self) -> Path:
        return self.dir / LAST_STATE

    def save(self, name: str, state: dict[str, Any]) -> None:
        import paddle

        tmp = self.dir / f".{name}.tmp"
        paddle.save(state, str(tmp))
        tmp.replace(self.dir / name)

    def save_last(self, model, optimizer, schedule, ema, state: dict[str, Any]) -> None:
        self.save("last.pdparams", model.state_dict())
        optimizer_state = rename_accumulators(optimizer.state_dict(), param_names(model), to_structured=True)
        self.save("last.pdopt", {"optimizer": optimizer_state, "schedule": schedule.state_dict()})
        if ema is not None:
            self.save("last.ema.pdparams", ema.module.state_dict())
        # The state file goes last: a kill before it leaves the previous epoch's resume point.
        write_yaml(self.state_file, state)

    def load_last(self, model, optimizer, schedule, ema) -> dict[str, Any] | None:
        from shitu_cli.models.legacy import load_state

        if not self.state_file.is_file():
            return None
        load_into(model, self.dir / "last.pdparams")
        opt_file = self.dir / "last.pdopt"
        opt = load_state(opt_file)
        if not isinstance(opt, dict) or not isinstance(opt.get("optimizer"), dict) or not isinstance(opt.get("schedule"), dict):
            raise BadInput("not an optimiser checkpoint written by shitu", path=opt_file,
                           hint="train into a new run dir, or restore the run's own checkpoints")
        optimizer.set_state_dict(rename_accumulators(opt["optimizer"], param_names(model), to_structured=False))
        schedule.set_state_dict(opt["schedule"])
        if ema is not None and (self.dir / "last.ema.pdparams").is_file():
            load_into(ema.module, self.dir / "last.ema.pdparams")
        return read_yaml(self.state_file)


def load_into(model, path: Path) -> None:
    """Set every weight of `model` from `path` (arrays only); a missing or misshapen weight is an error."""
    model.set_state_dict(fitting_weights(model, path))


def fitting_weights(model, path: Path) -> dict[str, Any]:
    """`path`'s arrays for every weight of `model`, read without running code; BadInput naming the file
    when one is missing or of another shape (paddle itself would only warn and skip it)."""
    from shitu_cli.models.legacy import load_weights

    return weights_that_fit(model, load_weights(path), path)


def weights_that_fit(model, state: dict[str, Any], path: Path) -> dict[str, Any]:
    """`state` restricted to `model`'s weights; BadInput naming `path` when one is missing or misshapen."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [f"{k} {list(state[k].shape)} != {list(own[k].shape)}" for k in own
             if k in state and list(state[k].shape) != list(own[k].shape)]
    if missing or wrong:
        example = wrong[0] if wrong else missing[0]
        raise BadInput(f"checkpoint does not fit this run's model: {len(missing) + len(wrong)} of {len(own)} "
                       f"weights missing or of another shape (e.g. {example})", path=path,
                       hint="it was replaced or belongs to another run; train into a new run dir")
    return {k: state[k] for k in own}


def param_names(model) -> dict[str, str]:
    return {param.name: structured for structured, param in model.named_parameters()}


def rename_accumulators(state: dict[str, Any], names: dict[str, str], to_structured: bool) -> dict[str, Any]:
    """Key optimiser state by structured names: paddle's own names (conv2d_64.w_0) depend on how
    many layers the process built before, so a resumed process would not find them."""
    mapping = names if to_structured else {v: k for k, v in names.items()}
    renamed = {}
    for key, value in state.items():
        new_key = key
        for old, new in mapping.items():
            if key.startswith(old + "_"):
                new_key = new + key[len(old):]
                break
        renamed[new_key] = value
    return renamed
