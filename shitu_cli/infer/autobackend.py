"""`--backend auto` on a model this machine has not measured yet: a short interleaved timing of the installed
backends that give the same outputs as Paddle Inference, recorded by model hash and CPU for every later run.

The same models ran 2.5-10x faster on onnxruntime than on Paddle Inference here (STACK.md), so the default
should not wait for someone to run `shitu benchmark-cpu`. SHITU_AUTO_MEASURE=0 turns this off (auto then
uses what benchmark-cpu recorded, else Paddle).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from shitu_cli.errors import ShituError

ROUNDS = 5  # each backend takes a turn per round, so machine load hits them alike
CALLS_PER_ROUND = 3
REC_COSINE = 0.9999  # fp32 backends computing the same net agree to ~0.9999999 (STACK.md)
DET_MIN_SCORE = 0.1  # boxes this likely are compared; the long tail near 0.025 may reorder
DET_IOU = 0.9
ENV_SWITCH = "SHITU_AUTO_MEASURE"


@dataclass
class BackendTrial:
    backend: str
    status: str  # "ok", "disagrees: ...", "failed: ..."
    ms_p50: float | None = None
    ms_spread: float | None = None


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def measure_and_record(model_dir: Path, manifest, options, candidates: list[str]) -> list[BackendTrial]:
    """Time `candidates` (Paddle first: the reference) on one probe input, interleaved; record the ones
    that agree with Paddle. Returns every trial, including the refused ones and why."""
    from shitu_cli.bench.record import BackendTiming, update_fastest
    from shitu_cli.infer.predictor import PREDICTORS, model_hash_of

    loaded: dict[str, Any] = {}
    trials: dict[str, BackendTrial] = {}
    for backend in candidates:
        try:
            loaded[backend] = PREDICTORS[backend](Path(model_dir), manifest, _replace(options, backend))
        except ShituError as exc:
            trials[backend] = BackendTrial(backend, f"failed: {exc.message}")
    if "paddle" not in loaded:
        return list(trials.values())
    inputs = probe_inputs(manifest, loaded["paddle"].input_names)
    reference = loaded["paddle"].run(inputs)
    for backend, predictor in list(loaded.items())[1:]:
        try:
            verdict = agreement(manifest.task, reference, predictor.run(inputs))
        except ShituError as exc:
            verdict = f"failed: {exc.message}"
        if verdict != "ok":
            trials[backend] = BackendTrial(backend, verdict)
            del loaded[backend]
    timings = interleaved_ms({name: (lambda p=p: p.run(inputs)) for name, p in loaded.items()})
    model_hash = model_hash_of(manifest, Path(model_dir))
    records = []
    for backend, (p50, rounds) in timings.items():
        spread = (max(rounds) - min(rounds)) / 2
        trials[backend] = BackendTrial(backend, "ok", p50, spread)
        records.append(BackendTiming(model_hash, backend, p50, options.threads, bool(options.mkldnn), spread, tuple(rounds)))
    update_fastest(records)
    return [trials[name] for name in candidates if name in trials]


def _replace(options, backend: str):
    import dataclasses

    return dataclasses.replace(options, backend=backend)


def probe_inputs(manifest, input_names: list[str]) -> dict[str, np.ndarray] | np.ndarray:
    """One in-distribution input: a shipped demo photo (random pixels when it is missing), resized and
    normalised as the manifest says; a detector also gets its scale_factor."""
    from shitu_cli.infer.preprocess import normalize_batch, resize_for_model
    from shitu_cli.models.manifest import Preprocess

    rgb = _probe_image()
    height, width = (int(v) for v in manifest.input_size)
    if manifest.task == "det":
        direct = Preprocess(resize="direct", mean=manifest.preprocess.mean, std=manifest.preprocess.std,
                            interpolation=manifest.preprocess.interpolation)
        blob = normalize_batch([resize_for_model(rgb, direct, (height, width))], direct)
        feed = {"image": blob, "scale_factor": np.array([[height / rgb.shape[0], width / rgb.shape[1]]], np.float32)}
        return {name: feed[name] for name in input_names if name in feed}
    return normalize_batch([resize_for_model(rgb, manifest.preprocess, (height, width))], manifest.preprocess)


def _probe_image() -> np.ndarray:
    from shitu_cli.data.images import read_image
    from shitu_cli.demo_data import DEMO_DIR

    path = DEMO_DIR / "queries" / "images" / "scene_005.jpg"
    try:
        return read_image(path)
    except ShituError:
        return np.random.default_rng(0).integers(0, 256, (320, 416, 3), dtype=np.uint8)


def agreement(task: str, reference: list[np.ndarray], other: list[np.ndarray]) -> str:
    """"ok", or what differs: rec/cls outputs by cosine (cls also by top-1), det boxes one to one."""
    if task == "det":
        ours, theirs = (_likely_boxes(outputs) for outputs in (reference, other))
        from shitu_cli.infer.pipeline import greedy_matches

        matched = len(greedy_matches(ours[:, 2:6], theirs[:, 2:6], DET_IOU))
        if len(ours) == len(theirs) == matched:
            return "ok"
        return f"disagrees: {matched} of {len(ours)} boxes match (IoU >= {DET_IOU}), it found {len(theirs)}"
    a, b = (np.asarray(outputs[0], np.float64).reshape(len(outputs[0]), -1) for outputs in (reference, other))
    if a.shape != b.shape:
        return f"disagrees: output shape {b.shape} instead of {a.shape}"
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = float(np.min(np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1.0), 1.0)))
    if cosine < REC_COSINE:
        return f"disagrees: cosine {cosine:.6f} < {REC_COSINE}"
    if task == "cls" and not np.array_equal(a.argmax(1), b.argmax(1)):
        return "disagrees: another top-1 class"
    return "ok"


def _likely_boxes(outputs: list[np.ndarray]) -> np.ndarray:
    rows = np.asarray(outputs[0], np.float32).reshape(-1, 6)
    if len(outputs) > 1:
        rows = rows[: int(np.asarray(outputs[1]).reshape(-1)[0])]
    rows = rows[(rows[:, 0] >= 0) & (rows[:, 1] >= DET_MIN_SCORE)]
    return rows[np.argsort(-rows[:, 1], kind="stable")]


def interleaved_ms(runs: dict[str, Callable[[], Any]], rounds: int = ROUNDS,
                   calls: int = CALLS_PER_ROUND) -> dict[str, tuple[float, list[float]]]:
    """(median ms per call, each round's median) per name; the names take turns each round."""
    for run in runs.values():
        run()  # warm-up: first calls allocate and pick kernels
    samples: dict[str, list[float]] = {name: [] for name in runs}
    medians: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            this_round = []
            for _ in range(calls):
                started = time.perf_counter()
                run()
                this_round.append((time.perf_counter() - started) * 1000.0)
            samples[name].extend(this_round)
            medians[name].append(float(np.median(this_round)))
    return {name: (float(np.median(samples[name])), medians[name]) for name in runs}
