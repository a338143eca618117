"""What a benchmark leaves behind: per-model backend timings for `--backend auto`, and one CSV row per
setting to compare runs across days and library versions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shitu_cli.bench.stages import OK

if TYPE_CHECKING:
    from shitu_cli.bench.runner import BenchReport
    from shitu_cli.models.manifest import ModelManifest


def backend_timings(report: BenchReport, manifests: dict[str, ModelManifest]) -> list:
    """Each model's inference time per fp32 setting: what `--backend auto` later chooses from."""
    from shitu_cli.bench.record import BackendTiming

    timings = []
    for result in report.results:
        if result.status != OK or result.precision != "fp32":
            continue
        for stats in result.stages:
            task = stats.stage.removesuffix(" inference")
            if stats.stage.endswith(" inference") and manifests.get(task) and manifests[task].model_hash:
                timings.append(BackendTiming(manifests[task].model_hash, result.backend, stats.p50, result.threads,
                                             bool(result.mkldnn), stats.spread, tuple(stats.pass_medians)))
    return timings


def log_rows(report: BenchReport) -> list[dict[str, Any]]:
    """One CSV row per setting: enough to compare runs across days and library versions."""
    from datetime import datetime, timezone

    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    models = " ".join(f"{m.task}:{m.arch}:{(m.model_hash or '')[:12]}" for m in report.models)
    rows = []
    for r in report.results:
        rows.append({
            "time": stamp, "cpu": report.system.cpu, "models": models, "images": report.images,
            "setting": r.setting, "backend": r.backend, "threads": r.threads,
            "mkldnn": "" if r.mkldnn is None else int(r.mkldnn), "precision": r.precision, "batch": r.batch,
            "status": r.status, "size_mb": _round(r.size_mb), "ms_p50": _round(r.ms_p50), "ms_spread": _round(r.ms_spread), "ms_p90": _round(r.ms_p90),
            "ms_p99": _round(r.ms_p99), "fps": _round(r.fps),
            "agreement": ";".join(f"{k}={v:.5f}" for k, v in r.agreement.items()),
            "stages_p50": ";".join(f"{s.stage}={s.p50:.3f}" for s in r.stages),
            "paddle": report.system.versions.get("paddlepaddle", ""), "onnxruntime": report.system.versions.get("onnxruntime", ""),
            "openvino": report.system.versions.get("openvino", ""),
        })
    return rows


def _round(value: float | None, digits: int = 4) -> float | str:
    return "" if value is None else round(float(value), digits)
