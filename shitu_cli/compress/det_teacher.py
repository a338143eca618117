"""`compress DET --prune R --teacher BIG_DET`: the pruned PicoDet learns from a separate, larger detector.

The teacher may be another architecture (PP-YOLOE, YOLOv3, a wider PicoDet). Three losses, each where it fits:
- features: each student neck level learns the teacher's level of the same stride through ppdet's
  MimicFeatureLoss (a 1x1 align conv where the channel counts differ, dropped after training);
- outputs: a PicoDet teacher whose dense outputs line up with the student's (same strides, classes and
  input size) passes its per-anchor scores (BCE) and boxes (L1, weighted by its score), as the self-teacher does;
- boxes: the student's own detection loss (PicoHead's VFL + DFL + GIoU, SimOTA) on the --calib ground truth
  where the images carry it (a COCO json); without labels and without dense outputs to match (another
  architecture), on the teacher's detections at or above PSEUDO_BOX_SCORE (pseudo-box distillation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shitu_cli.compress.candidate import Candidate, Stage, derived_manifest, stage_manifest
from shitu_cli.compress.images import ImageSet, iter_readable
from shitu_cli.compress.source import SourceModel, resolve_source
from shitu_cli.errors import BadInput

PSEUDO_BOX_SCORE = 0.3  # teacher detections at or above this score become the student's boxes
MAX_PSEUDO_BOXES = 30
FEATURE_WEIGHT = 1.0  # MimicFeatureLoss (normalised MSE) against the detection loss


@dataclass
class TrainingImages:
    """The calibration images as both nets see them, with the boxes the student trains on (input pixels)."""

    student: np.ndarray  # [N, 3, H, W], the student's normalisation
    teacher: np.ndarray  # [N, 3, H, W], same size, the teacher's normalisation
    boxes: list[np.ndarray]  # per image [n, 4] x1, y1, x2, y2
    classes: list[np.ndarray]  # per image [n, 1] int64
    has_boxes: np.ndarray  # [N] bool: the image's boxes are to be trained on (ground truth, or the teacher's)
    labelled: int  # images whose boxes are ground truth


# ----------------------------------------------------------------------------- checks


def check_teacher(teacher: Path | str, student: SourceModel) -> SourceModel:
    """The teacher as a SourceModel, or BadInput naming it: not a model, not a detector, other classes, or
    nothing to rebuild its dygraph net from."""
    from shitu_cli.train.det import MODEL_SECTIONS
    from shitu_cli.compress.det_rebuild import has_run_dir

    path = Path(teacher)
    source = resolve_source(path)
    if source.task != "det":
        raise BadInput(f"--teacher is a {source.task} model, not a detector",
                       hint="pass a train-det run dir or its export/", path=path)
    if list(source.manifest.labels) != list(student.manifest.labels):
        raise BadInput(f"--teacher detects other classes ({_names(source.manifest.labels)}) than the student "
                       f"({_names(student.manifest.labels)})",
                       hint="train the teacher on the same classes (train-det --keep-classes / --merge-classes)", path=path)
    if not (has_run_dir(source) or (source.model_dir / MODEL_SECTIONS).is_file()):
        raise BadInput(f"--teacher cannot be rebuilt: neither a train-det run dir nor {MODEL_SECTIONS} beside the export",
                       hint="pass the teacher's train-det run dir", path=path)
    return source


def _names(labels) -> str:
    labels = list(labels)
    return ", ".join(labels[:4]) + (", ..." if len(labels) > 4 else "")


def teacher_record(teacher: SourceModel, given: Path | str) -> dict[str, Any]:
    """What the compressed model's shitu.yaml and recipe say of its teacher."""
    from shitu_cli.artifacts import sha256_file

    return {"path": str(Path(given).resolve()), "model_dir": str(teacher.model_dir.resolve()),
            "arch": teacher.manifest.arch, "params_sha256": sha256_file(teacher.model_dir / teacher.manifest.params_file),
            "model_hash": teacher.manifest.model_hash}


# ----------------------------------------------------------------------------- the method


def detector_prune_from_teacher(source: SourceModel, teacher_path: Path | str, calib_set: ImageSet, work: Path,
                                ratio: float, epochs: int, lr: float, seed: int, batch_size: int,
                                stage: Stage) -> Candidate:
    """L1-prune `ratio` of the backbone's inner filters, then fine-tune the whole student on boxes (ground
    truth, else the teacher's) plus the teacher's neck features."""
    from shitu_cli.compress.det import DET_MODEL, DET_PARAMS, copy_infer_cfg, export_pir_detector
    from shitu_cli.compress.det_rebuild import rebuild_detector
    from shitu_cli.compress.prune import prune_lcnet_backbone

    teacher_source = check_teacher(teacher_path, source)
    stage("rebuilding the student and the teacher detectors")
    student = rebuild_detector(source)
    _check_student(student, source)
    teacher = rebuild_detector(teacher_source)
    stage(f"pruning {ratio:.0%} of the backbone's inner filters (L1)")
    summary = prune_lcnet_backbone(student, ratio)
    dense = _dense_outputs_line_up(teacher, student, tuple(source.manifest.input_size))
    if not dense:
        stage(f"detecting with the teacher on the calibration images (boxes at score >= {PSEUDO_BOX_SCORE:g})")
    data = training_images(source, teacher_source, calib_set, pseudo_boxes=not dense)
    stage(f"fine-tuning from the teacher: {epochs} epoch(s) on {len(data.student)} image(s)")
    levels = _fine_tune(teacher, student, data, dense, epochs, lr, seed, batch_size, work / "finetune")
    out_dir = export_pir_detector(student, work / "pruned", tuple(source.manifest.input_size))
    copy_infer_cfg(source, out_dir)
    method = f"prune-l1-{ratio:g}+distill-teacher"
    details = {"prune": "l1-filter (backbone, inner layers)", "ratio": ratio, "params_before": summary.params_before,
               "params_after": summary.params_after, "finetune_epochs": epochs, "finetune_images": len(data.student),
               "distill": _loss_summary(data, dense, levels),
               "teacher": teacher_record(teacher_source, teacher_path)}
    manifest = derived_manifest(source, DET_MODEL, DET_PARAMS, "fp32", method)
    return Candidate(out_dir, stage_manifest(out_dir, manifest), method, details, layer=student)


def _loss_summary(data: TrainingImages, dense: bool, levels: int) -> str:
    unlabelled = len(data.student) - data.labelled
    boxes = f"student detection loss on {data.labelled} labelled image(s)"
    if not dense:
        boxes += f" and on the teacher's boxes (score >= {PSEUDO_BOX_SCORE:g}) in {unlabelled}"
    outputs = "; teacher's dense scores (BCE) and boxes (L1)" if dense else ""
    return f"{boxes}{outputs}; MimicFeatureLoss on {levels} neck level(s) of equal stride"


def _check_student(student: Any, source: SourceModel) -> None:
    from ppdet.modeling.heads.simota_head import OTAVFLHead

    if not isinstance(getattr(student, "head", None), OTAVFLHead):
        raise BadInput(f"--teacher distillation is built for PicoDet students (PicoHead), this one has "
                       f"{type(getattr(student, 'head', None)).__name__}",
                       hint="drop --teacher (the unpruned model teaches itself)", path=source.model_dir)


def training_images(source: SourceModel, teacher: SourceModel, calib_set: ImageSet, pseudo_boxes: bool) -> TrainingImages:
    """Each readable image at the student's input size in both normalisations, with its boxes: the ground
    truth, else (with `pseudo_boxes`) the teacher's detections."""
    from shitu_cli.infer.detector import DetPreprocess, Detector
    from shitu_cli.infer.predictor import PredictorOptions

    student_pre = Detector(source.model_dir).preprocess
    teacher_detector = Detector(teacher.model_dir, PredictorOptions(mkldnn=False))
    # the teacher's own normalisation, at the student's size: the two nets' feature maps then line up
    teacher_pre = DetPreprocess(student_pre.size, teacher_detector.preprocess.interpolation, teacher_detector.preprocess.table)
    labels = list(source.manifest.labels)
    students, teachers, boxes, classes, has_boxes, truth = [], [], [], [], [], []
    for rgb, sample in iter_readable(calib_set):
        image, scale_factor = student_pre(rgb)
        students.append(image[0])
        teachers.append(teacher_pre(rgb)[0][0])
        if sample.boxes is not None:
            rows = [(*box[:4], _class_index(box[4], labels, calib_set.source)) for box in sample.boxes]
        elif pseudo_boxes:
            found = teacher_detector.detect(rgb, thresh=PSEUDO_BOX_SCORE, max_boxes=MAX_PSEUDO_BOXES)
            rows = [(*d.box, labels.index(d.label)) for d in found if d.label in labels]
        else:
            rows = []
        has_boxes.append(sample.boxes is not None or pseudo_boxes)
        truth.append(sample.boxes is not None)
        table = np.asarray(rows, np.float32).reshape(-1, 5)
        scale_y, scale_x = scale_factor[0]
        boxes.append(table[:, :4] * np.array([scale_x, scale_y, scale_x, scale_y], np.float32))
        classes.append(table[:, 4:].astype(np.int64))
    if not students:
        raise BadInput("no calibration image could be read", hint="check the --calib images", path=calib_set.source)
    return TrainingImages(np.stack(students), np.stack(teachers), boxes, classes, np.array(has_boxes), sum(truth))


def _class_index(name: str, labels: list[str], where: Path) -> int:
    if name in labels:
        return labels.index(name)
    if len(labels) == 1:
        return 0  # a one-class (mainbody) detector: every object is its class
    raise BadInput(f"the --calib boxes have a class {name!r} the detector does not know ({_names(labels)})",
                   hint="calibrate with images of the detector's own classes, or with an image folder", path=where)


# ----------------------------------------------------------------------------- training


def _fine_tune(teacher: Any, student: Any, data: TrainingImages, dense: bool, epochs: int, lr: float, seed: int,
               batch_size: int, run_dir: Path) -> int:
    """Train `student` in place; returns how many neck levels were distilled."""
    import paddle
    from ppdet.slim.distill_loss import MimicFeatureLoss

    from shitu_cli.train.loop import LoopConfig, fit

    teacher.eval()
    student.eval()
    pairs = _level_pairs(teacher, student, data)
    mimics = [MimicFeatureLoss(student_channels=cs, teacher_channels=ct, normalize=True, loss_weight=FEATURE_WEIGHT)
              for _, _, cs, ct in pairs]
    trainee = _Trainee(student, mimics)
    width = data.student.shape[-1]

    def make_loader(epoch):
        order = np.random.permutation(len(data.student))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            flip = np.random.rand(len(index)) < 0.5  # the only augmentation: the images are few
            x_student, x_teacher = data.student[index].copy(), data.teacher[index].copy()
            x_student[flip], x_teacher[flip] = x_student[flip][..., ::-1], x_teacher[flip][..., ::-1]
            boxes = [_flipped(data.boxes[i], width) if f else data.boxes[i] for i, f in zip(index, flip)]
            yield (paddle.to_tensor(np.ascontiguousarray(x_student)), paddle.to_tensor(np.ascontiguousarray(x_teacher)),
                   boxes, [data.classes[i] for i in index], data.has_boxes[index])

    def loss_fn(model, batch):
        x_student, x_teacher, boxes, classes, has_boxes = batch
        with paddle.no_grad():
            fpn_t = _neck(teacher, x_teacher)
            outputs_t = teacher.head.forward_eval(fpn_t, export_post_process=True) if dense else None
        fpn_s = _neck(model.student, x_student)
        logs, loss = {}, 0.0
        if has_boxes.any():
            detection = _detection_loss(model.student.head, fpn_s, boxes, classes, has_boxes)
            loss, logs["det"] = loss + detection, round(float(detection), 5)
        if dense:
            outputs_s = model.student.head.forward_eval(fpn_s, export_post_process=True)
            output = _dense_output_loss(outputs_s, outputs_t, float(x_student.shape[-1]))
            loss, logs["out"] = loss + output, round(float(output), 5)
        if pairs:
            feature = sum(mimic(fpn_s[i], fpn_t[j]) for mimic, (i, j, _, _) in zip(model.mimics, pairs))
            loss, logs["feat"] = loss + feature, round(float(feature), 5)
        return loss, logs

    config = LoopConfig(epochs=epochs, lr=lr, warmup_epochs=0.0, ema_decay=None, seed=seed, weight_decay=1e-5)
    fit(trainee, make_loader, -(-len(data.student) // batch_size), loss_fn, None, config, run_dir, batch_size=batch_size)
    student.eval()
    return len(pairs)


def _detection_loss(head: Any, fpn: list, boxes: list, classes: list, has_boxes: np.ndarray):
    """PicoHead's own training loss (VFL + GIoU + DFL, SimOTA) on the images of the batch that have boxes."""
    import paddle

    keep = np.flatnonzero(has_boxes)
    cls_scores, box_preds = head.forward_train(fpn)
    if len(keep) < len(has_boxes):
        index = paddle.to_tensor(keep)
        cls_scores = [paddle.index_select(t, index) for t in cls_scores]
        box_preds = [paddle.index_select(t, index) for t in box_preds]
    meta = {"im_id": paddle.arange(len(keep)), "gt_bbox": [paddle.to_tensor(boxes[i]) for i in keep],
            "gt_class": [paddle.to_tensor(classes[i]) for i in keep]}
    losses = head.get_loss((cls_scores, box_preds), meta)
    return losses["loss_vfl"] + losses["loss_bbox"] + losses["loss_dfl"]


def _dense_output_loss(outputs_s, outputs_t, input_side: float):
    """Per-anchor score BCE, plus box L1 (in input sides) where the teacher sees an object: the self-teacher's
    output loss, with the bigger teacher's outputs."""
    import paddle.nn.functional as F

    (scores_s, boxes_s), (scores_t, boxes_t) = outputs_s, outputs_t
    score_loss = F.binary_cross_entropy(scores_s.clip(1e-6, 1 - 1e-6), scores_t)
    weight = scores_t.max(axis=1).unsqueeze(-1)
    box_loss = (weight * (boxes_s - boxes_t).abs()).sum() / (weight.sum() * 4 + 1e-6) / input_side
    return score_loss + box_loss


def _dense_outputs_line_up(teacher: Any, student: Any, input_size: tuple[int, int]) -> bool:
    """Whether the teacher's per-anchor scores and boxes match the student's one for one (a PicoDet head
    with the same strides, classes and anchors at the student's input size)."""
    import paddle
    from ppdet.modeling.heads.simota_head import OTAVFLHead

    if not isinstance(getattr(teacher, "head", None), OTAVFLHead):
        return False
    probe = paddle.zeros([1, 3, *input_size], "float32")
    with paddle.no_grad():
        try:
            got = [t.shape for t in student.head.forward_eval(_neck(student, probe), export_post_process=True)]
            want = [t.shape for t in teacher.head.forward_eval(_neck(teacher, probe), export_post_process=True)]
        except (ValueError, RuntimeError):
            return False
    return got == want and list(student.head.fpn_stride) == list(teacher.head.fpn_stride)


def _neck(net: Any, x) -> list:
    """The neck's feature maps (PicoDet, PP-YOLOE and YOLOv3 necks all take the backbone's outputs)."""
    return list(net.neck(net.backbone({"image": x})))


def _level_pairs(teacher: Any, student: Any, data: TrainingImages) -> list[tuple[int, int, int, int]]:
    """(student level, teacher level, student channels, teacher channels) for each pair of equal strides."""
    import paddle

    with paddle.no_grad():
        fpn_s = _neck(student, paddle.to_tensor(data.student[:1]))
        fpn_t = _neck(teacher, paddle.to_tensor(data.teacher[:1]))
    pairs = []
    for i, feature in enumerate(fpn_s):
        for j, target in enumerate(fpn_t):
            if tuple(feature.shape[2:]) == tuple(target.shape[2:]):
                pairs.append((i, j, int(feature.shape[1]), int(target.shape[1])))
                break
    return pairs


def _flipped(boxes: np.ndarray, width: int) -> np.ndarray:
    out = boxes.copy()
    out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return out


def _trainee_class():
    import paddle

    class Trainee(paddle.nn.Layer):
        """The student and the align convs of its feature losses: one set of parameters for the optimizer."""

        def __init__(self, student, mimics):
            super().__init__()
            self.student = student
            self.mimics = paddle.nn.LayerList(mimics)

    return Trainee


def _Trainee(student, mimics):
    return _trainee_class()(student, mimics)
