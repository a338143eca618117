"""Write benchmarks/det_memory.md: the peak process memory of each deployed train-det family (runtime
included) on Paddle Inference and on onnxruntime, against the 200 MB device budget of PaddleDetection's
power-line inspection case (YOLOv3-MobileNetV1).

It reads the exports benchmarks/families_det.py left in its work folder (run that first) and the demo
detector. Each figure is the resident-set high-water mark (VmHWM) of a fresh process that loads the model
and runs it 20 times (benchmarks/compress_report.py's child); the ONNX conversion happens beforehand in
this process, so the child only loads the cached .onnx. Usage:
    .venv/bin/python benchmarks/det_memory.py [--work /tmp/shitu-families-det]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

BUDGET_MB = 200
RECIPES = ["small", "ppyoloe-cpu", "ppyoloe-s", "ppyoloe-m", "yolov3-mobilenetv1"]


def onnx_ready(model_dir: Path) -> str | None:
    """Convert (and cache) the ONNX model here; None when paddle2onnx converts it, else why not."""
    from shitu_cli.errors import ShituError
    from shitu_cli.infer.predictor import onnx_model
    from shitu_cli.models.manifest import read_model_manifest

    try:
        onnx_model(model_dir, read_model_manifest(model_dir))
        return None
    except ShituError as exc:
        return exc.message.split("(")[-1].rstrip(")")[:80]


def box_agreement(model_dir: Path, images: list[Path]) -> float:
    """Share of Paddle's boxes (score >= 0.05, top 5 per image) that onnxruntime finds too (same class, IoU >= 0.9)."""
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.detector import Detector
    from shitu_cli.infer.pipeline import greedy_matches
    from shitu_cli.infer.predictor import PredictorOptions

    paddle = Detector(model_dir, PredictorOptions(backend="paddle"))
    onnx = Detector(model_dir, PredictorOptions(backend="onnxruntime"))
    found = matched = 0
    for path in images:
        rgb = read_image(path)
        reference, candidates = paddle.detect(rgb, 0.05, 5), onnx.detect(rgb, 0.05, 5)
        for label in {d.label for d in reference}:
            boxes = [d.box for d in reference if d.label == label]
            found += len(boxes)
            matched += len(greedy_matches(boxes, [d.box for d in candidates if d.label == label], 0.9))
    return matched / found if found else float("nan")


def _agreement(value) -> str:
    if value is None:
        return "-"
    return "no box >= 0.05 (untrained)" if value != value else str(value)  # NaN: Paddle found nothing to compare


def main() -> None:
    from compress_report import machine, peak_rss_mb

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/shitu-families-det"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from det_memory.json")
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads((ROOT / "benchmarks" / "det_memory.json").read_text(encoding="utf-8")), machine())
        return
    models = {"demo detector (PicoDet, 256 px)": ROOT / "assets" / "demo" / "models" / "det"}
    models.update({recipe: args.work / "runs" / recipe / "export" for recipe in RECIPES})
    rows = []
    for name, model_dir in models.items():
        if not (model_dir / "shitu.yaml").is_file():
            continue
        from shitu_cli.models.manifest import read_model_manifest

        manifest = read_model_manifest(model_dir)
        size_mb = (model_dir / manifest.params_file).stat().st_size / 2**20
        paddle_mb = peak_rss_mb(model_dir, "paddle")
        why_not = onnx_ready(model_dir)
        onnx_mb = None if why_not else peak_rss_mb(model_dir, "onnxruntime")
        images = sorted((args.work / "data" / "images").glob("val_*.jpg"))[:8]
        agreement = None if why_not or not images else round(box_agreement(model_dir, images), 2)
        rows.append({"model": name, "arch": manifest.arch, "input": manifest.input_size[0], "weights_mb": round(size_mb, 1),
                     "paddle_mb": round(paddle_mb), "onnxruntime_mb": onnx_mb and round(onnx_mb), "onnx_note": why_not,
                     "onnx_box_agreement": agreement})
    (ROOT / "benchmarks" / "det_memory.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    write_report(rows, machine())


def write_report(rows: list[dict], host: str) -> None:
    lines = [
        "# Peak memory of the deployed detectors (runtime included)",
        "",
        f"Written by `benchmarks/det_memory.py` in one run on {host}.",
        "Peak = VmHWM of a fresh process that loads the model and runs it 20 times, batch 1, 1 thread "
        "(Paddle Inference with oneDNN). Models: the demo detector and the exports of `benchmarks/families_det.py` "
        f"(160 px inputs). Budget: {BUDGET_MB} MB, the inspection device's memory left for the model.",
        "",
        "ONNX box agreement: the share of Paddle's boxes (score >= 0.05, top 5, 8 val scenes) that onnxruntime "
        "finds too (same class, IoU >= 0.9); `--backend auto` only ever picks a backend that agrees.",
        "",
        "| model | arch | input px | weights MB | Paddle Inference peak MB | onnxruntime peak MB | ONNX box agreement | fits 200 MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        onnx = row["onnxruntime_mb"] if row["onnxruntime_mb"] is not None else f"no conversion ({row['onnx_note']})"
        fits = [kind for kind, mb in (("paddle", row["paddle_mb"]), ("onnxruntime", row["onnxruntime_mb"]))
                if mb is not None and mb <= BUDGET_MB]
        lines.append(f"| {row['model']} | {row['arch']} | {row['input']} | {row['weights_mb']} | {row['paddle_mb']} | "
                     f"{onnx} | {_agreement(row['onnx_box_agreement'])} | "
                     f"{', '.join(fits) or 'no'} |")
    (ROOT / "benchmarks" / "det_memory.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
