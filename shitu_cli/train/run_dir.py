"""The run folder of train-cls, train-rec and train-det: refuse to overwrite an earlier run, and let
--resume continue one with the settings its own recipe.yaml recorded.

A run writes recipe.yaml when training starts (the resolved settings, no outputs yet) and again
when it ends (outputs and metrics added), so even a killed run can say how to continue it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from shitu_cli.errors import BadInput

RECIPE_FILE = "recipe.yaml"


def holds_run(run_dir: Path) -> bool:
    """True once a run here has finished an epoch (metrics.csv, a checkpoint) or exported: what -o would
    overwrite. recipe.yaml alone (a run stopped before its first epoch ended) holds nothing to lose."""
    if (run_dir / "metrics.csv").is_file():
        return True
    return any(_has_files(run_dir / name) for name in ("checkpoints", "export"))


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(path.is_file() for path in folder.iterdir())


def next_free(run_dir: Path) -> Path:
    """runs/cls -> runs/cls2 (or cls3, ...): the first sibling name that holds no run."""
    stem = re.sub(r"\d+$", "", run_dir.name) or run_dir.name
    number = 2
    while holds_run(run_dir.with_name(f"{stem}{number}")) or run_dir.with_name(f"{stem}{number}").is_file():
        number += 1
    return run_dir.with_name(f"{stem}{number}")


def check_run_dir(out: Path | str, resume: bool, command: str) -> Path:
    """The run dir to train into. Without --resume one that already holds a run is refused (its
    metrics and checkpoints would be overwritten); with it one must hold a run of `command`."""
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise BadInput("-o must be a folder, not a file", path=run_dir)
    if resume:
        saved_recipe(run_dir, command)
    elif holds_run(run_dir):
        raise BadInput("this folder already holds a training run; refusing to overwrite it",
                       hint=f"continue it with --resume, or train into a new folder such as {next_free(run_dir)}",
                       path=run_dir)
    return run_dir


def saved_recipe(run_dir: Path, command: str):
    """The recipe a run in `run_dir` wrote when it started; BadInput when there is none to resume."""
    from shitu_cli.errors import ManifestError
    from shitu_cli.recipes import read_recipe

    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise BadInput(f"nothing to resume: no {RECIPE_FILE} of an earlier {command} run here",
                       hint="run without --resume to start training", path=run_dir)
    try:
        recipe = read_recipe(path)
    except ManifestError as exc:
        raise BadInput(f"cannot resume: {exc.message}", path=path) from None
    if recipe.command != command:
        raise BadInput(f"nothing to resume: this is a {recipe.command} run, not a {command} one", path=path,
                       hint=f"resume it with `shitu {recipe.command} --resume`")
    return recipe


def changed_settings(saved: Mapping[str, Any], requested: Mapping[str, Any], free: Iterable[str],
                     normalise: Callable[[str, Any], Any] = lambda _key, value: value) -> list[str]:
    """The requested settings (flags given on --resume) that differ from the run's, as 'name old -> new'."""
    free = set(free)
    changed = []
    for key, value in requested.items():
        if value is None or key in free or key not in saved:
            continue
        old, new = normalise(key, saved[key]), normalise(key, value)
        if old != new:
            changed.append(f"{key} {saved[key]!r} -> {value!r}")
    return changed


def refuse_changes(changed: list[str], run_dir: Path) -> None:
    if changed:
        raise BadInput(f"--resume continues the run with its own settings, but these differ: {'; '.join(changed)}",
                       hint="drop those options (only --epochs and --num-workers may change), or train into a new -o",
                       path=Path(run_dir) / RECIPE_FILE)


def same_path(a: Any, b: Any) -> bool:
    return a is None and b is None or (a is not None and b is not None and Path(a).resolve() == Path(b).resolve())
