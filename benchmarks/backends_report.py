"""Write benchmarks/backends_report.md: Paddle Inference vs onnxruntime vs OpenVINO, by threads and precision.

Runs `shitu_cli.bench.runner.benchmark` (what `shitu benchmark-cpu` runs) on the default demo
models, or, where those do not exist yet, on untrained PP-LCNet x1_0 (cls) and
PPLCNetV2_base_ShiTu (rec) models built at their real 224 px input size: latency does not
depend on the weights. Usage: .venv/bin/python benchmarks/backends_report.py [--threads 1,2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_untrained_models(root: Path) -> dict[str, Path]:
    """PP-LCNet x1_0 classifier (1000 classes) and the PP-ShiTuV2 recogniser, exported as training would."""
    from shitu_cli.models.export import export_layer
    from shitu_cli.models.manifest import ModelManifest, Preprocess
    from shitu_cli.models.ppcls import build_arch
    from shitu_cli.train.rec import build_rec_model, embedding_layer, re_parameterize, resolve_settings

    size = (224, 224)
    cls_dir, rec_dir = root / "PPLCNet_x1_0", root / "PPLCNetV2_base_ShiTu"
    if not (cls_dir / "shitu.yaml").is_file():
        classifier = build_arch({"name": "PPLCNet_x1_0", "class_num": 1000})
        manifest = ModelManifest(task="cls", arch="PPLCNet_x1_0", input_size=size, model_file="", params_file="",
                                 preprocess=Preprocess(resize="short", resize_short=256),
                                 labels=[f"class {i}" for i in range(1000)], extra={"weights": "untrained"})
        export_layer(classifier, cls_dir, [[None, 3, *size]], manifest)
    if not (rec_dir / "shitu.yaml").is_file():
        settings = resolve_settings("pp-shituv2", {})
        wrapper = embedding_layer(build_rec_model(settings, class_num=100))
        wrapper.eval()
        re_parameterize(wrapper)
        manifest = ModelManifest(task="rec", arch=f"RecModel/{settings.backbone}", input_size=size, model_file="",
                                 params_file="", preprocess=Preprocess(resize="direct"),
                                 embedding_dim=settings.embedding_size, extra={"weights": "untrained"})
        export_layer(wrapper, rec_dir, [[None, 3, *size]], manifest)
    return {"cls": cls_dir, "rec": rec_dir}


def pick_models(cache: Path) -> tuple[dict[str, Path], str, Path | None]:
    from shitu_cli.bench.inputs import default_setup
    from shitu_cli.errors import BadInput

    try:
        models, index = default_setup()
        return ({task: path for task, path in models.items() if path is not None},
                "the demo models (`shitu demo`: assets/demo/models, or the official ones when cached)", index)
    except BadInput:
        note = ("The built-in demo models did not exist yet, so these are **untrained** PP-LCNet x1_0 (classifier, "
                "1000 classes) and PPLCNetV2_base_ShiTu (PP-ShiTuV2 recogniser, 512-d, re-parameterised) built at "
                "their real 224x224 input size. Latency does not depend on the weights; agreement is measured on "
                "untrained outputs, which are less telling than a trained model's.")
        return build_untrained_models(cache), note, None


def measure(models: dict[str, Path], images: Path, threads: list[int], warmup: int, runs: int,
            index: Path | None = None, int8: list[Path] = ()) -> tuple[dict[str, object], tuple[float, float]]:
    """One benchmark per model (so each table is that model alone), every backend x threads x fp32/bf16
    (plus int8 rows for `int8` models of that task); then, with det + rec + index, the whole pipeline."""
    from shitu_cli.bench.runner import BenchOptions, benchmark
    from shitu_cli.infer.predictor import BACKENDS
    from shitu_cli.models.manifest import read_model_manifest

    options = BenchOptions(backends=BACKENDS, threads=threads, mkldnn=(True,), precisions=("fp32", "bf16"),
                           warmup=warmup, runs=runs)
    load_before = os.getloadavg()[0]
    reports = {}
    for task, path in models.items():
        own_int8 = [p for p in int8 if read_model_manifest(p).task == task]
        task_options = options if not own_int8 else BenchOptions(**{**vars(options), "precisions": ("fp32", "bf16", "int8")})
        reports[task] = benchmark({task: path}, images, task_options, int8_models=own_int8)
    if index is not None and {"det", "rec"} <= set(models):
        pipeline = BenchOptions(backends=("paddle", "onnxruntime"), threads=threads, mkldnn=(True, False), precisions=("fp32",),
                                warmup=warmup, runs=runs)
        reports["pipeline"] = benchmark({"det": models["det"], "rec": models["rec"]}, images, pipeline, index=index)
    return reports, (load_before, os.getloadavg()[0])


def render_markdown(reports: dict[str, object], note: str, threads: list[int], load: tuple[float, float]) -> str:
    first = next(iter(reports.values()))
    system = first.system
    versions = system.versions
    lines = [
        "# CPU backends: Paddle Inference vs onnxruntime vs OpenVINO",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} by `benchmarks/backends_report.py` (the engine of `shitu benchmark-cpu`).",
        "",
        f"- Machine: **{system.cpu}**, {system.physical_cores} physical cores, {system.usable_cpus} usable by the process "
        f"(a shared development VM: 1-minute load average {load[0]:.1f} before the run, {load[1]:.1f} after; "
        "other jobs shared these cores, so read ratios, not absolute milliseconds, and expect 10-30% noise).",
        f"- SIMD: {system.simd_text()}",
        "- Libraries: " + ", ".join(f"{n} {versions.get(n, '?')}" for n in
                                    ("paddlepaddle", "onnxruntime", "openvino", "paddle2onnx", "numpy", "opencv-python-headless")),
        f"- Images: {first.images} files from `{Path(first.image_dir).relative_to(HERE.parent) if Path(first.image_dir).is_relative_to(HERE.parent) else first.image_dir}`, "
        f"decoded from disk every time; {first.warmup} warm-up batches, {first.runs} timed passes per setting, batch 1.",
        f"- Models: {note}",
        "- Paddle runs with oneDNN; onnxruntime and OpenVINO run the ONNX file paddle2onnx made from the same model.",
        "- `vs first` = first row's p50 / this row's p50 (higher is faster). Agreement compares outputs with the first fp32 row.",
        "",
    ]
    for task, report in reports.items():
        described = ", ".join(f"{m.task} {m.arch} {m.input_size[0]}x{m.input_size[1]}" for m in report.models)
        lines += [f"## {task}: {described}", ""]
        if task == "pipeline":
            lines += [f"Decode, det pre/infer/post, crops + rec, search, end to end, over real files; {_box_counts(report)}.", ""]
        lines += ["| setting | status | size MB | end to end p50 ms | p99 ms | inference p50 ms | FPS | vs first | agreement |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in report.results:
            inference = next((s.p50 for s in r.stages if s.stage.endswith("inference")), None)
            ratio = "" if r.speedup is None else f"{r.speedup:.2f}x" + (" **fastest**" if r.fastest else "")
            agreement = ", ".join(f"{k} {v:.5f}" for k, v in r.agreement.items())
            lines.append(f"| {r.setting} | {r.status} | {_f(r.size_mb, 2)} | {_f(r.ms_p50)} | {_f(r.ms_p99)} | "
                         f"{_f(inference)} | {_f(r.fps, 1)} | {ratio} | {agreement} |")
        lines += ["", *summary_lines(report, threads), ""]
    lines += [
        "## Reading it",
        "",
        "- `shitu benchmark-cpu` records the fastest fp32 backend per model on this machine; "
        "`--backend auto` (predict, build-index) then uses it, else Paddle Inference.",
        "- bf16 only pays where the CPU has avx512_bf16 or AMX; onnxruntime's CPU provider has no bf16 mode at all "
        "(the failed rows say so). OpenVINO falls back to fp32 quietly on CPUs without bf16.",
        "- PicoDet converts to ONNX because shitu exports its nearest upsampling by size: paddle2onnx 2.1.0 cannot read the "
        "`scale` attribute Paddle writes otherwise.",
        "- Paddle INT8 models (`shitu compress`) run on Paddle Inference only: paddle2onnx cannot convert their quantize ops "
        "(the failed rows); `shitu compress --onnx-int8` makes an ONNX INT8 model instead.",
        "",
    ]
    return "\n".join(lines)


def _box_counts(report) -> str:
    if not report.boxes_per_image:
        return "no boxes recorded"
    return "images by boxes found: " + ", ".join(f"{k} with {n}" for n, k in report.boxes_per_image.items())


def summary_lines(report, threads: list[int]) -> list[str]:
    """Per thread count: each backend's fp32 inference time as a ratio to Paddle's (with oneDNN)."""
    inference = {}
    for r in report.results:
        if r.status == "ok" and r.precision == "fp32" and r.mkldnn is not False:
            inference[(r.backend, r.threads)] = next(s.p50 for s in r.stages if s.stage.endswith("inference"))
    lines = []
    for count in threads:
        paddle = inference.get(("paddle", count))
        if not paddle:
            continue
        parts = [f"{backend} {paddle / ms:.2f}x" for (backend, t), ms in inference.items() if t == count and backend != "paddle"]
        if parts:
            lines.append(f"- {count} thread(s), fp32 inference speed vs Paddle ({paddle:.2f} ms): " + ", ".join(parts))
    return lines


def _f(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma list of thread counts")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "backends_report.md")
    parser.add_argument("--models-cache", type=Path, default=Path(tempfile.gettempdir()) / "shitu-bench-models")
    parser.add_argument("--int8", type=Path, action="append", default=[], help="an int8 model from `shitu compress` (repeatable)")
    args = parser.parse_args()
    from shitu_cli.bench.inputs import default_images

    threads = [int(t) for t in args.threads.split(",")]
    models, note, index = pick_models(args.models_cache)
    reports, load = measure(models, default_images(), threads, args.warmup, args.runs, index, args.int8)
    args.out.write_text(render_markdown(reports, note, threads, load), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
