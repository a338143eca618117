"""Write benchmarks/det_memory.md: the peak process memory of each deployed train-det family (runtime
included) on Paddle Inference and on onnxruntime, against the 200 MB device budget of PaddleDetection's
power-line inspection case (YOLOv3-MobileNetV1).

It reads the exports benchmarks/families_det.py left in its work folder (run that first) and the demo
detector. Each figure is the resident-set high-water mark (VmHWM) of a fresh process that loads the model
and runs it 20 times (benchmarks/compress_report.py's child); the ONNX conversion happens beforehand in
this process, so the child only loads the cached .onnx.

Then the inspection-style section (benchmarks/det_memory_inspection.py): a YOLOv3-MobileNetV1 trained by
`shitu train-det` on the same real-photo scenes (trained here first when --inspection-run holds no export), its
`shitu compress` variants, on Paddle Inference, onnxruntime and onnxruntime --low-memory. Usage:
    .venv/bin/python benchmarks/det_memory.py [--work /tmp/shitu-families-det] [--inspection-run DIR] [--rounds 3]
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
FRUITS = ROOT.parent / "shared" / "data" / "fruits360"
# How --inspection-run is trained when it holds no export (a short CPU budget: memory does not depend on accuracy).
INSPECTION_TRAIN = ["--recipe", "yolov3-mobilenetv1", "--keep-classes", "--epochs", "10", "--input-size", "160",
                    "--batch-size", "8", "--eval-every", "5", "--schedule", "cosine", "--lr", "0.002"]


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
    from compress_report import machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/shitu-families-det"))
    parser.add_argument("--inspection-run", type=Path, nargs="+", default=None, help="yolov3-mobilenetv1 train-det run "
                        "dirs, one per input size (default: WORK/runs/inspection-yolov3, trained first when it holds no export)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from det_memory.json")
    args = parser.parse_args()
    record = ROOT / "benchmarks" / "det_memory.json"
    if args.report_only:
        write_report(json.loads(record.read_text(encoding="utf-8")), machine())
        return
    results = {"families": family_rows(args.work), "inspection": inspection(args)}
    record.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    write_report(results, machine())


def family_rows(work: Path) -> list[dict]:
    from compress_report import peak_rss_mb

    from shitu_cli.models.manifest import read_model_manifest

    models = {"demo detector (PicoDet, 256 px)": ROOT / "assets" / "demo" / "models" / "det"}
    models.update({recipe: work / "runs" / recipe / "export" for recipe in RECIPES})
    rows = []
    for name, model_dir in models.items():
        if not (model_dir / "shitu.yaml").is_file():
            continue
        manifest = read_model_manifest(model_dir)
        size_mb = (model_dir / manifest.params_file).stat().st_size / 2**20
        paddle_mb = peak_rss_mb(model_dir, "paddle")
        why_not = onnx_ready(model_dir)
        onnx_mb = None if why_not else peak_rss_mb(model_dir, "onnxruntime")
        images = sorted((work / "data" / "images").glob("val_*.jpg"))[:8]
        agreement = None if why_not or not images else round(box_agreement(model_dir, images), 2)
        rows.append({"model": name, "arch": manifest.arch, "input": manifest.input_size[0], "weights_mb": round(size_mb, 1),
                     "paddle_mb": round(paddle_mb), "onnxruntime_mb": onnx_mb and round(onnx_mb), "onnx_note": why_not,
                     "onnx_box_agreement": agreement})
    return rows


def inspection(args) -> dict:
    import subprocess
    import time

    import det_memory_inspection as section

    from shitu_cli.models.manifest import read_model_manifest

    data = args.work / "data"
    runs = args.inspection_run or [args.work / "runs" / "inspection-yolov3"]
    if not (runs[0] / "export" / "shitu.yaml").is_file():
        subprocess.run([sys.executable, "-m", "shitu_cli", "train-det", str(data), "-o", str(runs[0]), *INSPECTION_TRAIN],
                       cwd=ROOT, check=True, capture_output=True)
    started = time.perf_counter()
    groups = {}
    for number, run in enumerate(runs):
        size = read_model_manifest(run / "export").input_size[0]
        groups[f"{size} px"] = section.make_models(run / "export", data, run.parent / f"{run.name}-compressed",
                                                   every_method=number == 0)
    photos = sorted((data / "images").glob("val_*.jpg"))[:16]
    photos += [p for c in ("apple_golden_1", "Cherry 3", "Papaya 2", "Plum 5") for p in sorted((FRUITS / "test" / c).glob("*.jpg"))[:2]]
    rows = section.measure(groups, photos, args.rounds)
    (ROOT / "benchmarks" / "det_memory.rows.json").write_text(json.dumps(rows, indent=1, default=str), encoding="utf-8")
    cli = section.cli_rows(groups, photos, runs[0].parent / "inspection-low-memory-exports")
    (ROOT / "benchmarks" / "det_memory.rows.json").unlink()  # kept only when the CLI part failed
    return {"rows": rows, "cli": cli, "photos": len(photos), "rounds": args.rounds, "seconds": round(time.perf_counter() - started),
            "train": {f"{read_model_manifest(run / 'export').input_size[0]} px": _command_line(run) for run in runs},
            "runs": [str(run) for run in runs]}


def _command_line(run: Path) -> str:
    """How the run was trained, from its recipe.yaml (data and output paths left out)."""
    from shitu_cli.artifacts import read_yaml

    argv = [str(a) for a in read_yaml(run / "recipe.yaml")["argv"][1:]]
    return " ".join(a if not a.startswith("/") else Path(a).name for a in argv)


def write_report(results: dict, host: str) -> None:
    rows = results["families"]
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
    lines += ["", *inspection_lines(results["inspection"])]
    (ROOT / "benchmarks" / "det_memory.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def inspection_lines(found: dict) -> list[str]:
    import det_memory_inspection as section

    trained = "; ".join(f"{size}: `{line}`" for size, line in found["train"].items())
    note = (f"{trained}, on the scenes above (memory and latency do not depend on how well a net is trained); "
            f"{found['photos']} photos: 16 val scenes and 8 Fruits-360 test photos")
    return section.report_lines(found["rows"], found["cli"], note, found["rounds"]) + [
        "", f"The section took {found['seconds']} s (compressing included)."]


if __name__ == "__main__":
    main()
