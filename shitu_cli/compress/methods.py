"""The compression methods, each staging a Candidate model dir in the work dir: ptq, prune(+distill), onnx-int8, qat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shitu_cli.compress.images import ImageSet, iter_batches, readable_count
from shitu_cli.compress.legacy import LEGACY_MODEL, LEGACY_PARAMS, export_legacy
from shitu_cli.compress.pipeline import Candidate, Stage, derived_manifest, first_batch, stage_manifest
from shitu_cli.compress.source import SourceModel, Trainable, build_model_from_recipe, check_reproduces_export, need_run_dir


def trainable(source: SourceModel, method: str) -> Trainable:
    return build_model_from_recipe(need_run_dir(source, method), source.manifest)


def exportable_layer(source: SourceModel, calib_set: ImageSet, batch_size: int) -> Any:
    """The run's dygraph model wrapped to return what its export returns, checked against the export."""
    layer = trainable(source, "Paddle PTQ").export_form()
    check_reproduces_export(layer, source, first_batch(calib_set, source.manifest, batch_size))
    return layer


def _legacy_fp32(source: SourceModel, calib_set: ImageSet, work: Path, batch_size: int, stage: Stage,
                 base: Candidate | None) -> Path:
    """An old-format fp32 model for PTQ: the pruned layer, the source itself if legacy, or a rebuilt run."""
    if base is None and source.is_legacy:
        return source.model_dir
    stage("exporting an old-format static model")
    layer = base.details.pop("_layer") if base is not None else exportable_layer(source, calib_set, batch_size)
    return export_legacy(layer, work / "fp32", tuple(source.manifest.input_size), source.manifest.input_names[0])


def ptq(source: SourceModel, calib_set: ImageSet, work: Path, algo: str, batch_size: int, stage: Stage,
        base: Candidate | None = None) -> Candidate:
    from shitu_cli.compress.ptq import check_algo, quantize_static

    check_algo(algo)
    fp32_dir = _legacy_fp32(source, calib_set, work, batch_size, stage, base)
    stage(f"calibrating INT8 ({algo}) on {readable_count(calib_set)} image(s)")

    def batches():
        return (batch for batch, _ in iter_batches(calib_set, source.manifest, batch_size))

    batch_count = -(-len(calib_set.samples) // batch_size)  # an upper bound: unreadable images shorten it
    out_dir = quantize_static(fp32_dir, work / "int8", batches, source.manifest.input_names[0], algo, batch_count)
    method = f"ptq-{algo}" if base is None else f"{base.method}+ptq-{algo}"
    details = {**(base.details if base else {}), "quant": "ptq", "algo": algo, "calib_images": readable_count(calib_set)}
    manifest = derived_manifest(source, LEGACY_MODEL, LEGACY_PARAMS, "int8", method)
    return Candidate(out_dir, stage_manifest(out_dir, manifest), method, details)


def prune_and_distill(source: SourceModel, calib_set: ImageSet, work: Path, ratio: float, epochs: int, lr: float,
                      seed: int, batch_size: int, stage: Stage) -> Candidate:
    from shitu_cli.errors import BadInput

    raise BadInput("--prune is not implemented yet")


def qat(source: SourceModel, calib_set: ImageSet, work: Path, epochs: int, lr: float, seed: int, batch_size: int,
        stage: Stage, base: Candidate | None = None) -> Candidate:
    from shitu_cli.errors import BadInput

    raise BadInput("--quant qat is not implemented yet", hint="use --quant ptq")


def onnx_int8(source: SourceModel, calib_set: ImageSet, work: Path, batch_size: int, stage: Stage) -> Candidate:
    from shitu_cli.errors import BadInput

    raise BadInput("--onnx-int8 is not implemented yet", hint="use --quant ptq")
