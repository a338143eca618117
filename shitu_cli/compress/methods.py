"""The compression methods, each staging a Candidate model dir in the work dir: ptq, prune(+distill), onnx-int8, qat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shitu_cli.compress.images import ImageSet, iter_batches, readable_count
from shitu_cli.compress.legacy import LEGACY_MODEL, LEGACY_PARAMS, export_legacy
from shitu_cli.compress.candidate import Candidate, Stage, derived_manifest, first_batch, ptq_lineage, stage_manifest
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
    layer = base.layer if base is not None else exportable_layer(source, calib_set, batch_size)
    return export_legacy(layer, work / "fp32", tuple(source.manifest.input_size), source.manifest.input_names[0])


def ptq(source: SourceModel, calib_set: ImageSet, work: Path, algo: str, batch_size: int, stage: Stage,
        base: Candidate | None = None) -> Candidate:
    """Paddle PTQ of the old-format fp32 model with `algo`, or with each of choose.AUTO_ALGOS for "auto"."""
    from shitu_cli.compress.choose import calibrate_with, check_algo_choice
    from shitu_cli.compress.ptq import quantize_static

    check_algo_choice(algo)
    fp32_dir = _legacy_fp32(source, calib_set, work, batch_size, stage, base)
    input_name = source.manifest.input_names[0]

    def calibrate(one_algo: str, images: ImageSet, out_dir: Path) -> Candidate:
        stage(f"calibrating INT8 ({one_algo}) on {readable_count(images)} image(s)")

        def feeds():
            return ({input_name: batch} for batch, _ in iter_batches(images, source.manifest, batch_size))

        batch_count = -(-len(images.samples) // batch_size)  # an upper bound: unreadable images shorten it
        quantize_static(fp32_dir, out_dir, feeds, one_algo, batch_count)
        method, details = ptq_lineage(base, one_algo, readable_count(images))
        manifest = derived_manifest(source, LEGACY_MODEL, LEGACY_PARAMS, "int8", method)
        return Candidate(out_dir, stage_manifest(out_dir, manifest), method, details)

    return calibrate_with(algo, calib_set, work, calibrate, source, batch_size, stage)


def prune_and_distill(source: SourceModel, calib_set: ImageSet, work: Path, ratio: float, epochs: int, lr: float,
                      seed: int, batch_size: int, stage: Stage) -> Candidate:
    """L1-prune `ratio` of the filters, then fine-tune on the calibration images with the unpruned model
    as teacher (KL at T=4, plus CE where the images carry labels; rec: plus 1 - cosine of the features)."""
    import copy

    from shitu_cli.compress.prune import prune_pplcnet
    from shitu_cli.models.export import export_layer

    net = trainable(source, "--prune")
    check_reproduces_export(net.export_form(), source, first_batch(calib_set, source.manifest, batch_size))
    student = copy.deepcopy(net.model)
    stage(f"pruning {ratio:.0%} of the filters (L1)")
    summary = prune_pplcnet(student, ratio)
    images, labels = _load_training_images(calib_set, source, batch_size)
    stage(f"fine-tuning with distillation: {epochs} epoch(s) on {len(images)} image(s)")
    _distill(net, student, images, labels, epochs, lr, seed, batch_size, work / "finetune")
    layer = net.export_form(student)
    method = f"prune-l1-{ratio:g}+distill"
    manifest = derived_manifest(source, "", "", "fp32", method)
    out_dir = export_layer(layer, work / "pruned", [[None, 3, *source.manifest.input_size]], manifest,
                           input_names=source.manifest.input_names)
    details = {"prune": "l1-filter", "ratio": ratio, "params_before": summary.params_before,
               "params_after": summary.params_after, "finetune_epochs": epochs, "finetune_images": len(images),
               "distill": "KL T=4" + (" + CE" if labels is not None else "")}
    from shitu_cli.models.manifest import read_model_manifest

    return Candidate(out_dir, read_model_manifest(out_dir), method, details, layer=layer)


DISTILL_TEMPERATURE = 4.0
DISTILL_WEIGHT = 0.5  # share of KL against CE when labels are known


def _load_training_images(calib_set: ImageSet, source: SourceModel, batch_size: int):
    """All calibration images in memory (N, 3, H, W) and, for cls when every image has a known class, labels."""
    import numpy as np

    from shitu_cli.compress.measure import _class_index

    arrays, names = [], []
    for batch, samples in iter_batches(calib_set, source.manifest, batch_size):
        arrays.append(batch)
        names.extend(s.label for s in samples)
    images = np.concatenate(arrays)
    labels = [_class_index(n, list(source.manifest.labels)) for n in names] if source.task == "cls" else []
    known = bool(labels) and all(i is not None and 0 <= i < len(source.manifest.labels) for i in labels)
    return images, (np.array(labels, np.int64) if known else None)


def _distill(teacher: Trainable, student: Any, images, labels, epochs: int, lr: float, seed: int, batch_size: int,
             run_dir: Path) -> None:
    import numpy as np
    import paddle

    from shitu_cli.train.distill import distillation_loss, kl_at_temperature
    from shitu_cli.train.loop import LoopConfig, fit

    teacher.model.eval()

    def make_loader(epoch):
        order = np.random.permutation(len(images))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = images[idx]
            flip = np.random.rand(len(idx)) < 0.5  # the only augmentation: the images are few
            batch[flip] = batch[flip][..., ::-1]
            yield paddle.to_tensor(np.ascontiguousarray(batch)), (labels[idx] if labels is not None else None)

    def loss_fn(model, batch):
        x, y = batch
        with paddle.no_grad():
            target = teacher.model(x)
        out = model(x)
        if teacher.task == "rec":
            kl = kl_at_temperature(out["logits"], target["logits"], DISTILL_TEMPERATURE)
            cosine = paddle.nn.functional.cosine_similarity(out["features"], target["features"], axis=1).mean()
            return kl + (1.0 - cosine), {"kl": round(float(kl), 4), "cos": round(float(cosine), 4)}
        if y is None:
            kl = kl_at_temperature(out, target, DISTILL_TEMPERATURE)
            return kl, {"kl": round(float(kl), 4)}
        onehot = paddle.nn.functional.one_hot(paddle.to_tensor(y), out.shape[1])
        return distillation_loss(out, target, onehot, DISTILL_TEMPERATURE, DISTILL_WEIGHT)

    steps = -(-len(images) // batch_size)
    config = LoopConfig(epochs=epochs, lr=lr, warmup_epochs=0.0, ema_decay=None, seed=seed, weight_decay=1e-5)
    fit(student, make_loader, steps, loss_fn, None, config, run_dir, batch_size=batch_size)
    student.eval()


def qat(source: SourceModel, calib_set: ImageSet, work: Path, algo: str, epochs: int, lr: float, seed: int,
        batch_size: int, stage: Stage) -> Candidate:
    """Quantization-aware fine-tuning, then PTQ calibration of the tuned weights ("qat+ptq-<algo>").

    The run's model is fine-tuned with fake-quant (abs-max) on every conv and linear layer, so its
    weights learn to survive INT8 rounding; the original is its teacher, as for --prune. The fake
    quanters are then dropped and the tuned float weights go through the same old-format export and
    PostTrainingQuantization as --quant ptq: paddle 3.3's own QAT export is not what oneDNN INT8 loads.
    """
    import copy

    net = trainable(source, "--quant qat")
    check_reproduces_export(net.export_form(), source, first_batch(calib_set, source.manifest, batch_size))
    student = fake_quantized(net.model)
    images, labels = _load_training_images(calib_set, source, batch_size)
    stage(f"quantization-aware fine-tuning: {epochs} epoch(s) on {len(images)} image(s)")
    _distill(net, student, images, labels, epochs, lr, seed, batch_size, work / "qat")
    tuned = copy.deepcopy(net.model)
    copy_float_weights(student, tuned)
    details = {"qat": "fake-quant abs-max on conv/linear weights and inputs", "finetune_epochs": epochs,
               "finetune_images": len(images), "distill": "KL T=4" + (" + CE" if labels is not None else "")}
    # A not-yet-staged base for ptq(): only its layer (the tuned export form), method and details are used.
    base = Candidate(work / "qat", source.manifest, "qat", details, layer=net.export_form(tuned))
    candidate = ptq(source, calib_set, work, algo, batch_size, stage, base=base)
    candidate.details["quant"] = "qat+ptq"
    return candidate


def fake_quantized(model: Any) -> Any:
    """A training-mode copy of `model` whose Conv2D/Linear layers fake-quantize weights and inputs to INT8."""
    import copy

    import paddle
    from paddle.quantization import QAT, QuantConfig
    from paddle.quantization.quanters import FakeQuanterWithAbsMaxObserver

    quanter = FakeQuanterWithAbsMaxObserver(moving_rate=0.9)
    # Only conv/linear: those are the ops oneDNN runs in INT8; BN and activations stay float.
    config = QuantConfig(activation=None, weight=None)
    config.add_type_config([paddle.nn.Conv2D, paddle.nn.Linear], activation=quanter, weight=quanter)
    student = copy.deepcopy(model)
    student.train()  # paddle's QAT insists on a training-mode model
    # BN stays in training mode on purpose: re-estimating its statistics on fake-quantized inputs kept the
    # tiny test classifier at 0.83-0.87 agreement; frozen BN statistics dropped it to ~0.65.
    return QAT(config).quantize(student, inplace=True)


def copy_float_weights(quantized: Any, float_model: Any) -> None:
    """Load the fine-tuned weights of a fake-quantized model into its float twin (the quanters' state is dropped)."""
    from shitu_cli.errors import WorkFailed

    tuned = quantized.state_dict()
    wanted = float_model.state_dict()
    missing = [k for k in wanted if k not in tuned]
    if missing:
        raise WorkFailed(f"the fake-quantized model lost {len(missing)} weight(s) of the original, e.g. {missing[0]}")
    if not all(bool(tuned[k].isfinite().all()) for k in wanted):
        raise WorkFailed("quantization-aware fine-tuning diverged (non-finite weights)", hint="lower --lr or --epochs")
    float_model.set_state_dict({k: tuned[k] for k in wanted})
    float_model.eval()


def onnx_int8(source: SourceModel, calib_set: ImageSet, work: Path, batch_size: int, stage: Stage) -> Candidate:
    """paddle2onnx (works from an export alone) then onnxruntime static INT8 quantization."""
    from shitu_cli.compress.legacy import quiet_stdout
    from shitu_cli.compress.onnx_int8 import ONNX_INT8_FILE, quantize_onnx
    from shitu_cli.infer.predictor import onnx_model

    stage("converting to ONNX (paddle2onnx)")
    fp32_onnx = onnx_model(source.model_dir, source.manifest)
    stage(f"calibrating ONNX INT8 on {readable_count(calib_set)} image(s)")

    out_dir = work / "onnx-int8"
    op_types = None
    if source.task == "det":
        from shitu_cli.compress.det import calibration_feeds, copy_infer_cfg

        feeds, op_types = calibration_feeds(source, calib_set), ["Conv"]  # box decoding and NMS stay float
        copy_infer_cfg(source, out_dir)
    else:
        input_name = source.manifest.input_names[0]

        def feeds():
            return ({input_name: batch} for batch, _ in iter_batches(calib_set, source.manifest, batch_size))

    with quiet_stdout():
        quantize_onnx(fp32_onnx, out_dir / ONNX_INT8_FILE, feeds, op_types)
    method = "onnx-int8-minmax"
    manifest = derived_manifest(source, ONNX_INT8_FILE, ONNX_INT8_FILE, "int8", method, backend="onnxruntime")
    details = {"quant": "onnxruntime quantize_static", "format": "QDQ", "weights": "int8 per-channel",
               "activations": "uint8 minmax", "calib_images": readable_count(calib_set),
               **({"quantized": "Conv only"} if op_types else {})}
    return Candidate(out_dir, stage_manifest(out_dir, manifest), method, details)
