"""The inspection-style section of benchmarks/det_memory.md: a multi-class YOLOv3-MobileNetV1 (a `shitu train-det
--recipe yolov3-mobilenetv1` run), as `shitu compress` makes it smaller, on each runtime and with predict's
--low-memory, against the 200 MB the inspection device leaves for the model.

Each row is a fresh process that does what `shitu predict --det MODEL --det-only` does (Detector +
DetectionOnly over real photos, batch 1, 1 thread) and reports its peak resident set (VmHWM, runtime and
Python included), load time and per-photo latency. Rows take turns, round after round, so machine load hits
them alike; a figure is the median over rounds. One more row runs the `shitu` CLI itself. Models are made
beforehand by the CLI (`shitu compress`), and ONNX conversions and low-memory forms are cached before timing.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_MB = 200

# The child: predict's detection path, timed. argv: model_dir backend low_memory(0/1) photo...
CHILD = """
import json, sys, time
started = time.perf_counter()
from shitu_cli.infer.detect_only import DetectionOnly
from shitu_cli.infer.detector import Detector
from shitu_cli.infer.options import PipelineOptions
from shitu_cli.infer.predictor import PredictorOptions
model_dir, backend, low_memory, photos = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4:]
runner = DetectionOnly(Detector(model_dir, PredictorOptions(backend=backend, threads=1, low_memory=low_memory)),
                       PipelineOptions(det_thresh=0.05))
loaded = time.perf_counter() - started
runner.predict_files(photos[:2])  # warm-up
times, boxes = [], []
for path in photos:
    begin = time.perf_counter()
    result = runner.predict_file(path)
    times.append((time.perf_counter() - begin) * 1000)
    boxes.append([[r.label, r.score, list(r.box)] for r in result.recognitions])
times.sort()
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"peak_mb": peak, "load_s": loaded, "ms_p50": times[len(times) // 2], "boxes": boxes}))
"""
# The CLI itself: VmHWM at exit of `shitu predict ...` run in this child (argv after the first: predict's).
CLI_CHILD = """
import atexit, json, sys
def report():
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
    sys.stderr.write("PEAK " + json.dumps({"peak_mb": peak}) + "\\n")
atexit.register(report)
sys.argv = ["shitu", *sys.argv[1:]]
from shitu_cli.cli import main
main()
"""


def shitu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shitu_cli", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def make_models(export: Path, data: Path, work: Path, every_method: bool = True) -> dict[str, Path | str]:
    """The exported fp32 model and what `shitu compress` makes of it (cached in work); a refusal is kept as text.
    Without `every_method`, ONNX INT8 only (the path that fits, at another input size)."""
    models: dict[str, Path | str] = {"fp32": export}
    calib, evaluation = data / "train.json", data / "val.json"
    jobs = {"onnx-int8": ["--onnx-int8"], "paddle-int8 (ptq avg)": ["--quant", "ptq", "--algo", "avg"],
            "pruned 0.3": ["--prune", "0.3", "--quant", "none", "--epochs", "1"]}
    jobs = jobs if every_method else {"onnx-int8": jobs["onnx-int8"]}
    for name, flags in jobs.items():
        out = work / name.split()[0]
        if not (out / "shitu.yaml").is_file():
            done = shitu("compress", export, "--calib", calib, "--eval", evaluation, "-o", out, "--calib-size", "32",
                         "--runs", "5", "--force", *flags)
            if done.returncode != 0:
                errors = [line for line in done.stderr.splitlines() if line.startswith("error:")] or done.stderr.splitlines()[-1:]
                models[name] = f"`shitu compress {' '.join(flags)}` refused: {errors[0][len('error: '):][:220]}"
                continue
        models[name] = out
    if isinstance(models.get("pruned 0.3"), Path):
        out = work / "pruned-onnx-int8"
        if not (out / "shitu.yaml").is_file():
            shitu("compress", models["pruned 0.3"], "--calib", calib, "-o", out, "--calib-size", "32", "--runs", "5",
                  "--force", "--onnx-int8")
        models["pruned 0.3 + onnx-int8"] = out
    return models


def configurations(models: dict[str, Path | str]) -> list[dict]:
    """(row name, model, backend, low memory) for every model on the runtimes that can run it."""
    rows = []
    for name, model in models.items():
        if not isinstance(model, Path):
            rows.append({"name": name, "note": model})
            continue
        from shitu_cli.models.manifest import read_model_manifest

        onnx_only = read_model_manifest(model).model_file.endswith(".onnx")
        if not onnx_only:
            rows.append({"name": f"{name}, Paddle Inference", "model": model, "backend": "paddle", "low_memory": False})
        if "paddle-int8" not in name:  # paddle2onnx cannot convert Paddle's INT8 ops
            rows.append({"name": f"{name}, onnxruntime", "model": model, "backend": "onnxruntime", "low_memory": False})
            rows.append({"name": f"{name}, onnxruntime --low-memory", "model": model, "backend": "onnxruntime",
                         "low_memory": True})
    return rows


def prepare(rows: list[dict], photos: list[Path]) -> None:
    """Convert and cache (ONNX, low-memory form) once, outside the measured processes."""
    for row in rows:
        if "model" in row:
            run_child(row, photos[:1])


def run_child(row: dict, photos: list[Path]) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(row["model"]), row["backend"], "1" if row["low_memory"] else "0",
                           *map(str, photos)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{row['name']}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cli_peak(model: Path, photos: list[Path], flags: list[str]) -> float:
    done = subprocess.run([sys.executable, "-c", CLI_CHILD, "predict", *map(str, photos), "--det", str(model), "--det-only",
                           *flags, "--threads", "1", "--json"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"shitu predict {model} {flags}: {done.stderr[-2000:]}")
    return json.loads(done.stderr.split("PEAK ")[-1].splitlines()[0])["peak_mb"]


def agreement(reference: list, candidate: list, iou_thresh: float = 0.5) -> float:
    """Share of the reference's boxes (score >= 0.05, top 5 per photo) the candidate also finds: same class, IoU >= 0.5."""
    from shitu_cli.infer.pipeline import greedy_matches

    found = matched = 0
    for ours, theirs in zip(reference, candidate):
        for label in {box[0] for box in ours}:
            wanted = [box[2] for box in ours if box[0] == label]
            found += len(wanted)
            matched += len(greedy_matches(wanted, [box[2] for box in theirs if box[0] == label], iou_thresh))
    return matched / found if found else float("nan")


def measure(groups: dict[str, dict[str, Path | str]], photos: list[Path], rounds: int) -> list[dict]:
    """groups: {"160 px": models, ...}; every timed row of every group takes its turn each round. Agreement is to
    the group's first row (its fp32 model on Paddle Inference)."""
    rows = []
    for prefix, models in groups.items():
        for row in configurations(models):
            rows.append({**row, "name": f"{prefix}, {row['name']}", "group": prefix})
    prepare(rows, photos)
    timed = [row for row in rows if "model" in row]
    samples: dict[str, list[dict]] = {row["name"]: [] for row in timed}
    for _ in range(rounds):
        for row in timed:
            samples[row["name"]].append(run_child(row, photos))
    for row in timed:
        runs = samples[row["name"]]
        reference = samples[next(r["name"] for r in timed if r["group"] == row["group"])][0]["boxes"]
        row.update(peak_mb=statistics.median(r["peak_mb"] for r in runs), ms_p50=statistics.median(r["ms_p50"] for r in runs),
                   load_s=statistics.median(r["load_s"] for r in runs), agreement=agreement(reference, runs[0]["boxes"]),
                   weights_mb=_weights_mb(row["model"]), model=str(row["model"]))
    return rows


def cli_rows(groups: dict[str, dict[str, Path | str]], photos: list[Path], work: Path) -> list[dict]:
    """The `shitu` CLI itself (typer, rich, JSON output included) on each group's fp32 and ONNX INT8 model: with
    --low-memory, and on the folder `shitu export -f onnx --low-memory` writes (which predict runs so unasked)."""
    found = []
    for prefix, models in groups.items():
        for name in ("fp32", "onnx-int8"):
            model = models.get(name)
            if not isinstance(model, Path):
                continue
            exported = work / f"{prefix.replace(' ', '')}-{name}-low-memory"
            if not (exported / "shitu.yaml").is_file():
                int8 = ["--int8"] if name != "fp32" else []
                done = shitu("export", model, "-f", "onnx", "--low-memory", *int8, "-o", exported, "--images", photos[0].parent)
                if done.returncode != 0:
                    raise SystemExit(f"shitu export --low-memory {model}: {done.stderr[-2000:]}")
            for how, det, flags in ((f"predict --det {name} --low-memory", model, ["--low-memory"]),
                                    (f"predict --det ({name} exported with --low-memory)", exported, [])):
                found.append({"group": prefix, "command": how, "peak_mb": cli_peak(det, photos, flags)})
    return found


def _weights_mb(model: Path) -> float:
    from shitu_cli.models.manifest import read_model_manifest

    return (model / read_model_manifest(model).params_file).stat().st_size / 2**20


def report_lines(rows: list[dict], cli: list[dict], photo_note: str, rounds: int) -> list[str]:
    lines = [
        "## The inspection-style model: YOLOv3-MobileNetV1, compressed, against 200 MB",
        "",
        f"Multi-class `shitu train-det --recipe yolov3-mobilenetv1` runs ({photo_note}) and what `shitu compress` makes "
        f"of them. Each row is a fresh process doing what `shitu predict --det MODEL --det-only` does over the photos "
        f"(batch 1, 1 thread, Paddle with oneDNN), {rounds} rounds with the rows taking turns; figures are medians. "
        "Peak = VmHWM, runtime and Python included. Ratios are to the first row of the same input size (fp32 on Paddle "
        "Inference). Agreement: the share of that row's boxes (score >= 0.05, top 5 per photo) the row also finds (same "
        "class, IoU >= 0.5). Each model runs at the input size it was trained and exported at.",
        "",
        "| model, runtime | weights MB | peak MB | peak ratio | p50 ms/photo | latency ratio | load s | agreement | fits 200 MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    bases = {}
    for row in rows:
        if "peak_mb" not in row:
            lines.append(f"| {row['name']} | | | | | | | | {row['note']} |")
            continue
        base = bases.setdefault(row["group"], row)
        lines.append(f"| {row['name']} | {row['weights_mb']:.1f} | {row['peak_mb']:.0f} | {row['peak_mb'] / base['peak_mb']:.2f} | "
                     f"{row['ms_p50']:.1f} | {row['ms_p50'] / base['ms_p50']:.2f} | {row['load_s']:.1f} | "
                     f"{row['agreement']:.2f} | {'yes' if row['peak_mb'] <= BUDGET_MB else 'no'} |")
    fitting = [row["name"] for row in rows if row.get("peak_mb", BUDGET_MB + 1) <= BUDGET_MB]
    cli_fitting = [f"{row['group']} `{row['command']}`" for row in cli if row["peak_mb"] <= BUDGET_MB]
    lines += ["", f"**Within {BUDGET_MB} MB:** {'; '.join(fitting) or 'none'}. Through the CLI: {'; '.join(cli_fitting) or 'none'}. "
              "Paddle Inference fits in no row: `import paddle` alone peaks at about 313 MB (checked by hand beside this run). The INT8 rows' low "
              "agreement is this barely trained net's (mAP about 0.0001): its scores are nearly flat, so INT8 rounding "
              "reorders which boxes survive NMS; it is not a measure of INT8 quality. INT8 quality on a trained detector: "
              "benchmarks/compress_report.md (PicoDet, onnx-int8: box agreement 0.983, mAP 0.624 -> 0.623)."]
    if cli:
        lines += ["", "The `shitu` CLI itself (`shitu predict PHOTOS ... --det-only --threads 1 --json`; typer, rich and the "
                  "JSON output included), one run each:", "", "| input | command | peak MB | fits 200 MB |", "|---|---|---:|---|"]
        lines += [f"| {row['group']} | `{row['command']}` | {row['peak_mb']:.0f} | {'yes' if row['peak_mb'] <= BUDGET_MB else 'no'} |"
                  for row in cli]
    return lines
