"""Markdown for benchmarks/vs_paddleclas.md from the measurements benchmarks/vs_paddleclas.py collects."""

from __future__ import annotations

import statistics
from datetime import datetime, timezone

GOAL = 2.0


def ratio(ours: list[float], theirs: list[float], higher_is_better: bool = False) -> tuple[float, float, float]:
    """Per-round PaddleClas/shitu ratios (>1: shitu better): median, min, max."""
    ratios = [(o / t) if higher_is_better else (t / o) for o, t in zip(ours, theirs)]
    return statistics.median(ratios), min(ratios), max(ratios)


def _spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    half = (max(values) - min(values)) * scale / 2
    return f"{statistics.median(values) * scale:.{digits}f} ±{half:.{digits}f}"


def _row(name: str, ours: list[float], theirs: list[float], unit_scale: float, digits: int, higher: bool, goal: float | None) -> str:
    mid, low, high = ratio(ours, theirs, higher)
    verdict = "" if goal is None else ("meets" if mid >= goal else "**short**")
    return (f"| {name} | {_spread(ours, unit_scale, digits)} | {_spread(theirs, unit_scale, digits)} | "
            f"{mid:.2f}x ({low:.2f}-{high:.2f}) | {verdict} |")


def render_markdown(results: dict, args) -> str:
    from shitu_cli.bench.system import cpu_model

    lines = [
        "# shitu vs PaddleClas's own scripts, end to end",
        "",
        f"Written by `benchmarks/vs_paddleclas.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_model()}, "
        f"on a machine other jobs shared (2 cores): read the ratios, not the absolute times.",
        "",
        f"- Models, the same for both: det `{results['models']['det']}`, rec `{results['models']['rec']}` "
        f"({results['models']['source']} demo models). PaddleClas runs them on Paddle Inference with oneDNN, as its "
        "configs say; shitu runs what `--backend auto` chose on this machine (named per table).",
        f"- Images: the {results['images']} demo query scenes (assets/demo/queries). Thresholds: each tool's defaults, "
        "which agree (det 0.2, at most 5 boxes, rec 0.5); PaddleClas also recognises the whole image every time.",
        f"- Interleaved: the tools take turns ({args.rounds} rounds in one process, {args.process_rounds} for whole "
        "processes, after one untimed warm-up each). Values: median ± half the range; ratios: PaddleClas time / "
        "shitu time per round, median (min-max). Above 1: shitu is faster.",
        "",
    ]
    for threads, measured in sorted(results["threads"].items()):
        per, folder, proc, build = measured["per_image"], measured["folder"], measured["process"], measured["build"]
        backends = measured["backends"]
        lines += [
            f"## {threads} thread(s)",
            "",
            f"shitu's backends (auto): det {backends['det']}, rec {backends['rec']}.",
            "",
            f"| comparison | shitu | PaddleClas | ratio | goal {GOAL:.0f}x |",
            "|---|---|---|---|---|",
            _row("per image, decoded, in one process (ms)", per["shitu"], per["PaddleClas"], 1000, 1, False, GOAL),
            _row(f"folder of {results['images']} files, in one process (img/s)", folder["shitu"], folder["PaddleClas"], 1, 1, True, None),
            _row(f"whole process on {results['images']} images (s)", proc["wall"]["shitu"], proc["wall"]["PaddleClas"], 1, 2, False, GOAL),
            _row(f"build-index, whole process, {measured['gallery_count']} images (img/s)", build["img_s"]["shitu"],
                 build["img_s"]["PaddleClas"], 1, 1, True, GOAL),
            _memory_row(proc["peak_mib"]),
            "",
        ]
    lines += ["## Precision: objects found and extra boxes", "",
              "Ground truth boxes; an object counts as found when the box overlapping it most has its label at IoU >= 0.5; "
              "an extra box overlaps no object at IoU >= 0.5.", "",
              "| scenes | tool | found | extra boxes | precision (right boxes / boxes) |", "|---|---|---|---|---|"]
    for scenes, scores in results["precision"].items():
        for tool, s in scores.items():
            share = s["right"] / s["boxes"] if s["boxes"] else 1.0
            lines.append(f"| {scenes} | {tool} | {s['found']} / {s['objects']} | {s['extra']} | {share:.3f} ({s['right']} / {s['boxes']}) |")
    lines += ["", "## How PaddleClas's scripts ran on Paddle 3.3.1", "",
              "A copy of `deploy/` from the paddleclas 2.6.0 wheel in .venv, patched in a temp folder (the venv is untouched):", ""]
    lines += [f"- {patch}" for patch in results["patches"]]
    lines += ["- `predict_system.py`'s `main()` ran without `draw_bbox_results` (shitu predict draws nothing unless asked).",
              "- Gallery labels with spaces were written with underscores: PaddleClas's id_map splits labels on whitespace.",
              "- Both indexes are exact (faiss Flat, inner product) over the same gallery photos.", "",
              "## What is not measured here", "",
              "- The official PP-ShiTuV2 models (640 px PicoDet, 224 px PP-LCNetV2): not downloadable on this machine; these "
              "are the small built-in demo models, on which fixed per-call costs weigh more.",
              "- A quiet machine: other jobs shared the 2 cores, so absolute numbers swing; the interleaving keeps the "
              "ratios fair, the ranges show how far they moved.", ""]
    return "\n".join(lines)


def _memory_row(peaks: dict) -> str:
    ours, theirs = peaks["shitu"], peaks["PaddleClas"]
    mid = statistics.median(ours) / statistics.median(theirs)
    verdict = "meets" if mid <= 1.0 else "**short**"
    return f"| peak memory, whole predict process (MiB) | {_spread(ours, 1, 0)} | {_spread(theirs, 1, 0)} | {mid:.2f} of PaddleClas's | {verdict} (no higher) |"
