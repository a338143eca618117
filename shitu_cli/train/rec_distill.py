"""train-rec distillation: the student's embeddings learn a teacher's (cosine through a projection head,
and batch similarity matching), on labelled and unlabelled images, with CE + triplet where labels are given.

The teacher's outputs come from teacher_cache (computed once per image view); the student sees the same
views at its own size. The projection head exists only for training: export takes backbone + neck.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from shitu_cli.data.loader import LabeledImage
from shitu_cli.errors import BadInput


@dataclass
class DistillSettings:
    """Every distillation knob; all land in recipe.yaml under options.distill."""

    teacher_output: str | None = None  # ONNX output name; default the first 2-D output
    teacher_size: int | None = None  # default: from the file
    teacher_mean: list[float] | None = None
    teacher_std: list[float] | None = None
    teacher_views: int = 2  # view 0 = whole image, others = seeded crops; the teacher runs once per view
    view_crop_scale_min: float = 0.5
    view_rotate_degrees: float = 10.0
    cosine_weight: float = 1.0  # 1 - cos(projection(student), teacher), centred teacher features
    relation_weight: float = 1.0  # KL between rows of the teacher's and student's batch similarity softmaxes
    relation_temperature: float = 0.1
    label_weight: float = 1.0  # scales CE + triplet on labelled images; 0 = labels are not used
    unlabeled_per_batch: int = 32  # pool images added to every batch (pool = unlabelled + training images)
    centre_teacher: bool = True  # subtract the mean teacher output: its common direction says nothing
    cache_dir: str | None = None  # default $SHITU_HOME/teacher-cache


def distill_settings(given: dict[str, Any] | None) -> DistillSettings:
    from shitu_cli.recipes import merge_settings

    merged = merge_settings(asdict(DistillSettings()), {k: v for k, v in (given or {}).items() if v is not None})
    for name in ("teacher_mean", "teacher_std"):
        merged[name] = _triple(name, merged[name])
    settings = DistillSettings(**merged)
    if settings.teacher_views < 1:
        raise BadInput(f"--teacher-views must be 1 or more, got {settings.teacher_views}")
    if min(settings.cosine_weight, settings.relation_weight, settings.label_weight) < 0:
        raise BadInput("distillation loss weights must be 0 or more")
    if settings.cosine_weight == 0 and settings.relation_weight == 0:
        raise BadInput("--teacher with cosine_weight and relation_weight both 0 distils nothing")
    return settings


def _triple(name: str, value: Any) -> list[float] | None:
    """'0.5,0.5,0.5' or [0.5, 0.5, 0.5] -> three floats (std > 0), refused by flag name otherwise."""
    if value is None:
        return None
    parts = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        numbers = [float(v) for v in parts]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != 3 or (name == "teacher_std" and min(numbers) <= 0):
        raise BadInput(f"--{name.replace('_', '-')} needs three numbers R,G,B{' above 0' if name == 'teacher_std' else ''}, "
                       f"got {value!r}", hint="e.g. 0.5,0.5,0.5")
    return numbers


# ----------------------------------------------------------------------------- the model with a projection


def wrap_student(rec_model, teacher_dim: int, embedding_size: int):
    """RecModel's backbone/neck/head (same parameter names, so checkpoints stay RecModel checkpoints)
    plus a linear projection to the teacher's dimension, used only by the cosine loss."""
    import paddle

    class DistilledRecModel(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.backbone, self.neck, self.head = rec_model.backbone, rec_model.neck, rec_model.head
            self.projection = paddle.nn.Linear(embedding_size, teacher_dim)

        def forward(self, x):
            features = self.neck(self.backbone(x))
            return {"features": features, "logits": self.head(features), "projected": self.projection(features)}

    return DistilledRecModel()


# ----------------------------------------------------------------------------- losses (paddle tensors)


def cosine_distill_loss(projected, teacher):
    """Mean of 1 - cos(student projection, teacher) over the batch; `teacher` is unit-norm already."""
    import paddle.nn.functional as F

    return (1.0 - (F.normalize(projected, axis=1) * teacher).sum(axis=1)).mean()


def relation_loss(student, teacher, temperature: float):
    """Similarity matching: each image's softmax over its cosine similarities to the rest of the batch,
    the student's against the teacher's (KL, self-similarity masked out). It asks for the teacher's
    neighbours, not its coordinates, so the student's dimension is free."""
    import paddle
    import paddle.nn.functional as F

    s = F.normalize(student, axis=1)
    s_sim = paddle.matmul(s, s, transpose_y=True) / temperature
    t_sim = paddle.matmul(teacher, teacher, transpose_y=True) / temperature
    mask = paddle.eye(s_sim.shape[0]) * 1e4
    log_s = F.log_softmax(s_sim - mask, axis=1)
    log_t = F.log_softmax(t_sim - mask, axis=1)
    return (log_t.exp() * (log_t - log_s)).sum(axis=1).mean()


class DistillLoss:
    """cosine + relation on every row; CE + triplet (RecLoss) on the first `labelled` rows."""

    def __init__(self, settings: DistillSettings, label_loss):
        self.settings, self.label_loss = settings, label_loss

    def __call__(self, model, batch) -> tuple[Any, dict[str, float]]:
        images, labels, targets = batch
        out = model(images)
        s, logs, total = self.settings, {}, 0.0
        if s.cosine_weight:
            cos = cosine_distill_loss(out["projected"], targets)
            total, logs["cos"] = total + s.cosine_weight * cos, round(float(cos), 4)
        if s.relation_weight:
            rel = relation_loss(out["features"], targets, s.relation_temperature)
            total, logs["rel"] = total + s.relation_weight * rel, round(float(rel), 4)
        labelled = int(labels.shape[0])
        if s.label_weight and labelled:
            head = {"features": out["features"][:labelled], "logits": out["logits"][:labelled]}
            label_loss, label_logs = self.label_loss(head, labels)
            total = total + s.label_weight * label_loss
            logs.update(label_logs)
        return total, logs


# ----------------------------------------------------------------------------- data


@dataclass
class DistillData:
    pool: list[Path]  # training images then unlabelled ones; targets rows follow this order
    train_count: int  # the first train_count pool entries are data.train, in order
    keys: list[str]
    targets: np.ndarray  # [pool, views, dim] centred (if asked) and L2-normalised
    record: dict[str, Any]  # what recipe.yaml and the result say about the teacher and its cache
    labels: list[int]  # class index of each training image (pool rows < train_count)


def unlabeled_images(folder: Path | str | None) -> list[Path]:
    if not folder:
        return []
    from shitu_cli.data.images import iter_image_files

    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput("--unlabeled folder not found", hint="pass a folder of images (any layout)", path=folder)
    images = sorted(Path(p) for p in iter_image_files(folder))
    if not images:
        raise BadInput("--unlabeled folder holds no images", path=folder)
    return images


def teacher_targets(teacher, train: list[LabeledImage], unlabeled: list[Path], settings: DistillSettings,
                    seed: int, num_workers: int, on_progress=None) -> DistillData:
    """Run (or read from the cache) the teacher on every view of every pool image."""
    import time

    from shitu_cli.train.teacher_cache import TeacherCache, ViewSpec, default_cache_root

    spec = ViewSpec(views=settings.teacher_views, crop_scale_min=settings.view_crop_scale_min,
                    rotate_degrees=settings.view_rotate_degrees, flip=True, seed=seed)
    cache = TeacherCache(Path(settings.cache_dir) if settings.cache_dir else default_cache_root(), teacher, spec)
    pool = [s.path for s in train] + list(unlabeled)
    started = time.perf_counter()
    cached = cache.targets(pool, num_workers, on_progress)
    seconds = time.perf_counter() - started
    targets = cached.targets
    mean = targets.reshape(-1, targets.shape[-1]).mean(axis=0) if settings.centre_teacher else 0.0
    targets = targets - mean
    targets = targets / np.maximum(np.linalg.norm(targets, axis=-1, keepdims=True), 1e-12)
    record = {"teacher": teacher.info.record(), "cache_dir": cache.dir.as_posix(), "cache_hits": cached.hits,
              "cache_misses": cached.misses, "teacher_images_run": cached.teacher_images,
              "teacher_seconds": round(seconds, 2), "pool_images": len(pool), "unlabeled_images": len(unlabeled),
              "views": settings.teacher_views}
    return DistillData(pool, len(train), cached.keys, targets.astype(np.float32), record, [s.label for s in train])


def make_distill_loader(data: DistillData, sampler, settings: DistillSettings, student_size: int, seed: int,
                        num_workers: int, view_spec_seed: int):
    """make_loader(epoch) -> (images, labels, teacher targets) batches: the PK batch (labelled rows first,
    when labels are used) plus `unlabeled_per_batch` pool images, each as one of its cached views."""
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.preprocess import normalize_batch
    from shitu_cli.models.manifest import Preprocess
    from shitu_cli.train.teacher_cache import ViewSpec, make_view

    spec = ViewSpec(views=settings.teacher_views, crop_scale_min=settings.view_crop_scale_min,
                    rotate_degrees=settings.view_rotate_degrees, flip=True, seed=view_spec_seed)
    preprocess, size = Preprocess(resize="direct"), (student_size, student_size)
    extra, use_labels = settings.unlabeled_per_batch, settings.label_weight > 0

    def student_view(job: tuple[int, int]) -> np.ndarray:
        row, view = job
        return make_view(read_image(data.pool[row]), data.keys[row], view, spec, size)

    def make_loader(epoch: int):
        import paddle

        rng = np.random.default_rng([seed, epoch, 11])
        order = rng.permutation(len(data.pool))
        need = len(sampler) * extra
        if need > len(order):
            order = np.concatenate([order] + [rng.permutation(len(data.pool)) for _ in range(math.ceil(need / len(order)))])
        pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        try:
            for step, labelled_rows in enumerate(sampler.epoch(epoch)):
                rows = list(labelled_rows) + [int(i) for i in order[step * extra : (step + 1) * extra]]
                labelled = len(labelled_rows) if use_labels else 0  # without labels, PK rows are pool images too
                views = rng.integers(0, settings.teacher_views, len(rows))
                jobs = list(zip(rows, (int(v) for v in views)))
                images = list(pool.map(student_view, jobs)) if pool else [student_view(j) for j in jobs]
                labels = np.array([data.labels[r] for r in rows[:labelled]], np.int64)
                targets = data.targets[np.array(rows), views]
                yield (paddle.to_tensor(normalize_batch(images, preprocess)), paddle.to_tensor(labels),
                       paddle.to_tensor(targets))
        finally:
            if pool:
                pool.shutdown(wait=False, cancel_futures=True)

    return make_loader


def fill_once(targets, world=None, store=None) -> DistillData:
    """`targets()` under paddle.distributed.launch: rank 0 runs the teacher and fills the cache while the
    others wait, then they read it (see distributed.in_turn). The record's `teacher_images_run` becomes the
    total over all ranks: the pool's views once, not once per rank."""
    from shitu_cli.train import distributed

    world = world or distributed.current_world()
    data = distributed.in_turn(world, "teacher-targets", targets, store)
    if world.distributed:  # also keeps rank 0 from training on until every rank has its targets
        run_here = data.record["teacher_images_run"]
        data.record["teacher_images_run"] = distributed.total_over_ranks(world, "teacher-images-run", run_here, store)
    return data


def settings_record(settings: DistillSettings) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in fields(DistillSettings)}


# ----------------------------------------------------------------------------- the plan train_rec follows


@dataclass
class DistillPlan:
    """A loaded teacher and its settings; `fit_targets` fills `data` once the training list is known."""

    source: Path
    unlabeled_dir: Path | None
    settings: DistillSettings
    teacher: Any  # teachers.LoadedTeacher
    unlabeled: list[Path]
    data: DistillData | None = None

    def fit_targets(self, train: list[LabeledImage], seed: int, num_workers: int, progress=None) -> None:
        """`progress(teacher=(done, total))` about every tenth of the images the teacher has to run on."""
        step = {"next": 0}

        def report(done: int, total: int) -> None:
            if progress is not None and (done >= step["next"] or done == total):
                step["next"] = done + max(1, total // 10)
                progress(teacher=(done, total))

        self.data = fill_once(lambda: teacher_targets(self.teacher, train, self.unlabeled, self.settings, seed,
                                                      num_workers, report))

    def wrap(self, model, embedding_size: int):
        return wrap_student(model, self.teacher.info.dim, embedding_size)

    def loss(self, label_loss) -> DistillLoss:
        return DistillLoss(self.settings, label_loss)

    def loader(self, sampler, input_size: int, seed: int, num_workers: int):
        return make_distill_loader(self.data, sampler, self.settings, input_size, seed, num_workers, seed)

    def options(self) -> dict[str, Any]:
        """train_rec's keyword arguments that replay this distillation (recipe.yaml options)."""
        return {"teacher": self.source.resolve().as_posix(),
                "unlabeled": self.unlabeled_dir.resolve().as_posix() if self.unlabeled_dir else None,
                "distill": settings_record(self.settings)}

    def record(self) -> dict[str, Any]:
        return dict(self.data.record) if self.data else {"teacher": self.teacher.info.record()}


def plan_distillation(teacher: Path | str | None, unlabeled: Path | str | None, distill: dict[str, Any] | None,
                      threads: int) -> DistillPlan | None:
    """Load and check the teacher (refused by name, before any training); None without --teacher."""
    from shitu_cli.train.teachers import TeacherOptions, load_teacher_model

    if teacher is None:
        if unlabeled is not None:
            raise BadInput("--unlabeled needs --teacher: unlabelled images only feed the distillation loss",
                           hint="add --teacher MODEL (an .onnx, a Paddle export or a run dir)", path=unlabeled)
        if distill:
            raise BadInput("distillation settings were given without --teacher")
        return None
    settings = distill_settings(distill)
    images = unlabeled_images(unlabeled)
    options = TeacherOptions(output=settings.teacher_output, size=settings.teacher_size,
                             mean=tuple(settings.teacher_mean) if settings.teacher_mean else None,
                             std=tuple(settings.teacher_std) if settings.teacher_std else None, threads=threads,
                             wants="features")
    loaded = load_teacher_model(teacher, options)
    return DistillPlan(Path(teacher), Path(unlabeled) if unlabeled else None, settings, loaded, images)


def resumed_distillation(options: dict[str, Any], teacher, unlabeled, distill) -> tuple[Any, Any, Any]:
    """A resumed run distils as it began: its recipe's teacher, pool and settings; others are refused."""
    from shitu_cli.train.run_dir import same_path

    for name, given in (("teacher", teacher), ("unlabeled", unlabeled)):
        if given is not None and not same_path(given, options.get(name)):
            raise BadInput(f"--resume keeps the run's {name} ({options.get(name)!r}), not {str(given)!r}",
                           hint=f"leave --{name} out, or start a new run folder")
    if distill:
        raise BadInput("--resume keeps the run's distillation settings", hint="leave them out, or start a new run folder")
    return options.get("teacher"), options.get("unlabeled"), options.get("distill")
