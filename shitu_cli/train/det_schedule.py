"""The learning-rate schedule of a detector run: ppdet's LinearWarmup before CosineDecay or PiecewiseDecay,
with the warm-up fitted to runs too short for the recipe's.

A recipe's warm-up is sized for a full schedule (100 to 1000 steps). A run on a few dozen images for a
few epochs can end inside it: the learning rate never reaches its base value and the detector learns
next to nothing, with no error anywhere. So a warm-up longer than WARMUP_SHARE of the run's steps is cut
to that share (and said so); `--warmup-steps` sets it exactly, cap or not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shitu_cli.errors import BadInput

if TYPE_CHECKING:
    from shitu_cli.train.det_config import DetSettings

# Published detector schedules warm up for 0.3-5 % of the run (PicoDet 300 iterations of ~110k, PP-YOLOE
# 5 of 300 epochs, YOLOv3 4000 of ~500k iterations; Goyal et al.'s ImageNet recipe 5 of 90 epochs). A
# cap of 10 % is twice the longest of those: 90 % of the run trains at or decays from the base lr, and a
# from-scratch start still gets a dozen or more steps of ramp on runs of 100+ steps.
WARMUP_SHARE = 0.1
START_FACTOR = 0.1  # the warm-up starts at a tenth of the base lr
STEP_FRACTIONS = (2 / 3, 11 / 12)  # ppdet's 1x (12 epochs, steps at 8 and 11) and 2x (24: 16 and 22)


@dataclass
class WarmupPlan:
    """The warm-up a run uses, and why: recorded in recipe.yaml (inputs.warmup) and in the result."""

    steps: int  # the warm-up the run trains with
    asked: int  # what the recipe (or --warmup-steps) asked for
    run_steps: int  # the run's planned optimiser steps: steps per epoch x epochs
    capped: bool  # cut to warmup_max_share of the run
    explicit: bool  # set with --warmup-steps: taken as is
    first_decay: int | None = None  # the step of a 1x / 2x schedule's first lr drop

    def note(self) -> str | None:
        """The one warning line a terminal shows, or None when the warm-up fits the run."""
        if self.capped:
            return (f"the recipe's {self.asked}-step warm-up is longer than {WARMUP_SHARE:.0%} of this run's "
                    f"{self.run_steps} steps: warming up for {self.steps} steps instead (set it with --warmup-steps)")
        if self.steps >= self.run_steps:
            return (f"the {self.steps}-step warm-up covers the whole {self.run_steps}-step run: the learning rate "
                    f"never reaches its base value (lower --warmup-steps or train more epochs)")
        if self.first_decay is not None and self.steps >= self.first_decay:
            return (f"the {self.steps}-step warm-up ends after the schedule's first lr drop at step {self.first_decay}: "
                    f"the run never trains at its base lr (lower --warmup-steps)")
        return None


def steps_per_epoch(train_json: Path, batch_size: int) -> int:
    """Optimiser steps per epoch: ppdet trains on the images that have boxes, in full batches (drop_last)."""
    document = json.loads(Path(train_json).read_text(encoding="utf-8"))
    with_boxes = len({a["image_id"] for a in document["annotations"]})
    return max(1, with_boxes // int(batch_size))


def milestones(settings: DetSettings, epochs: int) -> list[int]:
    """The epochs after which a 1x / 2x schedule drops the lr tenfold."""
    return sorted({max(1, round(epochs * f)) for f in STEP_FRACTIONS})


def fit_warmup(settings: DetSettings, epoch_steps: int, epochs: int, explicit: bool) -> WarmupPlan:
    """Cut the warm-up to `warmup_max_share` of the run unless the user set it (`explicit`); updates `settings`
    so that recipe.yaml records the warm-up trained with, which a replay then takes as it is (already short
    enough, so cut no further)."""
    asked, run_steps = int(settings.warmup_steps), epoch_steps * epochs
    if explicit:
        settings.warmup_max_share = 0.0  # a replay of the recipe keeps the user's number too
    cap = max(1, int(run_steps * settings.warmup_max_share)) if settings.warmup_max_share > 0 else asked
    steps = min(asked, cap)
    settings.warmup_steps = steps
    first_decay = None if settings.schedule == "cosine" else epoch_steps * milestones(settings, epochs)[0]
    return WarmupPlan(steps, asked, run_steps, capped=steps < asked, explicit=explicit, first_decay=first_decay)


def check_warmup(settings: DetSettings) -> None:
    if int(settings.warmup_steps) < 0:
        raise BadInput(f"warmup-steps must not be negative, got {settings.warmup_steps}")
    if not 0 <= float(settings.warmup_max_share) <= 1:
        raise BadInput(f"warmup_max_share must be between 0 (no cap) and 1, got {settings.warmup_max_share}")


def learning_rate(settings: DetSettings, epochs: int) -> dict[str, Any]:
    """ppdet's LearningRate section: the warm-up, then cosine decay over the run or the 1x / 2x steps."""
    # ppdet's LinearWarmup takes 0 steps as 1; a 1-step ramp starting at START_FACTOR is the shortest it has
    warmup = {"name": "LinearWarmup", "start_factor": START_FACTOR, "steps": int(settings.warmup_steps)}
    if settings.schedule == "cosine":
        decay = {"name": "CosineDecay", "max_epochs": epochs}
    else:
        decay = {"name": "PiecewiseDecay", "gamma": 0.1, "milestones": milestones(settings, epochs)}
    return {"base_lr": settings.lr, "schedulers": [decay, warmup]}


# ---------------------------------------------------------------- epoch points fitted to short runs

# Epoch-based switches of a recipe, as (setting, what it switches for the note): both are written for the
# recipe's full schedule (PP-YOLO mixes 250 of 270 epochs; PP-YOLOE assigns with ATSS for 30 of 300), so a
# run shorter than the switch never reaches the second phase that the recipe's results depend on.
EPOCH_POINTS = {"mixup_epochs": "mixup", "static_assigner_epochs": "the static (ATSS) assigner"}


@dataclass
class EpochPoint:
    """An epoch-based switch the run uses, and why: recorded in recipe.yaml (inputs.epoch_points)."""

    name: str  # the DetSettings field: mixup_epochs or static_assigner_epochs
    epochs: int  # the first phase trains this many epochs, the rest of the run the second
    asked: int  # what the recipe (or the flag) asked for
    run_epochs: int
    recipe_epochs: int  # the epochs the recipe's schedule was written for
    scaled: bool
    explicit: bool  # set with a flag: taken as is


def scaled_epoch_point(asked: int, run_epochs: int, recipe_epochs: int) -> int:
    """`asked` scaled by run / recipe epochs (rounded down), with at least one epoch before the switch and
    one after it when the run has two; unchanged when the run is not shorter than the recipe's schedule
    (and so on a replay, whose recipe is the run's own) or the switch is off (0)."""
    if asked <= 0 or run_epochs >= recipe_epochs:
        return asked
    scaled = asked * run_epochs // recipe_epochs
    return max(1, min(scaled, run_epochs - 1)) if run_epochs >= 2 else 1


def fit_epoch_points(settings: DetSettings, asked: dict[str, int], run_epochs: int, recipe_epochs: int,
                     explicit: set[str]) -> list[EpochPoint]:
    """Scale each switch in `asked` (setting name -> epochs) to the run unless a flag set it (`explicit`);
    updates `settings`, so recipe.yaml records the epochs trained with, which a replay takes as they are."""
    points = []
    for name, value in asked.items():
        epochs = int(value) if name in explicit else scaled_epoch_point(int(value), run_epochs, recipe_epochs)
        setattr(settings, name, epochs)
        points.append(EpochPoint(name, epochs, int(value), run_epochs, recipe_epochs,
                                 scaled=epochs != int(value), explicit=name in explicit))
    return points


def epoch_points_note(points: list[EpochPoint]) -> str | None:
    """The one warning line a terminal shows when a switch was scaled to the run, or None."""
    scaled = [p for p in points if p.scaled]
    if not scaled:
        return None
    first = scaled[0]
    changes = ", ".join(f"{EPOCH_POINTS[p.name]} for the first {p.epochs} epochs instead of {p.asked}" for p in scaled)
    flags = " / ".join(f"--{p.name.replace('_', '-')}" for p in scaled)
    return (f"the recipe's epoch switches are set for {first.recipe_epochs} epochs and this run trains "
            f"{first.run_epochs}: {changes} (set them with {flags})")
