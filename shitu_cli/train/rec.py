"""Training a PP-ShiTuV2 feature extractor (RecModel = backbone + BNNeck + FC): data, loss, eval, export.

`train_rec` is the library twin of `shitu train-rec`; it returns a `TrainRecResult` and
writes metrics.csv, curves.png, checkpoints/, export/ (model + shitu.yaml) and recipe.yaml.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from shitu_cli.artifacts import read_yaml, sha256_bytes, sha256_file, write_yaml
from shitu_cli.data.loader import LabeledImage, load_batches, sequential_batches
from shitu_cli.errors import BadInput
from shitu_cli.models.ppcls import REC_BACKBONES, check_arch
from shitu_cli.train.metrics import l2_normalize

CORE = "shitu_cli.train.rec:train_rec"
RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes" / "rec"
DEFAULT_RECIPE = "pp-shituv2"
LISTS = ("train_list.txt", "gallery_list.txt", "query_list.txt")
SETTINGS_FILE = "settings.yaml"  # under checkpoints/: what --resume must match
EXPORT_DIR = "export"
SPLIT_DIR = "split"
# Settings that may change between a run and its --resume without changing the result.
RESUME_FREE = ("num_workers", "eval_batch_size")
EXPORT_TOLERANCE = 1e-4
EVAL_CACHE_BYTES = 256 << 20  # decode the eval images once when they fit in this much memory
CALIBRATION_IMAGES = 256  # training images that set the BN statistics of evaluated/exported weights

Progress = Callable[..., None]  # progress(advance=0, total=None, completed=None, **live_fields)


@dataclass
class RecSettings:
    """Every knob of a run; defaults < recipe file < flags. All land in recipe.yaml."""

    backbone: str = "PPLCNetV2_base_ShiTu"
    embedding_size: int = 512
    input_size: int = 224
    epochs: int = 20
    batch_size: int = 32  # P classes x K images
    images_per_class: int = 4  # K
    lr: float = 0.04
    warmup_epochs: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 1e-5
    ema_decay: float = 0.999
    label_smoothing: float = 0.1
    triplet_weight: float = 1.0
    margin: float = 0.5
    absolute_loss_weight: float = 0.1
    ap_value: float = 0.8
    an_value: float = 0.4
    rotate_degrees: float = 30.0
    crop_scale_min: float = 0.5
    flip: bool = True
    eval_every: int = 1
    eval_batch_size: int = 32
    seed: int = 42
    num_workers: int = 2
    holdout: float = 0.2  # self-split only: fraction of classes held out for gallery/query
    query_fraction: float = 0.3  # self-split only: share of each held-out class that queries


@dataclass
class RecData:
    root: Path  # list paths are relative to this
    lists_dir: Path
    train: list[LabeledImage]
    gallery: list[LabeledImage]
    query: list[LabeledImage]
    train_classes: list[str]  # head index -> class name
    eval_labels: list[str]  # gallery/query label index -> name
    split: dict[str, Any] | None  # how a class-folder dataset was split, None for given lists
    list_files: list[Path]
    warnings: list[str] = field(default_factory=list)


@dataclass
class TrainRecResult:
    run_dir: Path
    export_dir: Path
    recipe: Path
    backbone: str
    embedding_size: int
    input_size: int
    epochs: int
    steps_per_epoch: int
    batch_size: int
    train_images: int
    train_classes: int
    gallery_images: int
    query_images: int
    best_epoch: int | None
    best_recall1: float | None
    final: dict[str, float]  # metrics of the exported (best) model
    initial: dict[str, float]  # the same metrics before training
    export_max_abs_diff: float  # raw BNNeck features
    export_normalised_diff: float  # L2-normalised features: what the index compares
    pretrained: dict[str, Any] | None
    resumed_from_epoch: int
    seconds: float
    warnings: list[str]


# ----------------------------------------------------------------------------- settings


def recipe_path(recipe: str | Path | None) -> Path:
    """A shipped recipe name (recipes/rec/<name>.yml) or a path to a YAML file."""
    name = str(recipe or DEFAULT_RECIPE)
    shipped = RECIPE_DIR / f"{name}.yml"
    if shipped.is_file():
        return shipped
    path = Path(name)
    if path.is_file():
        return path
    known = sorted(p.stem for p in RECIPE_DIR.glob("*.yml"))
    raise BadInput(f"no recipe named {name!r}", hint=f"use one of: {', '.join(known)}, or a path to a .yml file")


def load_recipe(recipe: str | Path | None) -> dict[str, Any]:
    path = recipe_path(recipe)
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise BadInput("a rec recipe must be a mapping of setting: value", path=path)
    data.pop("description", None)
    return data


def resolve_settings(recipe: str | Path | None, overrides: dict[str, Any], saved: dict[str, Any] | None = None) -> RecSettings:
    """defaults < recipe (or the saved settings of the run being resumed) < flags."""
    from shitu_cli.recipes import merge_settings

    defaults = asdict(RecSettings())
    base = saved if saved is not None else load_recipe(recipe)
    merged = merge_settings(defaults, base, overrides)
    settings = RecSettings(**{f.name: _coerce(f.type, merged[f.name]) for f in fields(RecSettings)})
    check_settings(settings)
    return settings


def _coerce(kind: Any, value: Any) -> Any:
    kind = str(kind)
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def check_settings(s: RecSettings) -> None:
    check_arch(s.backbone, REC_BACKBONES, "rec backbone")
    positive = {"epochs": s.epochs, "batch_size": s.batch_size, "images_per_class": s.images_per_class,
                "embedding_size": s.embedding_size, "input_size": s.input_size, "eval_every": s.eval_every,
                "eval_batch_size": s.eval_batch_size}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if s.input_size < 32:
        raise BadInput(f"--input-size {s.input_size} is too small", hint="use 32 or more (PP-ShiTuV2 uses 224)")
    if s.batch_size // s.images_per_class < 2:
        raise BadInput(
            f"--batch-size {s.batch_size} holds fewer than two classes of {s.images_per_class} images",
            hint=f"use a batch size of at least {2 * s.images_per_class} (P classes x K={s.images_per_class} images)",
        )
    if not s.lr > 0:
        raise BadInput(f"--lr must be positive, got {s.lr}")
    if s.num_workers < 0:
        raise BadInput(f"--num-workers must be 0 or more, got {s.num_workers}")
    if not 0 < s.crop_scale_min <= 1:
        raise BadInput(f"crop_scale_min must be in (0, 1], got {s.crop_scale_min}")


def settings_hash(settings: RecSettings) -> str:
    """The `recipe_hash` in shitu.yaml: sha256 of the resolved training settings."""
    return sha256_bytes(json.dumps(asdict(settings), sort_keys=True).encode("utf-8"))


# ----------------------------------------------------------------------------- data


def resolve_data(dataset: Path, run_dir: Path, settings: RecSettings) -> RecData:
    """Rec lists in `dataset` (split-dataset's output), or class folders split here into RUN_DIR/split."""
    dataset = Path(dataset)
    if not dataset.exists():
        raise BadInput("dataset folder not found", hint="pass a folder of class folders or of split-dataset rec lists", path=dataset)
    if not dataset.is_dir():
        raise BadInput("not a folder", hint="pass the dataset folder, not a file in it", path=dataset)
    dataset = dataset.resolve()
    split = None
    if (dataset / "train_list.txt").is_file():
        lists_dir = dataset
    else:
        lists_dir, split = _split_here(dataset, run_dir, settings)
    return read_rec_lists(lists_dir, split)


def _split_here(dataset: Path, run_dir: Path, settings: RecSettings) -> tuple[Path, dict[str, Any]]:
    from shitu_cli.data.split import split_dataset

    out = Path(run_dir).resolve() / SPLIT_DIR
    if dataset in out.parents:
        raise BadInput("RUN_DIR is inside the dataset folder, whose class folders train-rec splits",
                       hint="put the run folder outside the dataset", path=run_dir)
    result = split_dataset(dataset, out=out, val=settings.holdout, test=settings.query_fraction,
                           seed=settings.seed, format="rec")
    split = {
        "dataset_dir": dataset.as_posix(), "lists_dir": f"{SPLIT_DIR}/", "core": "shitu_cli.data.split:split_dataset",
        "holdout": settings.holdout, "query_fraction": settings.query_fraction, "seed": settings.seed,
        "counts": dict(result.counts), "skipped": len(result.skipped),
    }
    return out, split


def read_rec_lists(lists_dir: Path, split: dict[str, Any] | None = None) -> RecData:
    from shitu_cli.data.lists import read_labels, read_rec_list

    entries = {name: read_rec_list(lists_dir / name) if (lists_dir / name).is_file() else [] for name in LISTS}
    train_file = lists_dir / "train_list.txt"
    if not entries["train_list.txt"]:
        raise BadInput("the training list is empty", hint="list `relpath<TAB>label` lines, or run shitu split-dataset --format rec", path=train_file)
    root = _image_root(lists_dir, entries["train_list.txt"][0][0], split)
    labels_file = lists_dir / "labels.txt"
    if labels_file.is_file():
        _check_labels(read_labels(labels_file), entries, lists_dir)
    warnings: list[str] = []
    train_classes = list(dict.fromkeys(label for _, label in entries["train_list.txt"]))
    train_classes.sort()
    if len(train_classes) < 2:
        raise BadInput(f"the training list has {len(train_classes)} class; training needs at least two", path=train_file)
    train = _labeled(root, entries["train_list.txt"], {name: i for i, name in enumerate(train_classes)}, train_file)
    gallery_rows, query_rows = entries["gallery_list.txt"], entries["query_list.txt"]
    _check_eval_lists(lists_dir, gallery_rows, query_rows, warnings)
    eval_labels = sorted({label for _, label in gallery_rows + query_rows})
    eval_index = {name: i for i, name in enumerate(eval_labels)}
    gallery = _labeled(root, gallery_rows, eval_index, lists_dir / "gallery_list.txt")
    query = _labeled(root, query_rows, eval_index, lists_dir / "query_list.txt")
    warnings += _small_class_warnings(entries["train_list.txt"])
    files = [lists_dir / name for name in (*LISTS, "labels.txt") if (lists_dir / name).is_file()]
    return RecData(root, lists_dir, train, gallery, query, train_classes, eval_labels, split, files, warnings)


def _image_root(lists_dir: Path, first: str, split: dict[str, Any] | None) -> Path:
    """List paths are relative to the dataset dir; split-dataset --out may have put the lists elsewhere."""
    if split is not None:
        return Path(split["dataset_dir"])
    if (lists_dir / first).is_file():
        return lists_dir
    recipe = lists_dir / "recipe.yaml"
    if recipe.is_file():
        recorded = (read_yaml(recipe) or {}).get("options", {}).get("dataset_dir")
        if recorded and (Path(recorded) / first).is_file():
            return Path(recorded)
    return lists_dir


def _check_labels(known: list[str], entries: dict[str, list[tuple[str, str]]], lists_dir: Path) -> None:
    names = set(known)
    for list_name, rows in entries.items():
        for number, (_, label) in enumerate(rows, start=1):
            if label not in names:
                raise BadInput(
                    f"entry {number} has label {label!r}, which labels.txt does not name",
                    hint="make the lists and labels.txt come from the same split", path=lists_dir / list_name,
                )


def _check_eval_lists(lists_dir: Path, gallery: list, query: list, warnings: list[str]) -> None:
    if not gallery and not query:
        warnings.append("no gallery_list.txt / query_list.txt entries: training without evaluation, the last weights are exported")
        return
    for name, rows in (("gallery_list.txt", gallery), ("query_list.txt", query)):
        if not rows:
            raise BadInput("this list is empty or missing but its partner is not; evaluation needs both",
                           hint="split with shitu split-dataset --format rec", path=lists_dir / name)
    both = sorted({path for path, _ in gallery} & {path for path, _ in query})
    if both:
        raise BadInput(
            f"{len(both)} image(s) are in both query_list.txt and gallery_list.txt (e.g. {both[0]}); "
            "a query would find itself", hint="make query and gallery disjoint (shitu split-dataset --format rec does)",
            path=lists_dir,
        )
    unanswerable = {label for _, label in query} - {label for _, label in gallery}
    if unanswerable:
        warnings.append(f"{len(unanswerable)} query label(s) have no gallery image (e.g. {sorted(unanswerable)[0]!r}); those queries are not scored")


def _labeled(root: Path, rows: list[tuple[str, str]], index: dict[str, int], list_file: Path) -> list[LabeledImage]:
    samples = []
    for number, (rel, label) in enumerate(rows, start=1):
        path = root / rel
        if not path.is_file():
            raise BadInput(f"entry {number} names {rel}, which is not a file under {root}",
                           hint="list paths are relative to the dataset folder", path=list_file)
        samples.append(LabeledImage(path, index[label]))
    return samples


def _small_class_warnings(rows: list[tuple[str, str]]) -> list[str]:
    counts: dict[str, int] = {}
    for _, label in rows:
        counts[label] = counts.get(label, 0) + 1
    single = sorted(name for name, n in counts.items() if n < 2)
    if not single:
        return []
    return [f"{len(single)} training class(es) have a single image (e.g. {single[0]!r}); "
            "PK batches repeat it, augmented, as its own positive"]


def list_checksums(data: RecData) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in data.list_files}


# ----------------------------------------------------------------------------- model


def rec_arch(settings: RecSettings, class_num: int) -> dict[str, Any]:
    """ppcls's RecModel config: backbone (last conv = embedding size) -> flatten -> BNNeck -> FC."""
    size = settings.embedding_size
    return {
        "name": "RecModel",
        "Backbone": {"name": settings.backbone, "pretrained": False, "class_expand": size},
        "BackboneStopLayer": {"name": "flatten"},
        # PP-ShiTuV2 freezes the BNNeck bias at zero (a vanishing learning rate).
        "Neck": {"name": "BNNeck", "num_features": size,
                 "bias_attr": {"initializer": {"name": "Constant", "value": 0.0}, "learning_rate": 1e-20}},
        "Head": {"name": "FC", "embedding_size": size, "class_num": class_num,
                 "weight_attr": {"initializer": {"name": "Normal", "std": 0.001}}, "bias_attr": False},
    }


def build_rec_model(settings: RecSettings, class_num: int):
    from shitu_cli.models.ppcls import build_arch

    return build_arch(rec_arch(settings, class_num))


def _size_dependent(key: str) -> bool:
    # Layers whose shapes follow the embedding size or class count: re-initialised, not errors.
    return key.startswith(("head.", "neck.", "backbone.last_conv.", "backbone.fc."))


def load_pretrained(model, path: Path | str, backbone: str) -> dict[str, Any]:
    """Load a local .pdparams: a whole RecModel checkpoint or backbone-only (ImageNet/SSLD) weights."""
    from shitu_cli.models.legacy import load_weights
    from shitu_cli.models.registry import resolve_weights

    path = resolve_weights(path)  # a .pdparams path, or a name such as PPLCNet_x1_0-pretrained
    state = load_weights(path)  # arrays only: a downloaded pickle never runs code
    if not isinstance(state, dict) or not state:
        raise BadInput("holds no named weights", hint="pass a .pdparams file saved from a state_dict", path=path)
    if not any(str(k).startswith("backbone.") for k in state):
        state = {f"backbone.{k}": v for k, v in state.items()}  # backbone-only ImageNet weights
    target = model.state_dict()
    loaded, reinitialised, missing, mismatched = {}, [], [], []
    for key, param in target.items():
        if key not in state:
            (reinitialised if _size_dependent(key) else missing).append(key)
            continue
        have, want = list(state[key].shape), list(param.shape)
        if have == want:
            loaded[key] = state[key]
        elif _size_dependent(key):
            reinitialised.append(key)
        else:
            mismatched.append(f"{key} {have} != {want}")
    if missing or mismatched:
        problems = [f"shape {m}" for m in mismatched] + [f"missing {k}" for k in missing]
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise BadInput(f"weights do not fit backbone {backbone}: {shown}",
                       hint=f"pass weights of {backbone} (or choose the --backbone they were trained for)", path=path)
    model.set_state_dict({**target, **loaded})
    return {"path": path.resolve().as_posix(), "sha256": sha256_file(path), "loaded": len(loaded),
            "reinitialised": len(reinitialised)}


def embedding_layer(model):
    """The export wrapper: RecModel without its FC head, image -> BNNeck features, not L2-normalised
    (the index normalises). Shares the model's sublayers, so it sees its weights."""
    import paddle

    class RecEmbedding(paddle.nn.Layer):
        def __init__(self, rec_model):
            super().__init__()
            self.backbone = rec_model.backbone
            self.neck = rec_model.neck

        def forward(self, x):
            return self.neck(self.backbone(x))

    return RecEmbedding(model)


def re_parameterize(layer) -> int:
    """Fold PPLCNetV2's multi-branch depthwise convs into one conv (as before export). Returns how many."""
    import paddle

    count = 0
    with paddle.no_grad():
        for sub in layer.sublayers():
            if hasattr(sub, "re_parameterize") and getattr(sub, "use_rep", False):
                sub.re_parameterize()
                count += 1
    return count


# ----------------------------------------------------------------------------- evaluation


class Embedder:
    """Eval-mode embeddings for a list of images, with the inference preprocessing."""

    def __init__(self, samples: list[LabeledImage], settings: RecSettings):
        from shitu_cli.models.manifest import Preprocess

        self.samples = samples
        self.preprocess = Preprocess(resize="direct")
        self.size = (settings.input_size, settings.input_size)
        self.batch_size = settings.eval_batch_size
        self.num_workers = settings.num_workers
        fits = len(samples) * 3 * self.size[0] * self.size[1] * 4 <= EVAL_CACHE_BYTES
        self._cache = list(self._batches()) if fits else None

    def batches(self):
        """(images, labels) batches: from memory when they fit, else decoded again."""
        if self._cache is not None:
            return self._cache
        return self._batches()

    def _batches(self):
        order = sequential_batches(len(self.samples), self.batch_size)
        return load_batches(self.samples, order, self.preprocess, self.size, num_workers=self.num_workers)

    def __call__(self, model) -> tuple[np.ndarray, np.ndarray]:
        import paddle

        model.eval()
        features, labels = [], []
        with paddle.no_grad():
            for images, batch_labels in self.batches():
                features.append(model(paddle.to_tensor(images))["features"].numpy())
                labels.append(batch_labels)
        return np.concatenate(features), np.concatenate(labels)


def calibration_images(data: RecData, settings: RecSettings) -> Embedder:
    """A seeded sample of training images (eval preprocessing) for `calibrate_batch_norm`."""
    order = np.random.default_rng([settings.seed, 7]).permutation(len(data.train))[:CALIBRATION_IMAGES]
    return Embedder([data.train[i] for i in sorted(order)], settings)


def calibrate_batch_norm(model, images: Embedder) -> None:
    """Precise BN: set every BatchNorm's running mean/variance to the exact average of its batch
    statistics over `images`, the rest of the net in eval mode.

    A short run leaves the running stats near their init (mean 0, var 1) and the EMA copy lags
    them further; in eval mode every layer then shrinks the signal, and the net maps all images
    to one embedding (cosine 1.0 to six digits). Recomputing the statistics for the weights
    actually evaluated and exported fixes that; it depends only on weights and images, so it is
    deterministic and idempotent.
    """
    import paddle

    norms = [layer for layer in model.sublayers() if isinstance(layer, (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm))]
    model.eval()
    momenta = [norm._momentum for norm in norms]
    for norm in norms:
        norm.train()
    try:
        with paddle.no_grad():
            for step, (batch, _) in enumerate(images.batches(), start=1):
                for norm in norms:
                    norm._momentum = 1.0 - 1.0 / step  # running = mean of the batch stats so far
                model(paddle.to_tensor(batch))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm._momentum = momentum
        model.eval()


def make_evaluate(data: RecData, settings: RecSettings, calibration: Embedder) -> Callable[[Any], dict[str, float]] | None:
    from shitu_cli.train.metrics import GALLERY, QUERY, RetrievalBatch, RetrievalEvaluator

    if not data.query:
        return None
    embed_gallery, embed_query = Embedder(data.gallery, settings), Embedder(data.query, settings)
    evaluator = RetrievalEvaluator(ks=(1, 5))

    def evaluate(model) -> dict[str, float]:
        # Mutates the evaluated model's BN statistics on purpose: the best checkpoint saved
        # right after this evaluation then holds exactly the statistics that were measured.
        calibrate_batch_norm(model, calibration)
        evaluator.reset()
        for side, embed in ((GALLERY, embed_gallery), (QUERY, embed_query)):
            features, labels = embed(model)
            evaluator.process(features, RetrievalBatch(labels, side))
        metrics = evaluator.evaluate()
        return {name: round(metrics[name], 6) for name in ("recall1", "recall5", "mAP")}

    return evaluate


# ----------------------------------------------------------------------------- training


def make_train_loader(data: RecData, settings: RecSettings):
    """(sampler, make_loader(epoch)) yielding paddle tensors of augmented PK batches."""
    from shitu_cli.data.transforms import TrainAugment
    from shitu_cli.models.manifest import Preprocess
    from shitu_cli.train.samplers import PKBatchSampler

    size = (settings.input_size, settings.input_size)
    sampler = PKBatchSampler([s.label for s in data.train], settings.batch_size // settings.images_per_class,
                             settings.images_per_class, seed=settings.seed)
    augment = TrainAugment(size, crop_scale=(settings.crop_scale_min, 1.0), rotate_degrees=settings.rotate_degrees,
                           flip=settings.flip)
    preprocess = Preprocess(resize="direct")

    def make_loader(epoch: int):
        import paddle

        batches = load_batches(data.train, sampler.epoch(epoch), preprocess, size, augment=augment,
                               seed=settings.seed * 1000 + epoch, num_workers=settings.num_workers)
        for images, labels in batches:
            yield paddle.to_tensor(images), paddle.to_tensor(labels)

    return sampler, make_loader


def _loop_config(settings: RecSettings):
    from shitu_cli.train.loop import LoopConfig

    return LoopConfig(
        epochs=settings.epochs, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay,
        warmup_epochs=settings.warmup_epochs, ema_decay=settings.ema_decay or None, eval_every=settings.eval_every,
        best_metric="recall1", seed=settings.seed,
    )


def _saved_settings(run_dir: Path, resume: bool) -> dict[str, Any] | None:
    from shitu_cli.train.checkpoints import CHECKPOINT_DIR

    state = run_dir / CHECKPOINT_DIR / "last_state.yaml"
    if not resume:
        return None
    saved = run_dir / CHECKPOINT_DIR / SETTINGS_FILE
    if not state.is_file() or not saved.is_file():
        raise BadInput("nothing to resume: no checkpoint of an earlier train-rec run here",
                       hint="run without --resume to start training", path=run_dir)
    return read_yaml(saved)


def _check_resume(saved: dict[str, Any], overrides: dict[str, Any]) -> None:
    changed = [k for k, v in overrides.items() if v is not None and k in saved and k not in RESUME_FREE and v != saved[k]]
    if changed:
        what = ", ".join(f"{k} {saved[k]!r} -> {overrides[k]!r}" for k in changed)
        raise BadInput(f"--resume continues the run with its own settings, but these differ: {what}",
                       hint="drop those options, or train into a new RUN_DIR")


def train_rec(dataset: Path | str, out: Path | str, recipe: str | None = None, pretrained: Path | str | None = None,
              resume: bool = False, progress: Progress | None = None, **overrides: Any) -> TrainRecResult:
    """Train a recogniser on `dataset` into the run dir `out`; see the module docstring for the outputs."""
    import time

    from shitu_cli.train.checkpoints import CHECKPOINT_DIR, Checkpoints
    from shitu_cli.train.loop import seed_everything

    started = time.perf_counter()
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise BadInput("RUN_DIR is a file, not a folder", path=run_dir)
    saved = _saved_settings(run_dir, resume)
    if saved is not None:
        _check_resume(saved, overrides)
    settings = resolve_settings(recipe, overrides, saved)
    data = resolve_data(Path(dataset), run_dir, settings)
    seed_everything(settings.seed)
    model = build_rec_model(settings, len(data.train_classes))
    pretrained_info = load_pretrained(model, pretrained, settings.backbone) if pretrained else None
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    write_yaml(run_dir / CHECKPOINT_DIR / SETTINGS_FILE, asdict(settings))
    calibration = calibration_images(data, settings)
    evaluate = make_evaluate(data, settings, calibration)
    initial = _initial_metrics(model, evaluate)
    done_epochs = int((read_yaml(run_dir / CHECKPOINT_DIR / "last_state.yaml") or {}).get("epoch", 0)) if resume else 0
    fitted, sampler = _fit(model, data, settings, evaluate, run_dir, resume, done_epochs, progress)
    if evaluate is None:  # nothing calibrated the final weights yet; export and best.pdparams must agree
        calibrate_batch_norm(model, calibration)
        Checkpoints(run_dir).save("best.pdparams", model.state_dict())
    final = _best_row_metrics(fitted)
    export_dir, check = export_rec(model, run_dir / EXPORT_DIR, settings, data)
    notes = list(data.warnings)
    if check.max_normalised_diff > EXPORT_TOLERANCE:
        notes.append(f"exported model's normalised embeddings differ from the trained one's by up to "
                     f"{check.max_normalised_diff:.2e} (over {EXPORT_TOLERANCE:g})")
    result = TrainRecResult(
        run_dir=run_dir, export_dir=export_dir, recipe=run_dir / "recipe.yaml", backbone=settings.backbone,
        embedding_size=settings.embedding_size, input_size=settings.input_size, epochs=settings.epochs,
        steps_per_epoch=len(sampler), batch_size=sampler.batch_size, train_images=len(data.train),
        train_classes=len(data.train_classes), gallery_images=len(data.gallery), query_images=len(data.query),
        best_epoch=fitted.best_epoch, best_recall1=fitted.best_value, final=final, initial=initial,
        export_max_abs_diff=check.max_abs_diff, export_normalised_diff=check.max_normalised_diff,
        pretrained=pretrained_info, resumed_from_epoch=done_epochs,
        seconds=round(time.perf_counter() - started, 2), warnings=notes,
    )
    _write_run_recipe(result, settings, data, dataset, recipe, pretrained)
    return result


def _initial_metrics(model, evaluate) -> dict[str, float]:
    """Metrics of the untrained net, measured on a copy so calibrating it leaves training untouched."""
    import copy

    return evaluate(copy.deepcopy(model)) if evaluate else {}


def _fit(model, data: RecData, settings: RecSettings, evaluate, run_dir: Path, resume: bool, done_epochs: int,
         progress: Progress | None):
    """The shared loop with PK batches and CE + triplet; returns (FitResult, sampler)."""
    import warnings

    from shitu_cli.train.loop import fit
    from shitu_cli.train.losses import RecLoss, RecLossConfig

    from dataclasses import fields

    # The recipe is flat: every loss knob it names is a RecSettings field of the same name.
    loss_knobs = {f.name: getattr(settings, f.name) for f in fields(RecLossConfig) if hasattr(settings, f.name)}
    loss = RecLoss(RecLossConfig(**loss_knobs))
    sampler, make_loader = make_train_loader(data, settings)
    if progress:
        progress(total=settings.epochs * len(sampler), completed=done_epochs * len(sampler))
    with warnings.catch_warnings():
        # paddle's BatchNorm1D/2D warn on every training forward that they track global stats.
        warnings.filterwarnings("ignore", message="When training, we now always track")
        fitted = fit(model, make_loader, len(sampler), lambda m, batch: loss(m(batch[0]), batch[1]), evaluate,
                     _loop_config(settings), run_dir, resume=resume, on_step=progress, batch_size=sampler.batch_size)
    return fitted, sampler


def _best_row_metrics(fitted) -> dict[str, float]:
    """The exported (best) model's metrics, as measured at its epoch."""
    for row in fitted.history:
        if row["epoch"] == fitted.best_epoch:
            return {name: row[name] for name in ("recall1", "recall5", "mAP")}
    return {}


# ----------------------------------------------------------------------------- export and recipe


def export_rec(model, export_dir: Path, settings: RecSettings, data: RecData) -> tuple[Path, "ExportCheck"]:
    """Export the embedding wrapper (re-parameterised) and check it against the dygraph model
    through Paddle Inference; returns the export dir and an ExportCheck."""
    import paddle

    from shitu_cli.infer.predictor import PredictorOptions, build_predictor
    from shitu_cli.models.export import export_layer
    from shitu_cli.models.manifest import ModelManifest, Preprocess

    size = (settings.input_size, settings.input_size)
    probe = next(load_batches((data.query or data.train)[:4], [list(range(min(4, len(data.query or data.train))))],
                              Preprocess(resize="direct"), size))[0]
    wrapper = embedding_layer(model)
    wrapper.eval()
    with paddle.no_grad():
        reference = wrapper(paddle.to_tensor(probe)).numpy()
    folded = re_parameterize(wrapper)
    manifest = ModelManifest(
        task="rec", arch=f"RecModel/{settings.backbone}", input_size=size, model_file="", params_file="",
        preprocess=Preprocess(resize="direct"), embedding_dim=settings.embedding_size,
        recipe_hash=settings_hash(settings),
        extra={"backbone": settings.backbone, "output": "BNNeck features, not L2-normalised",
               "train_classes": len(data.train_classes), "re_parameterized_blocks": folded},
    )
    export_layer(wrapper, export_dir, [[None, 3, *size]], manifest)
    predictor = build_predictor(export_dir, PredictorOptions(), task="rec")
    exported = predictor.run(probe)[0]
    return Path(export_dir), ExportCheck(
        max_abs_diff=float(np.abs(exported - reference).max()),
        max_normalised_diff=float(np.abs(l2_normalize(exported) - l2_normalize(reference)).max()),
        feature_scale=float(np.abs(reference).max()),
    )


@dataclass
class ExportCheck:
    """How far Paddle Inference's output is from the dygraph model's on a few real images.

    BNNeck features can reach tens in magnitude, where float32 rounding alone gives ~1e-3 absolute;
    the normalised difference (unit vectors, what the index compares) is the scale-free check."""

    max_abs_diff: float
    max_normalised_diff: float
    feature_scale: float


def _write_run_recipe(result: TrainRecResult, settings: RecSettings, data: RecData, dataset, recipe, pretrained) -> None:
    from shitu_cli.recipes import Recipe, write_recipe
    from shitu_cli.train.loop import CURVES_PNG, METRICS_CSV

    run_dir = result.run_dir
    # Every setting is explicit in `options`, so a replay needs no recipe file; the base one is noted in inputs.
    options = {"dataset": Path(dataset).resolve().as_posix(), "recipe": None,
               "pretrained": Path(pretrained).resolve().as_posix() if pretrained else None, **asdict(settings)}
    inputs = {"base_recipe": recipe_path(recipe).resolve().as_posix(), "lists_dir": data.lists_dir.as_posix(), "image_root": data.root.as_posix(), "lists": list_checksums(data),
              "train_images": result.train_images, "train_classes": result.train_classes,
              "gallery_images": result.gallery_images, "query_images": result.query_images,
              "split": data.split, "pretrained": result.pretrained}
    metrics = {"best_epoch": result.best_epoch, "best_recall1": result.best_recall1, "final": result.final,
               "initial": result.initial, "export_max_abs_diff": result.export_max_abs_diff,
               "export_normalised_diff": result.export_normalised_diff}
    written = [p for p in result.export_dir.iterdir() if p.is_file()]
    written += [run_dir / name for name in (METRICS_CSV, CURVES_PNG) if (run_dir / name).is_file()]
    if data.split is not None:
        written += [p for p in data.list_files if p.is_file()]
    write_recipe(run_dir, Recipe(command="train-rec", core=CORE, options=options, seed=settings.seed,
                                 inputs=inputs, metrics=metrics), written)
