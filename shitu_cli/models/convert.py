"""`export_model`: a model folder in another format (ONNX, OpenVINO IR, legacy Paddle), checked against the source.

The output is a normal shitu model folder (shitu.yaml names the files; parent_model_hash links it to
the source, so an index built with the source accepts it), written whole or not at all.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from shitu_cli.errors import BadInput, WorkFailed, writing_to

FORMATS = ("onnx", "openvino", "paddle")
RUN_WITH = {"onnx": "onnxruntime", "openvino": "openvino", "paddle": "paddle"}
CORE = "shitu_cli.models.convert:export_model"
SAMPLE_COUNT = 4
# Largest output difference from the source that still counts as the same model, relative to the
# outputs' own scale: float32 kernels of two runtimes differ in the 6th digit. INT8 kernels of two runtimes
# round differently (measured: OpenVINO vs onnxruntime on one QDQ model, cosine 0.86-1.0, each as far from
# the fp32 parent as the other), so an INT8 export's difference is reported, not judged.
FP32_TOLERANCE = 1e-3


@dataclass
class ExportReport:
    source: Path
    out: Path
    format: str
    precision: str
    files: list[str]
    samples: int
    max_abs_diff: float
    scale: float  # largest absolute output of the source on the samples
    backend: str  # the runtime the check ran the export with
    images: list[str] | None = None  # the sample images given, None for the demo queries
    low_memory: bool = False  # written in predict --low-memory's form, recorded in shitu.yaml
    notes: list[str] = field(default_factory=list)
    recipe: Path | None = None


def export_model(model_dir: Path | str, out: Path | str, fmt: str, int8: bool = False,
                 images: Sequence[Path] | None = None, low_memory: bool = False) -> ExportReport:
    """Write MODEL_DIR as `fmt` into OUT and compare both on sample images (the demo queries by default).

    `low_memory` (ONNX only) writes the model in the form `predict --low-memory` runs (infer/low_memory.py) and
    records it in shitu.yaml, so the device runs it with the low-memory settings and builds nothing itself."""
    from shitu_cli.models.export import atomic_dir
    from shitu_cli.models.manifest import read_model_manifest

    model_dir, out = Path(model_dir), Path(out)
    manifest = read_model_manifest(model_dir)
    _check_request(model_dir, out, fmt, int8, manifest)
    if low_memory and fmt != "onnx":
        raise BadInput(f"--low-memory writes an ONNX model for onnxruntime, not {fmt}", hint="pass --format onnx")
    samples = _sample_images(images)
    with writing_to(out), atomic_dir(out) as staging:
        files = _WRITERS[fmt](model_dir, manifest, staging)
        if low_memory:
            files = _low_memory_files(staging, files)
        _write_manifest(staging, manifest, fmt, files, low_memory)
        diff, scale, backend = compare_outputs(model_dir, staging, manifest.task, RUN_WITH[fmt], samples)
        tolerance = FP32_TOLERANCE * max(1.0, scale)
        if not int8 and diff > tolerance:
            raise WorkFailed(f"the {fmt} export differs from the source by up to {diff:.3g} on the sample images "
                             f"(allowed {tolerance:.3g}); nothing was written", path=model_dir)
    report = ExportReport(model_dir, out, fmt, "int8" if int8 else "fp32", files, len(samples), diff, scale, backend,
                          [Path(p).resolve().as_posix() for p in images] if images else None, low_memory=low_memory)
    if fmt == "openvino":
        report.notes.append("run it with --backend openvino (OpenVINO IR)")
    if low_memory:
        report.notes.append("shitu.yaml records low_memory: predict runs it on onnxruntime with the --low-memory settings")
    if int8 and diff > FP32_TOLERANCE * max(1.0, scale):
        report.notes.append(f"INT8 kernels of {RUN_WITH[fmt]} round unlike the source's runtime (max difference {diff:.3g}): "
                            "check its quality on your data, e.g. with `shitu eval`")
    report.recipe = _write_recipe(report)
    return report


def _check_request(model_dir: Path, out: Path, fmt: str, int8: bool, manifest) -> None:
    if fmt not in FORMATS:
        raise BadInput(f"unknown format {fmt!r}", hint=f"choose one of: {', '.join(FORMATS)}")
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise BadInput("-o must not be the model's folder or inside it: nothing is written into the source", path=out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput("-o already exists and is not an empty folder", hint="pass a new folder", path=out)
    quantised = manifest.precision == "int8"
    if int8 and not quantised:
        raise BadInput("--int8 needs a quantised model, and this one is fp32",
                       hint="make one with `shitu compress MODEL --onnx-int8` and export that", path=model_dir)
    if quantised and not int8:
        raise BadInput("this model is quantised (int8): pass --int8 to export it as int8", path=model_dir)
    if quantised and not manifest.model_file.endswith(".onnx") and fmt != "paddle":
        raise BadInput(f"paddle2onnx cannot convert Paddle's INT8 ops, so this model cannot become {fmt}",
                       hint="`shitu compress MODEL --onnx-int8` makes an ONNX INT8 model from the fp32 one", path=model_dir)
    if fmt == "paddle" and not manifest.model_file.endswith(".pdmodel"):
        raise BadInput("this model is a Paddle 3 program (.json); Paddle 3.3 cannot turn it back into a legacy .pdmodel",
                       hint="export legacy models where the net is built (shitu compress writes legacy INT8 models); "
                            "onnx and openvino run on older runtimes too", path=model_dir)


def _sample_images(images: Sequence[Path] | None) -> list[np.ndarray]:
    from shitu_cli.data.images import iter_image_files, read_image
    from shitu_cli.demo import QUERIES

    paths = [Path(p) for p in images] if images else list(iter_image_files(QUERIES))[:SAMPLE_COUNT]
    expanded: list[Path] = []
    for path in paths:
        expanded.extend(list(iter_image_files(path))[:SAMPLE_COUNT] if path.is_dir() else [path])
    if not expanded:
        raise BadInput("no sample images to check the export with", hint="pass --images DIR")
    return [read_image(p) for p in expanded]


# ----------------------------------------------------------------------------- writers


def _write_onnx(model_dir: Path, manifest, staging: Path) -> list[str]:
    from shitu_cli.infer.predictor import onnx_model

    shutil.copy2(onnx_model(model_dir, manifest), staging / "model.onnx")
    return ["model.onnx", *_copy_side_files(model_dir, manifest, staging)]


def _write_openvino(model_dir: Path, manifest, staging: Path) -> list[str]:
    from shitu_cli.infer.predictor import onnx_model

    try:
        import openvino as ov
    except ImportError:
        raise WorkFailed("openvino is not installed", hint="pip install openvino") from None
    try:
        converted = ov.convert_model(str(onnx_model(model_dir, manifest)))
        ov.save_model(converted, str(staging / "model.xml"), compress_to_fp16=False)
    except Exception as exc:  # OpenVINO raises its own types
        raise WorkFailed(f"OpenVINO cannot convert the model ({exc.__class__.__name__}: {str(exc)[:200]})", path=model_dir) from None
    return ["model.xml", "model.bin", *_copy_side_files(model_dir, manifest, staging)]


def _write_paddle(model_dir: Path, manifest, staging: Path) -> list[str]:
    for name in (manifest.model_file, manifest.params_file):
        shutil.copy2(model_dir / name, staging / name)
    return [manifest.model_file, manifest.params_file, *_copy_side_files(model_dir, manifest, staging)]


_WRITERS = {"onnx": _write_onnx, "openvino": _write_openvino, "paddle": _write_paddle}


def _low_memory_files(staging: Path, files: list[str]) -> list[str]:
    """model.onnx replaced by its low-memory form: the graph, and its weights in a side file onnxruntime maps."""
    from shitu_cli.infer.low_memory import FORM_FILE, WEIGHTS_FILE, low_memory_form

    form = low_memory_form(staging / files[0])
    shutil.copy2(form, staging / FORM_FILE)
    shutil.copy2(form.parent / WEIGHTS_FILE, staging / WEIGHTS_FILE)
    return [FORM_FILE, WEIGHTS_FILE, *files[1:]]


def _copy_side_files(model_dir: Path, manifest, staging: Path) -> list[str]:
    """A detector's infer_cfg.yml (its preprocessing as ppdet exported it) travels with it."""
    name = str(manifest.extra.get("infer_cfg", "infer_cfg.yml"))
    if (model_dir / name).is_file():
        shutil.copy2(model_dir / name, staging / name)
        return [name]
    return []


def _write_manifest(staging: Path, manifest, fmt: str, files: list[str], low_memory: bool = False) -> None:
    from shitu_cli.models.manifest import write_model_manifest

    extra = {**manifest.extra, "format": fmt, "runtime": RUN_WITH[fmt]}
    if low_memory:
        extra["low_memory"] = True  # read by infer/predictor.py: the file is the form, run with the low-memory settings
    exported = dataclasses.replace(
        manifest, model_file=files[0], params_file=files[1] if fmt != "onnx" or low_memory else files[0],
        method=f"{manifest.method}+export-{fmt}" if manifest.method else f"export-{fmt}",
        parent_model_hash=manifest.model_hash, model_hash=None, extra=extra)
    write_model_manifest(staging, exported)


# ----------------------------------------------------------------------------- the check


def compare_outputs(source: Path, exported: Path, task: str, backend: str, samples: list[np.ndarray]) -> tuple[float, float, str]:
    """(largest absolute output difference, largest absolute source output, backend) over the samples."""
    from shitu_cli.infer.predictor import PredictorOptions

    reference_options = PredictorOptions(backend="paddle")
    from shitu_cli.models.manifest import read_model_manifest

    if read_model_manifest(source).model_file.endswith(".onnx"):
        reference_options = PredictorOptions(backend="onnxruntime")
    options = PredictorOptions(backend=backend)
    if task == "det":
        return (*_compare_det(source, exported, reference_options, options, samples), backend)
    return (*_compare_dense(source, exported, task, reference_options, options, samples), backend)


def _compare_dense(source, exported, task, reference_options, options, samples) -> tuple[float, float]:
    from shitu_cli.infer.predictor import build_predictor
    from shitu_cli.infer.preprocess import preprocess_batch

    reference = build_predictor(source, reference_options, task=task)
    candidate = build_predictor(exported, options, task=task)
    manifest = reference.manifest
    batch = preprocess_batch(samples, manifest.preprocess, manifest.input_size)
    want = np.asarray(reference.run(batch)[0], np.float64)
    got = np.asarray(candidate.run(batch)[0], np.float64)
    if want.shape != got.shape:
        raise WorkFailed(f"the export gives outputs of shape {got.shape}, the source {want.shape}", path=exported)
    return float(np.abs(want - got).max()), float(np.abs(want).max())


def _compare_det(source, exported, reference_options, options, samples) -> tuple[float, float]:
    """Boxes above a modest score: count must agree, then the largest coordinate/score difference between each
    source box and its closest export box of the same class (one to one)."""
    from shitu_cli.infer.detector import Detector

    reference, candidate = Detector(source, reference_options), Detector(exported, options)
    worst, scale = 0.0, 1.0
    for rgb in samples:
        want, got = (_kept_rows(d.raw(rgb)) for d in (reference, candidate))
        if len(want) != len(got):
            raise WorkFailed(f"the export finds {len(got)} boxes on a sample image, the source {len(want)}", path=exported)
        if len(want):
            worst = max(worst, _matched_difference(want, got))
            scale = max(scale, float(np.abs(want).max()))
    return worst, scale


def _matched_difference(want: np.ndarray, got: np.ndarray) -> float:
    """Pairs, not ranks: a barely trained detector scores many boxes alike, and two runtimes' last digits
    reorder those ties, so comparing the i-th box of each would compare different boxes."""
    free, worst = list(range(len(got))), 0.0
    for row in want:
        same_class = [j for j in free if got[j, 0] == row[0]]
        if not same_class:
            return float("inf")
        closest = min(same_class, key=lambda j: float(np.abs(got[j, 1:] - row[1:]).max()))
        worst = max(worst, float(np.abs(got[closest, 1:] - row[1:]).max()))
        free.remove(closest)
    return worst


def _kept_rows(raw) -> np.ndarray:
    boxes, count = raw
    rows = np.asarray(boxes, np.float64).reshape(-1, 6)[: int(np.asarray(count).reshape(-1)[0]) if count is not None else None]
    rows = rows[rows[:, 1] >= 0.3]
    return rows[np.lexsort((rows[:, 2], -rows[:, 1]))]


def _write_recipe(report: ExportReport) -> Path:
    from shitu_cli.recipes import Recipe, write_recipe

    options: dict[str, Any] = {"model_dir": report.source.resolve().as_posix(), "out": report.out.resolve().as_posix(),
                               "fmt": report.format, "int8": report.precision == "int8", "images": report.images,
                               "low_memory": report.low_memory}
    metrics = {"max_abs_diff": report.max_abs_diff, "output_scale": report.scale, "samples": report.samples,
               "checked_with": report.backend}
    with writing_to(report.out):
        return write_recipe(report.out, Recipe(command="export", core=CORE, options=options, metrics=metrics),
                            [report.out / name for name in report.files] + [report.out / "shitu.yaml"])
