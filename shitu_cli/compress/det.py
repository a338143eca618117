"""Detector compression: the PicoDet behind a det model rebuilt in dygraph, exported in the old IR, and
calibrated to INT8 on its conv layers (Paddle PTQ, run by oneDNN INT8).

The dygraph model comes from a train-det run dir (ppdet.yml + best weights) or, for an export
alone, from the ppdet model sections shitu writes beside it (`ppdet_model.yml`) with the weights
read back from the export itself. Either way it must reproduce the export's boxes before any
compression starts.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from shitu_cli.compress.images import ImageSet, iter_readable, readable_count
from shitu_cli.compress.legacy import LEGACY_MODEL, LEGACY_PARAMS, old_ir_compat, quiet_stdout
from shitu_cli.compress.candidate import Candidate, Stage, derived_manifest, ptq_lineage, stage_manifest
from shitu_cli.compress.det_rebuild import has_run_dir, rebuild_detector
from shitu_cli.compress.source import SourceModel
from shitu_cli.errors import BadInput, WorkFailed

# The rebuilt detector must give the export's top boxes to within this many pixels (plus 1e-4 relative)
# and score units.
REBUILD_BOX_TOLERANCE = 0.05
REBUILD_SCORE_TOLERANCE = 1e-3
PROBE_ROWS = 10


# ----------------------------------------------------------------------------- old-IR export


@contextmanager
def _integral_without_matmul() -> Iterator[None]:
    """Trace the DFL integral as multiply + sum instead of a matmul with its projection vector.

    The projection is 0, 1, ..., reg_max: integer-valued, so oneDNN's INT8 pass takes it for an
    already-quantized int8 weight of a matmul, finds no scale for it and aborts the predictor.
    """
    from ppdet.modeling.heads import gfl_head

    original = gfl_head.Integral.forward
    gfl_head.Integral.forward = _integral_as_sum
    try:
        yield
    finally:
        gfl_head.Integral.forward = original


def _integral_as_sum(self, x):
    """ppdet's Integral.forward in eval mode, summing instead of multiplying by a matrix (old-IR ops)."""
    import paddle
    import paddle.nn.functional as F
    from paddle.base.layer_helper import LayerHelper

    probabilities = F.softmax(x.reshape([-1, self.reg_max + 1]), axis=1)
    # The projection 0..reg_max as a constant of the program: the `project` buffer's name comes from a
    # process-wide eager counter, and would make each run's INT8 file different.
    projection = paddle.assign(np.arange(self.reg_max + 1, dtype="float32").reshape(1, -1))
    weighted = paddle.multiply(probabilities, projection)
    helper = LayerHelper("reduce_sum")
    distance = helper.create_variable_for_type_inference(weighted.dtype)
    helper.append_op(type="reduce_sum", inputs={"X": [weighted]}, outputs={"Out": [distance]},
                     attrs={"dim": [1], "keep_dim": False, "reduce_all": False})
    return distance


def export_legacy_detector(model: Any, out_dir: Path, input_size: tuple[int, int], dfl_as_sum: bool = True) -> Path:
    """out_dir/inference.pdmodel + .pdiparams: the detector with its NMS, inputs image and scale_factor.
    `dfl_as_sum=False` keeps the DFL matmul as ppdet's own (and the official) exports have it."""
    import paddle

    from shitu_cli.models import ppdet_compat
    from shitu_cli.models.export import fresh_name_scopes

    out_dir = Path(out_dir)
    _ready_for_export(model)
    spec = _input_spec(input_size)
    integral = _integral_without_matmul() if dfl_as_sum else contextlib.nullcontext()
    with ppdet_compat.full_graph_export(), ppdet_compat.onnx_convertible_upsampling(model), old_ir_compat(), \
            ppdet_compat.im_shape_from_image(model), integral, fresh_name_scopes(), quiet_stdout():
        paddle.jit.save(paddle.jit.to_static(model, input_spec=spec), str(out_dir / "inference"), input_spec=spec)
    (out_dir / "inference.pdiparams.info").unlink(missing_ok=True)
    return out_dir


def _rebuildable(source: SourceModel) -> bool:
    from shitu_cli.train.det import MODEL_SECTIONS

    return has_run_dir(source) or (source.model_dir / MODEL_SECTIONS).is_file()


def legacy_copy_without_integer_matmuls(source: SourceModel, out_dir: Path) -> Path:
    """An old-format detector (an official inference.pdmodel) copied to out_dir with every matmul by an
    integer-valued constant vector (PicoDet's DFL projection 0..reg_max) rewritten as multiply + sum.

    oneDNN's INT8 pass takes such a vector for an int8 weight without a scale and aborts; the two
    ops compute the same numbers. Paddle PTQ then runs on this copy: no rebuild is needed.
    """
    import paddle

    out_dir = Path(out_dir)
    paddle.enable_static()
    try:
        with paddle.pir_utils.OldIrGuard(), quiet_stdout():
            scope = paddle.static.Scope()
            with paddle.static.scope_guard(scope):
                executor = paddle.static.Executor(paddle.CPUPlace())
                program, feed_names, fetch_vars = paddle.static.load_inference_model(
                    str(source.model_dir / Path(source.manifest.model_file).stem), executor)
                for index in reversed(range(len(program.global_block().ops))):
                    _rewrite_integer_matmul(program.global_block(), index, scope)
                block = program.global_block()
                paddle.static.save_inference_model(str(out_dir / "inference"), [block.var(n) for n in feed_names],
                                                   fetch_vars, executor, program=program)
    except (RuntimeError, ValueError) as exc:
        raise WorkFailed(f"cannot read or rewrite the old-format program ({exc.__class__.__name__}: {str(exc)[:200]})",
                         path=source.model_dir) from None
    finally:
        paddle.disable_static()
    return out_dir


def _rewrite_integer_matmul(block, index: int, scope) -> None:
    op = block.ops[index]
    if op.type != "matmul_v2" or op.attr("trans_x") or op.attr("trans_y"):
        return
    x_name, y_name, out_name = op.input("X")[0], op.input("Y")[0], op.output("Out")[0]
    weight = scope.find_var(y_name)
    if weight is None or not block.var(y_name).persistable:
        return
    values = np.array(weight.get_tensor())
    if values.ndim != 1 or not np.all(values == np.round(values)):
        return
    product = block.create_var(name=f"{out_name}.weighted", dtype=block.var(x_name).dtype, shape=block.var(x_name).shape)
    block._remove_op(index)
    block._insert_op(index, type="elementwise_mul", inputs={"X": [x_name], "Y": [y_name]}, outputs={"Out": [product]},
                     attrs={"axis": -1})
    block._insert_op(index + 1, type="reduce_sum", inputs={"X": [product]}, outputs={"Out": [out_name]},
                     attrs={"dim": [-1], "keep_dim": False, "reduce_all": False})


# ----------------------------------------------------------------------------- checks and calibration feeds


def det_feeds(images: ImageSet, preprocess) -> Iterator[tuple[dict[str, np.ndarray], Any]]:
    """({image, scale_factor}, sample) per readable image, preprocessed exactly as the Detector does."""
    for rgb, sample in iter_readable(images):
        image, scale_factor = preprocess(rgb)
        yield {"image": image, "scale_factor": scale_factor}, sample


def check_reproduces_detector(candidate_dir: Path, source: SourceModel, probes: list[dict[str, np.ndarray]]) -> None:
    """Refuse a rebuilt detector whose top boxes differ from the export's on the probe images."""
    from shitu_cli.infer.predictor import PredictorOptions, build_predictor

    plain = PredictorOptions(mkldnn=False)
    expected_model = build_predictor(source.model_dir, plain, task="det")
    rebuilt_model = build_predictor(candidate_dir, plain, task="det")
    for feeds in probes:
        expected = _top_rows(expected_model.run(feeds))
        got = _top_rows(rebuilt_model.run(feeds))
        if expected.shape != got.shape or not _rows_close(expected, got):
            raise WorkFailed(
                "the detector rebuilt for compression does not reproduce its export's boxes",
                hint="were the run dir's weights or ppdet_model.yml changed after this export? compress the run it came from",
                path=source.run_dir or source.model_dir,
            )


def _top_rows(outputs: list[np.ndarray]) -> np.ndarray:
    rows = np.asarray(outputs[0], np.float32).reshape(-1, 6)[: int(np.asarray(outputs[1]).reshape(-1)[0])]
    return rows[np.argsort(-rows[:, 1], kind="stable")][:PROBE_ROWS]


def _rows_close(expected: np.ndarray, got: np.ndarray) -> bool:
    """Every expected row has a twin in `got` (order aside: near-tied scores may swap places)."""
    def twin(row):
        same_score = np.abs(got[:, :2] - row[:2]).max(axis=1) <= REBUILD_SCORE_TOLERANCE
        same_box = np.abs(got[:, 2:] - row[2:]).max(axis=1) <= REBUILD_BOX_TOLERANCE + 1e-4 * np.abs(row[2:]).max()
        return bool(np.any(same_score & same_box))

    return all(twin(row) for row in expected)


# ----------------------------------------------------------------------------- the method


def detector_ptq(source: SourceModel, calib_set: ImageSet, work: Path, algo: str, stage: Stage,
                 base: Candidate | None = None) -> Candidate:
    """Rebuild, export in the old IR, check it reproduces the export, then PTQ the convs to INT8 ("auto": the
    best of several algorithms). With `base` (a pruned detector), its layer is exported instead: it differs
    from the export by design."""
    from shitu_cli.compress.choose import calibrate_with, check_algo_choice
    from shitu_cli.compress.ptq import quantize_static
    from shitu_cli.infer.detector import Detector

    check_algo_choice(algo)
    preprocess = Detector(source.model_dir).preprocess
    fp32_dir = _legacy_fp32(source, calib_set, work, preprocess, stage, base)

    def calibrate(one_algo: str, images: ImageSet, out_dir: Path) -> Candidate:
        stage(f"calibrating INT8 ({one_algo}) on {readable_count(images)} image(s)")
        quantize_static(fp32_dir, out_dir, calibration_feeds(source, images, preprocess),
                        algo=one_algo, batch_count=len(images.samples), conv_only=True)
        copy_infer_cfg(source, out_dir)
        method, details = ptq_lineage(base, one_algo, readable_count(images))
        details["quantized"] = ("conv2d and depthwise_conv2d (weights per channel, inputs per tensor); "
                                "head post-processing and NMS stay fp32")
        manifest = derived_manifest(source, LEGACY_MODEL, LEGACY_PARAMS, "int8", method)
        return Candidate(out_dir, stage_manifest(out_dir, manifest), method, details)

    return calibrate_with(algo, calib_set, work, calibrate, source, 1, stage)


def _legacy_fp32(source: SourceModel, calib_set: ImageSet, work: Path, preprocess, stage: Stage,
                 base: Candidate | None) -> Path:
    """The old-format fp32 detector PTQ reads: the pruned layer, the source program rewritten, or a rebuild
    checked against the export."""
    fp32_dir = work / "fp32"
    if base is not None:
        stage("exporting the pruned detector as an old-format static model")
        export_legacy_detector(base.layer, fp32_dir, tuple(source.manifest.input_size))
    elif source.is_legacy and not _rebuildable(source):
        stage("rewriting the old-format program for oneDNN INT8")
        legacy_copy_without_integer_matmuls(source, fp32_dir)
    else:
        stage("rebuilding the detector and exporting an old-format static model")
        export_legacy_detector(rebuild_detector(source), fp32_dir, tuple(source.manifest.input_size))
    copy_infer_cfg(source, fp32_dir)
    stage_manifest(fp32_dir, derived_manifest(source, LEGACY_MODEL, LEGACY_PARAMS, "fp32", "rebuilt"))
    if base is None:
        probes = [feeds for feeds, _ in itertools.islice(det_feeds(calib_set, preprocess), 2)]
        if not probes:
            raise BadInput("no calibration image could be read", hint="check the --calib images", path=calib_set.source)
        check_reproduces_detector(fp32_dir, source, probes)
    return fp32_dir


def detector_prune(source: SourceModel, calib_set: ImageSet, work: Path, ratio: float, epochs: int, lr: float,
                   seed: int, batch_size: int, stage: Stage) -> Candidate:
    """L1-prune `ratio` of the backbone's inner filters, then fine-tune with the unpruned detector as teacher
    on the calibration images, no boxes needed: the student learns the teacher's neck feature maps (MSE),
    scores (BCE) and, where the teacher sees an object, boxes (L1). Neck and head keep their shapes."""
    import copy

    from shitu_cli.compress.prune import prune_lcnet_backbone
    from shitu_cli.infer.detector import Detector

    preprocess = Detector(source.model_dir).preprocess
    stage("rebuilding the detector")
    teacher = rebuild_detector(source)
    student = copy.deepcopy(teacher)
    stage(f"pruning {ratio:.0%} of the backbone's inner filters (L1)")
    summary = prune_lcnet_backbone(student, ratio)
    arrays = [feeds["image"] for feeds, _ in det_feeds(calib_set, preprocess)]
    if not arrays:
        raise BadInput("no calibration image could be read", hint="check the --calib images", path=calib_set.source)
    images = np.concatenate(arrays)
    stage(f"fine-tuning with feature distillation: {epochs} epoch(s) on {len(images)} image(s)")
    _distill_features(teacher, student, images, epochs, lr, seed, batch_size, work / "finetune")
    method = f"prune-l1-{ratio:g}+distill"
    out_dir = export_pir_detector(student, work / "pruned", tuple(source.manifest.input_size))
    copy_infer_cfg(source, out_dir)
    details = {"prune": "l1-filter (backbone, inner layers)", "ratio": ratio, "params_before": summary.params_before,
               "params_after": summary.params_after, "finetune_epochs": epochs, "finetune_images": len(images),
               "distill": "MSE of the neck's feature maps"}
    manifest = derived_manifest(source, DET_MODEL, DET_PARAMS, "fp32", method)
    return Candidate(out_dir, stage_manifest(out_dir, manifest), method, details, layer=student)


def _distill_features(teacher: Any, student: Any, images: np.ndarray, epochs: int, lr: float, seed: int,
                      batch_size: int, run_dir: Path) -> None:
    import paddle
    import paddle.nn.functional as F

    from shitu_cli.train.loop import LoopConfig, fit

    teacher.eval()
    for param in student.head.parameters():
        param.stop_gradient = True  # the head stays as trained: the thinner backbone (and the neck) adapt to it

    def features(net, x):
        fpn = net.neck(net.backbone({"image": x}))
        scores, boxes = net.head.forward_eval(fpn, export_post_process=True)
        return fpn, scores, boxes

    def make_loader(epoch):
        order = np.random.permutation(len(images))
        for start in range(0, len(order), batch_size):
            yield paddle.to_tensor(np.ascontiguousarray(images[order[start:start + batch_size]]))

    def loss_fn(model, x):
        with paddle.no_grad():
            fpn_t, scores_t, boxes_t = features(teacher, x)
        fpn_s, scores_s, boxes_s = features(model, x)
        feature_loss = sum(F.mse_loss(got, target) for got, target in zip(fpn_s, fpn_t)) / len(fpn_t)
        score_loss = F.binary_cross_entropy(scores_s.clip(1e-6, 1 - 1e-6), scores_t)
        # where the teacher sees an object, the student's box should be the teacher's (pixels / input size)
        weight = scores_t.max(axis=1).unsqueeze(-1)
        box_loss = (weight * (boxes_s - boxes_t).abs()).sum() / (weight.sum() * 4 + 1e-6) / float(x.shape[-1])
        loss = feature_loss + score_loss + box_loss
        return loss, {"feat": round(float(feature_loss), 5), "score": round(float(score_loss), 5), "box": round(float(box_loss), 5)}

    config = LoopConfig(epochs=epochs, lr=lr, warmup_epochs=0.0, ema_decay=None, seed=seed, weight_decay=1e-5)
    fit(student, make_loader, -(-len(images) // batch_size), loss_fn, None, config, run_dir, batch_size=batch_size)
    student.eval()


DET_MODEL, DET_PARAMS = "model.json", "model.pdiparams"


def export_pir_detector(model: Any, out_dir: Path, input_size: tuple[int, int]) -> Path:
    """out_dir/model.json + model.pdiparams: a dygraph PicoDet exported as train-det exports (PIR, with NMS)."""
    import paddle

    from shitu_cli.models import ppdet_compat
    from shitu_cli.models.export import fresh_name_scopes

    out_dir = Path(out_dir)
    _ready_for_export(model)
    with ppdet_compat.full_graph_export(), ppdet_compat.onnx_convertible_upsampling(model), fresh_name_scopes(), \
            ppdet_compat.im_shape_from_image(model), quiet_stdout():
        paddle.jit.save(paddle.jit.to_static(model, input_spec=_input_spec(input_size)), str(out_dir / "model"),
                        input_spec=_input_spec(input_size))
    (out_dir / "model.pdiparams.info").unlink(missing_ok=True)
    return out_dir


def _ready_for_export(model: Any) -> None:
    """Eval mode, with the box decoding and NMS inside the exported program (what the Detector reads)."""
    model.eval()
    for flag in ("export_post_process", "export_nms"):
        if hasattr(model, flag):
            setattr(model, flag, True)


def _input_spec(input_size: tuple[int, int]) -> list[dict[str, Any]]:
    from paddle.static import InputSpec

    return [{"image": InputSpec([None, 3, *input_size], "float32", "image"),
             "scale_factor": InputSpec([None, 2], "float32", "scale_factor")}]


def calibration_feeds(source: SourceModel, calib_set: ImageSet, preprocess=None) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    """A fresh iterator of the detector's {image, scale_factor} feeds over the calibration images, per call."""
    if preprocess is None:
        from shitu_cli.infer.detector import Detector

        preprocess = Detector(source.model_dir).preprocess
    return lambda: (feeds for feeds, _ in det_feeds(calib_set, preprocess))


def copy_infer_cfg(source: SourceModel, target: Path) -> None:
    """The detector's preprocessing as ppdet exported it travels with every compressed copy."""
    name = str(source.manifest.extra.get("infer_cfg", "infer_cfg.yml"))
    if (source.model_dir / name).is_file():
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.model_dir / name, Path(target) / name)
