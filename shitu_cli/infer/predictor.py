"""The one place predictors are built: a model dir + options in, `run(inputs) -> outputs` out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from shitu_cli.errors import BadInput, WorkFailed
from shitu_cli.models.manifest import ModelManifest, read_model_manifest

BACKENDS = ("paddle",)


@dataclass(frozen=True)
class PredictorOptions:
    backend: str = "paddle"
    threads: int = 1
    mkldnn: bool = True
    precision: str = "fp32"  # fp32 | bf16 | int8 (int8 models come from `shitu compress`)


class PaddlePredictor:
    """Paddle Inference on CPU. Reads paddle-3 (inference.json) and legacy (inference.pdmodel) models."""

    def __init__(self, model_dir: Path, manifest: ModelManifest, options: PredictorOptions):
        from paddle.inference import Config, create_predictor

        self.model_dir, self.manifest, self.options = Path(model_dir), manifest, options
        config = Config(str(self.model_dir / manifest.model_file), str(self.model_dir / manifest.params_file))
        config.disable_gpu()
        config.disable_glog_info()
        config.set_cpu_math_library_num_threads(max(1, options.threads))
        # Never enable_memory_optim(): it raises on paddle-3 .json models.
        if options.mkldnn:
            config.enable_mkldnn()
            if manifest.task == "det":
                # Paddle 3.3 oneDNN crashes on PicoDet's upsample op; skipping the
                # placement pass keeps oneDNN for the rest of the graph.
                config.delete_pass("onednn_placement_pass")
            if options.precision == "bf16":
                config.enable_mkldnn_bfloat16()
            elif options.precision == "int8":
                config.enable_mkldnn_int8()
        try:
            self._predictor = create_predictor(config)
        except Exception as exc:  # paddle raises bare RuntimeError/ValueError subclasses
            raise WorkFailed(f"Paddle Inference cannot load this model ({exc.__class__.__name__}: {exc})", path=model_dir) from None
        self.input_names = list(self._predictor.get_input_names())
        self.output_names = list(self._predictor.get_output_names())

    def run(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        if isinstance(inputs, np.ndarray):
            inputs = {self.input_names[0]: inputs}
        for name, value in inputs.items():
            self._predictor.get_input_handle(name).copy_from_cpu(np.ascontiguousarray(value))
        self._predictor.run()
        return [self._predictor.get_output_handle(name).copy_to_cpu() for name in self.output_names]


def build_predictor(model_dir: Path | str, options: PredictorOptions | None = None, task: str | None = None) -> PaddlePredictor:
    """Load the manifest of `model_dir` (refusing a model of another task) and build its predictor."""
    options = options or PredictorOptions()
    if options.backend not in BACKENDS:
        raise BadInput(f"unknown backend {options.backend!r}", hint=f"choose one of: {', '.join(BACKENDS)}")
    manifest = read_model_manifest(Path(model_dir), task=task)
    return PaddlePredictor(Path(model_dir), manifest, options)
