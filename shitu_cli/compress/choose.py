"""`--algo auto`: calibrate INT8 with several PTQ algorithms, score each against the original on calibration
images held out from calibration, and keep the best.

No single activation-range algorithm suits every model: a model with outlier activations loses most of
its agreement under `avg` and keeps it under `abs_max` or `hist`, and another model the other way round
(measured on the same tiny classifier trained on two CPU vendors). So the user is not asked to guess.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from shitu_cli.compress.candidate import Candidate, Stage, predictor_options
from shitu_cli.compress.images import ImageSet, readable_count
from shitu_cli.compress.source import SourceModel
from shitu_cli.errors import BadInput, WorkFailed

AUTO = "auto"
# Tried in this order; the first of equally good ones wins. Left out for their cost: KL (its threshold search
# took 50 s of CPU on a 64 px PPLCNet_x0_25 where hist took 2 s) and emd (1.4-1.5x mse). Measured CPU seconds,
# 36 images on that classifier / 12 on the demo PicoDet: hist 2.1 / 10.5, abs_max 1.8 / 7.2, avg 2.0 / 6.6,
# mse 3.1 / 16.9.
AUTO_ALGOS = ("hist", "abs_max", "avg", "mse")
HOLD_OUT_EVERY = 4  # every 4th calibration image scores the candidates instead of calibrating them
MIN_TO_SPLIT = 8  # with fewer calibration images, the candidates are scored on the images they calibrated on

Calibrate = Callable[[str, ImageSet, Path], Candidate]  # (algorithm, calibration images, out dir) -> staged INT8 model


# What `closeness` measures, and the order trials are ranked in. A detector ranks by closeness first: on a
# few held-out scenes box F1 ties or misleads, while mAP against the original's boxes followed the real mAP
# (demo detector, 3 held-out scenes: avg had F1 1.0 but the lowest pseudo-mAP of three, and lost 2.1 mAP
# points on the annotated scenes where hist, the pseudo-mAP pick, lost none).
CLOSENESS = {"cls": "mean cosine of the class scores", "rec": "mean cosine of the embeddings",
             "det": "COCO mAP against the original's boxes"}
RANKED_BY = {"cls": ("agreement", "closeness"), "rec": ("agreement", "closeness"), "det": ("closeness", "agreement")}


@dataclass
class AlgoTrial:
    algo: str
    agreement: float | None  # with the original on the scoring images (cls top-1, rec nearest answer, det box F1)
    closeness: float | None  # see CLOSENESS
    error: str | None = None  # why calibrating with this algorithm failed
    chosen: bool = False

    def rank(self, task: str) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in RANKED_BY[task])


@dataclass
class AlgoChoice:
    task: str
    algo: str
    trials: list[AlgoTrial]
    calib_images: int  # images the candidates were calibrated on
    scored_on: int  # images they were scored on
    held_out: bool  # False when there were too few images to hold any out

    def record(self) -> dict[str, Any]:
        """The plain-data form for shitu.yaml, recipe.yaml and --json."""
        return {"picked": self.algo, "calib_images": self.calib_images, "scored_on": self.scored_on,
                "held_out": self.held_out, "closeness": CLOSENESS[self.task], "ranked_by": list(RANKED_BY[self.task]),
                "trials": [{"algo": t.algo, "agreement": t.agreement, "closeness": t.closeness, "error": t.error,
                            "chosen": t.chosen} for t in self.trials]}


def check_algo_choice(algo: str) -> str:
    from shitu_cli.compress.ptq import ALGOS

    if algo != AUTO and algo not in ALGOS:
        raise BadInput(f"unknown PTQ algorithm {algo!r}", hint=f"choose one of: {AUTO}, {', '.join(ALGOS)}")
    return algo


def calibrate_with(algo: str, calib_set: ImageSet, work: Path, calibrate: Calibrate, source: SourceModel,
                   batch_size: int, stage: Stage) -> Candidate:
    """The INT8 candidate for `algo`; with "auto", the best of AUTO_ALGOS, its choice attached."""
    if algo != AUTO:
        return calibrate(algo, calib_set, work / "int8")
    calibration, scoring = split_held_out(calib_set)
    held_out = scoring is not calibration
    stage(f"--algo auto: trying {', '.join(AUTO_ALGOS)}, each scored on {readable_count(scoring)} "
          + ("held-out calibration image(s)" if held_out else "calibration image(s) (too few to hold any out)"))
    score = _scorer(source, scoring, batch_size)
    trials, staged = [], {}
    for name in AUTO_ALGOS:
        try:
            candidate = calibrate(name, calibration, work / f"int8-{name}")
        except WorkFailed as exc:  # one algorithm failing on a graph is no reason to give up on the others
            trials.append(AlgoTrial(name, None, None, error=exc.message))
            continue
        staged[name] = candidate
        trials.append(AlgoTrial(name, *score(candidate)))
    scored = [t for t in trials if t.error is None]
    if not scored:
        raise WorkFailed(f"post-training quantization failed with every algorithm tried ({trials[0].error})",
                         path=source.model_dir)
    best = max(scored, key=lambda t: t.rank(source.task))  # max keeps the first of equals
    best.chosen = True
    for name, candidate in staged.items():
        if name != best.algo:
            shutil.rmtree(candidate.model_dir, ignore_errors=True)
    chosen = staged[best.algo]
    chosen.algo_choice = AlgoChoice(source.task, best.algo, trials, readable_count(calibration), readable_count(scoring), held_out)
    chosen.details["algo_choice"] = chosen.algo_choice.record()
    return chosen


def split_held_out(calib_set: ImageSet) -> tuple[ImageSet, ImageSet]:
    """(calibration part, scoring part): every HOLD_OUT_EVERY-th image scores; both share the set's skip list,
    so an unreadable image is still reported. Too few images: the whole set does both."""
    samples = calib_set.samples
    if len(samples) < MIN_TO_SPLIT:
        return calib_set, calib_set
    scoring = [s for i, s in enumerate(samples) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    calibration = [s for i, s in enumerate(samples) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    return ImageSet(calib_set.source, calibration, calib_set.skipped), ImageSet(calib_set.source, scoring, calib_set.skipped)


def _scorer(source: SourceModel, images: ImageSet, batch_size: int) -> Callable[[Candidate], tuple[float, float]]:
    """A function scoring a staged candidate against the original's outputs on `images` (computed once)."""
    outputs = _detector_outputs if source.task == "det" else _net_outputs
    reference, labels = outputs(source.model_dir, source.manifest, images, batch_size)
    if len(reference) == 0:
        raise BadInput("no calibration image could be read", hint="check the --calib images", path=images.source)

    def score(candidate: Candidate) -> tuple[float, float]:
        values, _ = outputs(candidate.model_dir, candidate.manifest, images, batch_size)
        return closeness_to(source.task, reference, values, labels, list(source.manifest.labels))

    return score


def closeness_to(task: str, reference, values, labels: list[str | None],
                 class_names: list[str] | None = None) -> tuple[float, float]:
    """(agreement, closeness) of a compressed model's outputs with the original's, rounded so that a
    replayed recipe records the same numbers."""
    from shitu_cli.compress.measure import agreement, box_agreement, map_against

    if task == "det":
        found = box_agreement(reference, values)
        return round(found["agreement"], 4), round(map_against(reference, values, class_names or []), 4)
    agreed = agreement(task, reference, values, labels)
    return round(agreed["agreement"], 4), round(mean_cosine(reference, values), 4)


def mean_cosine(before: np.ndarray, after: np.ndarray) -> float:
    """Mean cosine similarity of each row of `before` with the same row of `after`."""
    norms = np.linalg.norm(before, axis=1) * np.linalg.norm(after, axis=1)
    return float(np.mean(np.sum(before * after, axis=1) / np.maximum(norms, 1e-12)))


def _net_outputs(model_dir: Path, manifest, images: ImageSet, batch_size: int):
    from shitu_cli.compress.measure import run_outputs
    from shitu_cli.infer.predictor import build_predictor

    found = run_outputs(build_predictor(model_dir, predictor_options(manifest, 1)), images, manifest, batch_size)
    return found.values, found.labels


def _detector_outputs(model_dir: Path, manifest, images: ImageSet, batch_size: int):
    from shitu_cli.compress.measure import detect_all
    from shitu_cli.infer.detector import Detector

    found, _ = detect_all(Detector(model_dir, predictor_options(manifest, 1)), images)
    return found.per_image, [None] * len(found.per_image)
