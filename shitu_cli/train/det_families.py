"""The detector families train-det builds from ppdet's own architectures, and the PP-YOLO training tricks
as recipe fields: what differs per family (training reader, where NMS lives, the exported arch name).

picodet: PicoDet (LCNet + CSP-PAN + PicoHead), the mainbody detector.
ppyoloe: ppdet's YOLOv3 architecture with CSPResNet + CustomCSPPAN + PPYOLOEHead (anchor-free, TAL).
yolov3:  ppdet's YOLOv3 architecture with an anchor YOLOv3Head (here on MobileNetV1).

Every trick is ppdet's implementation switched on by config: its Mixup transform with the reader's
`mixup_epoch`, ModelEMA (`use_ema`), YOLOv3Loss's `label_smooth`, YOLOv3Head's `iou_aware` with
IouAwareLoss and MatrixNMS; the 1x/2x schedules (PiecewiseDecay) are in det_schedule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shitu_cli.errors import BadInput

if TYPE_CHECKING:
    from shitu_cli.train.det_config import DetSettings

FAMILIES = ("picodet", "ppyoloe", "yolov3")
SCHEDULES = ("cosine", "1x", "2x")
NMS_KINDS = ("multiclass", "matrix")
MIXUP = {"Mixup": {"alpha": 1.5, "beta": 1.5}}  # PP-YOLO's mixup ratio distribution
EXPAND_FILL = [123.675, 116.28, 103.53]  # RandomExpand pads with the ImageNet mean pixel
YOLO_MAX_BOXES = 50
PPYOLOE_STATIC_ASSIGNER_EPOCHS = 4  # PPYOLOEHead's default static_assigner_epoch


def family_of(document: dict[str, Any]) -> str:
    """The family of a recipe document: its `architecture` and, for YOLOv3, which head it names."""
    architecture = document.get("architecture")
    if architecture == "PicoDet":
        return "picodet"
    if architecture == "YOLOv3":
        head = (document.get("YOLOv3") or {}).get("yolo_head", "YOLOv3Head")
        return "ppyoloe" if head == "PPYOLOEHead" else "yolov3"
    raise BadInput(f"unsupported detector architecture {architecture!r}",
                   hint="a recipe needs `architecture: PicoDet` or `architecture: YOLOv3` (YOLOv3Head or PPYOLOEHead)")


def trained_epochs(settings: DetSettings) -> int:
    """Epochs the run trains: `epochs` is the 1x length, which the 2x schedule doubles."""
    return int(settings.epochs) * (2 if settings.schedule == "2x" else 1)


def check_tricks(family: str, settings: DetSettings) -> None:
    """Refuse a trick the family's ppdet head does not have, and unknown schedule / NMS names."""
    if settings.schedule not in SCHEDULES:
        raise BadInput(f"unknown schedule {settings.schedule!r}", hint=f"choose one of: {', '.join(SCHEDULES)}")
    if settings.nms not in NMS_KINDS:
        raise BadInput(f"unknown nms {settings.nms!r}", hint=f"choose one of: {', '.join(NMS_KINDS)}")
    if settings.mixup_epochs < 0:
        raise BadInput(f"mixup-epochs must not be negative, got {settings.mixup_epochs}")
    if settings.static_assigner_epochs is not None:
        if family != "ppyoloe":
            raise BadInput(f"static-assigner-epochs is a PP-YOLOE-head setting; this recipe is {family}",
                           hint="use it with a ppyoloe recipe, or drop it")
        if settings.static_assigner_epochs < 0:
            raise BadInput(f"static-assigner-epochs must not be negative, got {settings.static_assigner_epochs}")
    for trick in ("label_smooth", "iou_aware"):
        if getattr(settings, trick) and family != "yolov3":
            raise BadInput(f"{trick} is a YOLOv3-head trick; this recipe is {family}",
                           hint="use it with the yolov3-mobilenetv1 recipe, or drop it")


def epoch_switches(family: str, settings: DetSettings, document: dict[str, Any]) -> dict[str, int]:
    """The run's epoch-based switches (setting -> epochs of the first phase), for det_schedule to fit to
    the run: mixup when on, and PP-YOLOE's static assigner (the settings' value, else its head section's)."""
    switches = {"mixup_epochs": int(settings.mixup_epochs)} if settings.mixup_epochs else {}
    if family == "ppyoloe":
        asked = settings.static_assigner_epochs
        if asked is None:
            head = document.get("PPYOLOEHead") or {}
            asked = head.get("static_assigner_epoch", PPYOLOE_STATIC_ASSIGNER_EPOCHS)
        switches["static_assigner_epochs"] = int(asked)
    return switches


def train_reader(family: str, settings: DetSettings, sizes: list[int], normalize: dict[str, Any],
                 document: dict[str, Any]) -> dict[str, Any]:
    """ppdet's TrainReader for the family: PicoDet's as shitu always had it, the YOLO families' as their
    published configs have them (expand + crop, per-family targets)."""
    resize = {"BatchRandomResize": {"target_size": sizes, "random_size": True, "random_interp": True, "keep_ratio": False}}
    mixup = [MIXUP] if settings.mixup_epochs else []
    if family == "picodet":
        samples = [{"Decode": {}}, *mixup, {"RandomCrop": {}}, {"RandomFlip": {"prob": 0.5}}, {"RandomDistort": {}}]
        batches = [resize, normalize, {"Permute": {}}]
    else:
        samples = [{"Decode": {}}, *mixup, {"RandomDistort": {}}, {"RandomExpand": {"fill_value": EXPAND_FILL}},
                   {"RandomCrop": {}}, {"RandomFlip": {}}]
        if family == "ppyoloe":
            batches = [resize, normalize, {"Permute": {}}, {"PadGT": {}}]
        else:
            head = document.get("YOLOv3Head") or {}
            targets = {"anchor_masks": head["anchor_masks"], "anchors": head["anchors"],
                       "downsample_ratios": (document.get("YOLOv3Loss") or {}).get("downsample", [32, 16, 8])}
            batches = [resize, {"NormalizeBox": {}}, {"PadBox": {"num_max_boxes": YOLO_MAX_BOXES}}, {"BboxXYXY2XYWH": {}},
                       normalize, {"Permute": {}}, {"Gt2YoloTarget": targets}]
    reader = {"sample_transforms": samples, "batch_transforms": batches, "batch_size": settings.batch_size,
              "shuffle": True, "drop_last": True,
              # PicoDet's head takes per-image box lists; the YOLO families pad boxes to stack them in tensors
              "collate_batch": family != "picodet"}
    if settings.mixup_epochs:
        # ppdet mixes two images in each sample for the first mixup_epoch epochs; the last ones train on plain images
        reader["mixup_epoch"] = min(settings.mixup_epochs, trained_epochs(settings))
    return reader


def nms_section(config: dict[str, Any], family: str) -> str:
    """The config section whose `nms` key the family's post-processing reads."""
    if family == "picodet":
        return "PicoHead"
    return "PPYOLOEHead" if family == "ppyoloe" else "BBoxPostProcess"


def apply_tricks(config: dict[str, Any], family: str, settings: DetSettings) -> None:
    """The NMS kind and keep_top_k, label smoothing and the IoU-aware branch, in ppdet's own config keys."""
    section = nms_section(config, family)
    holder = dict(config.get(section) or {})
    nms = dict(holder.get("nms") or {"name": "MultiClassNMS"})
    if settings.nms == "matrix":
        threshold = float(nms.get("score_threshold", 0.01))
        # PP-YOLO's Matrix NMS settings: decayed scores, no IoU threshold, all boxes in, no background class
        nms = {"name": "MatrixNMS", "keep_top_k": settings.keep_top_k, "score_threshold": threshold,
               "post_threshold": threshold, "nms_top_k": -1, "background_label": -1}
    else:
        nms["keep_top_k"] = settings.keep_top_k
    holder["nms"] = nms
    if family == "ppyoloe" and settings.static_assigner_epochs is not None:
        holder["static_assigner_epoch"] = int(settings.static_assigner_epochs)  # ATSS before, task-aligned after
    config[section] = holder
    if family != "yolov3":
        return
    loss = dict(config.get("YOLOv3Loss") or {})
    head = dict(config.get("YOLOv3Head") or {})
    loss["label_smooth"] = bool(settings.label_smooth)
    if settings.iou_aware:
        head.update(iou_aware=True, iou_aware_factor=0.4)
        loss["iou_aware_loss"] = "IouAwareLoss"
        config["IouAwareLoss"] = {"loss_weight": 1.0}
    config["YOLOv3Loss"], config["YOLOv3Head"] = loss, head


def post_processing_nms(model, family: str):
    """The NMS object of a built model (what its export applies)."""
    if family == "picodet":
        return model.head.nms
    if family == "ppyoloe":
        return model.yolo_head.nms
    return model.post_process.nms


def nms_summary(nms) -> dict[str, Any]:
    """The exported model's NMS, for shitu.yaml."""
    summary = {"name": type(nms).__name__, "score_threshold": float(nms.score_threshold),
               "keep_top_k": int(nms.keep_top_k)}
    if hasattr(nms, "nms_threshold"):
        summary["nms_threshold"] = float(nms.nms_threshold)
    if hasattr(nms, "post_threshold"):
        summary["post_threshold"] = float(nms.post_threshold)
    return summary


def arch_name(config: dict[str, Any], family: str) -> str:
    """A readable architecture name for shitu.yaml."""
    if family == "picodet":
        return f"PicoDet-LCNet_x{config['LCNet']['scale']}"
    if family == "ppyoloe":
        return f"PP-YOLOE-CSPResNet_d{config.get('depth_mult', 1.0)}_w{config.get('width_mult', 1.0)}"
    backbone = config["YOLOv3"].get("backbone", "DarkNet")
    scale = (config.get(backbone) or {}).get("scale")
    name = "MobileNetV1" if backbone == "MobileNet" else backbone
    return f"YOLOv3-{name}" + (f"_x{scale}" if scale is not None else "")
