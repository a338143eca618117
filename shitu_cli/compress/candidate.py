"""What every compression method hands back (a Candidate staged in the work dir) and the small helpers the
methods share. It sits below pipeline.py and the methods, so neither has to import the other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from shitu_cli.compress.images import ImageSet, iter_batches
from shitu_cli.compress.source import SourceModel
from shitu_cli.errors import BadInput
from shitu_cli.models.manifest import ModelManifest, read_model_manifest, write_model_manifest

Stage = Callable[[str], None]  # told the name of each stage as it starts


@dataclass
class Candidate:
    """A compressed model staged in the work dir, waiting to be measured."""

    model_dir: Path
    manifest: ModelManifest
    method: str
    details: dict[str, Any] = field(default_factory=dict)  # recorded in shitu.yaml extra.compress
    layer: Any = None  # the dygraph export form, when a later step (PTQ after pruning) needs it
    algo_choice: Any = None  # choose.AlgoChoice when --algo auto picked the PTQ algorithm


def derived_manifest(source: SourceModel, model_file: str, params_file: str, precision: str, method: str,
                     **extra: Any) -> ModelManifest:
    """The source's manifest for a compressed child: same task/preprocess/labels, new files and lineage."""
    return dataclasses.replace(
        source.manifest,
        model_file=model_file,
        params_file=params_file,
        precision=precision,
        method=method,
        parent_model_hash=source.manifest.model_hash,
        model_hash=None,
        extra={**source.manifest.extra, **extra},
    )


def ptq_lineage(base: Candidate | None, algo: str, calib_images: int) -> tuple[str, dict[str, Any]]:
    """Method name and shitu.yaml details of a PTQ model, on top of what `base` (a pruned model) did."""
    method = f"ptq-{algo}" if base is None else f"{base.method}+ptq-{algo}"
    return method, {**(base.details if base else {}), "quant": "ptq", "algo": algo, "calib_images": calib_images}


def stage_manifest(model_dir: Path, manifest: ModelManifest) -> ModelManifest:
    """Write the staged model's shitu.yaml (build_predictor needs it) and read it back as loaded."""
    write_model_manifest(model_dir, manifest)
    return read_model_manifest(model_dir)


def first_batch(images: ImageSet, manifest: ModelManifest, batch_size: int) -> np.ndarray:
    for batch, _ in iter_batches(images, manifest, batch_size):
        return batch
    raise BadInput("no calibration image could be read", hint="check the --calib images", path=images.source)


def predictor_options(manifest: ModelManifest, threads: int):
    """How a model of this manifest is run for measuring: its backend and precision, oneDNN on."""
    from shitu_cli.infer.predictor import PredictorOptions

    backend = manifest.extra.get("backend", "paddle")
    return PredictorOptions(backend=backend, threads=threads, mkldnn=True, precision=manifest.precision)
