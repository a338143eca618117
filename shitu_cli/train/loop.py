"""The shared training loop: optimiser + schedule, EMA, eval every N epochs, best/last checkpoints,
resume at epoch boundaries to the same result, metrics.csv and curves.png.

Tasks plug in three things: a loader factory `make_loader(epoch)`, a `loss_fn(model, batch)`
returning (loss tensor, {name: float}), and an `evaluate(model) -> {metric: float}`.
"""

from __future__ import annotations

import csv
import io
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from shitu_cli.artifacts import atomic_write_text
from shitu_cli.errors import BadInput
from shitu_cli.train.stop import Interrupted, StopRequest
from shitu_cli.train.checkpoints import Checkpoints, load_into

METRICS_CSV = "metrics.csv"
CURVES_PNG = "curves.png"


class Evaluator(Protocol):
    """detectron2-style evaluator: reset, feed batches, then compute metrics."""

    def reset(self) -> None: ...

    def process(self, outputs: Any, batch: Any) -> None: ...

    def evaluate(self) -> dict[str, float]: ...


@dataclass
class LoopConfig:
    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    lr_schedule: str = "cosine"  # cosine | piecewise
    lr_decay_epochs: list[int] = field(default_factory=list)  # piecewise boundaries
    lr_decay_gamma: float = 0.1
    ema_decay: float | None = 0.999  # None disables EMA
    eval_every: int = 1
    best_metric: str = "top1"
    seed: int = 42
    grad_clip: float | None = None


@dataclass
class FitResult:
    best_metric: str
    best_value: float | None
    best_epoch: int | None
    last_metrics: dict[str, float]
    history: list[dict[str, float]]
    best_checkpoint: Path
    seconds: float
    stopped_by: str | None = None  # SIGINT / SIGTERM when a signal ended the run early
    epochs_done: int = 0


StepCallback = Callable[..., None]  # on_step(advance=1, **live_fields); at an epoch's end on_step(advance=0, epoch_end=EpochSummary)


@dataclass
class EpochSummary:
    """What a finished epoch prints as one line: loss, the evaluated metrics, speed and time left."""

    epoch: int
    epochs: int
    loss: float
    metrics: dict[str, float]
    images_per_second: float
    seconds: float
    eta_seconds: float


def seed_everything(seed: int) -> None:
    import paddle

    random.seed(seed)
    np.random.seed(seed % (2**32))
    paddle.seed(seed)


def _schedule(config: LoopConfig, steps_per_epoch: int):
    import paddle

    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.lr_schedule == "cosine":
        inner = paddle.optimizer.lr.CosineAnnealingDecay(config.lr, T_max=max(1, total - warmup))
    elif config.lr_schedule == "piecewise":
        boundaries = [e * steps_per_epoch for e in config.lr_decay_epochs]
        values = [config.lr * config.lr_decay_gamma**i for i in range(len(boundaries) + 1)]
        inner = paddle.optimizer.lr.PiecewiseDecay(boundaries, values)
    else:
        raise BadInput(f"unknown lr schedule {config.lr_schedule!r}", hint="use cosine or piecewise")
    if warmup <= 0:
        return inner
    return paddle.optimizer.lr.LinearWarmup(inner, warmup_steps=warmup, start_lr=config.lr * 0.01, end_lr=config.lr)


def build_optimizer(model, config: LoopConfig, steps_per_epoch: int):
    import paddle

    schedule = _schedule(config, steps_per_epoch)
    clip = paddle.nn.ClipGradByGlobalNorm(config.grad_clip) if config.grad_clip else None
    optimizer = paddle.optimizer.Momentum(
        learning_rate=schedule,
        momentum=config.momentum,
        parameters=model.parameters(),
        weight_decay=paddle.regularizer.L2Decay(config.weight_decay),
        grad_clip=clip,
    )
    return optimizer, schedule


def fit(
    model,
    make_loader: Callable[[int], Iterable[Any]],
    steps_per_epoch: int,
    loss_fn: Callable[[Any, Any], tuple[Any, dict[str, float]]],
    evaluate: Callable[[Any], dict[str, float]] | None,
    config: LoopConfig,
    run_dir: Path,
    resume: bool = False,
    on_step: StepCallback | None = None,
    batch_size: int = 1,
    stop: StopRequest | None = None,
) -> FitResult:
    """Train `model` in place; the best weights (EMA ones when EMA is on) land in checkpoints/best.pdparams.

    When `stop` is set (a signal), the loop leaves after the current step: the last epoch's checkpoint
    stays as it is (resume goes on from there) and the model gets the best weights so far.

    Under paddle.distributed.launch every rank runs this with its share of each global batch (the
    loader's job); the model trains through DataParallel, and rank 0 alone evaluates and writes
    checkpoints and metrics. The other ranks return with their (identical) trained weights.
    """
    from shitu_cli.train import distributed

    world = distributed.start() if distributed.current_world().distributed else distributed.World()
    run_dir = Path(run_dir)
    started = time.perf_counter()
    optimizer, schedule = build_optimizer(model, config, steps_per_epoch)
    ema = _make_ema(model, config)
    checkpoints = Checkpoints(run_dir)
    state = {"epoch": 0, "best_value": None, "best_epoch": None, "history": []}
    if resume:
        state = checkpoints.load_last(model, optimizer, schedule, ema) or state
    elif checkpoints.state_file.exists() and world.is_main:
        checkpoints.state_file.unlink()
    # Rank 0 may have evaluated the untrained net alone; gloo's collectives give up after ~30 s, the store's wait does not.
    distributed.barrier(world)
    distributed.check_resumed_together(state["epoch"], world, run_dir)
    train_model = distributed.wrap_model(model, world)  # after loading: DataParallel starts every rank from rank 0's weights
    stopping = False

    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        stopping = distributed.agree_stop(stop, world)
        if stopping:
            break
        # Seeding per epoch is what makes a resumed run land on the same result.
        seed_everything(config.seed * 1000 + epoch)
        model.train()
        losses: list[float] = []
        epoch_started = time.perf_counter()
        for batch in make_loader(epoch):
            tick = time.perf_counter()
            loss, logs = loss_fn(train_model, batch)
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            schedule.step()
            if ema is not None:
                ema.decay = ema_decay_at(config.ema_decay, int(schedule.last_epoch))
                ema.update(model)
            losses.append(float(loss))
            if on_step is not None:
                ips = batch_size / max(time.perf_counter() - tick, 1e-9)
                on_step(advance=1, epoch=epoch, loss=round(float(loss), 4), ips=round(ips, 1), **logs)
            stopping = distributed.agree_stop(stop, world)
            if stopping:
                break
        if stopping:
            break  # a part-trained epoch is dropped: resume restarts it from the last checkpoint
        train_seconds = time.perf_counter() - epoch_started  # decoding included, evaluation not
        mean_loss = distributed.mean_over_ranks(float(np.mean(losses)) if losses else float("nan"), world)
        if not world.is_main:
            state["epoch"] = epoch
            distributed.barrier(world)  # while rank 0 evaluates and writes, however long that takes
            continue
        row = {"epoch": epoch, "lr": float(optimizer.get_lr()), "loss": mean_loss}
        if evaluate is not None and (epoch % config.eval_every == 0 or epoch == config.epochs):
            eval_model = ema.module if ema is not None else model
            metrics = evaluate(eval_model)
            row.update(metrics)
            value = metrics.get(config.best_metric)
            if value is not None and (state["best_value"] is None or value > state["best_value"]):
                state["best_value"], state["best_epoch"] = float(value), epoch
                checkpoints.save("best.pdparams", eval_model.state_dict())
        state["history"].append(row)
        state["epoch"] = epoch
        checkpoints.save_last(model, optimizer, schedule, ema, state)
        write_metrics(run_dir, state["history"])
        if on_step is not None:
            on_step(advance=0, epoch_end=_epoch_summary(row, config.epochs, len(losses) * batch_size, train_seconds,
                                                        time.perf_counter() - epoch_started))
        distributed.barrier(world)

    stopping = distributed.agree_stop(stop, world)  # a signal during the last evaluation counts too
    distributed.unwrap_model(model)
    distributed.back_to_cpu(model)
    if world.is_main:
        if stopping:
            _best_so_far(checkpoints, state, stop)
        elif state["best_epoch"] is None:  # no evaluation ran: the final weights are the best we know
            checkpoints.save("best.pdparams", (ema.module if ema is not None else model).state_dict())
        load_into(model, checkpoints.best)
    history = state["history"]
    return FitResult(
        best_metric=config.best_metric,
        best_value=state["best_value"],
        best_epoch=state["best_epoch"],
        last_metrics=history[-1] if history else {},
        history=history,
        best_checkpoint=checkpoints.best,
        seconds=time.perf_counter() - started,
        stopped_by=stop.signal_name if stop else None,
        epochs_done=state["epoch"],
    )


def _epoch_summary(row: dict[str, float], epochs: int, images: int, train_seconds: float, seconds: float) -> EpochSummary:
    metrics = {k: v for k, v in row.items() if k not in ("epoch", "lr", "loss")}
    epoch = int(row["epoch"])
    return EpochSummary(epoch=epoch, epochs=epochs, loss=row["loss"], metrics=metrics,
                        images_per_second=images / max(train_seconds, 1e-9), seconds=seconds,
                        eta_seconds=seconds * (epochs - epoch))


def _best_so_far(checkpoints: Checkpoints, state: dict[str, Any], stop: StopRequest) -> None:
    """After a stop: best.pdparams of this run, else the last finished epoch's weights, else nothing to export."""
    if state["best_epoch"] is not None and checkpoints.best.is_file():
        return
    for name in ("last.ema.pdparams", "last.pdparams"):
        if state["epoch"] > 0 and (checkpoints.dir / name).is_file():
            _copy(checkpoints.dir / name, checkpoints.best)
            return
    raise Interrupted(stop, "before the first epoch ended: nothing to export", path=checkpoints.dir.parent)


def _copy(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(source.read_bytes())
    tmp.replace(target)


def ema_decay_at(decay: float, step: int) -> float:
    """EMA decay warmed up over the first steps, as TF's num_updates does. A fixed decay keeps
    ~decay**step of the random initial weights for hundreds of steps; averaged with the trained
    ones (and their BN statistics) that gives a net whose features no longer depend on the input."""
    return min(decay, (1.0 + step) / (10.0 + step))


def _make_ema(model, config: LoopConfig):
    if not config.ema_decay:
        return None
    from shitu_cli.models.ppcls import import_ppcls

    import_ppcls()
    from ppcls.utils.ema import ExponentialMovingAverage

    return ExponentialMovingAverage(model, decay=config.ema_decay)


def write_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    """metrics.csv (one row per epoch) and curves.png (loss and every metric against epoch)."""
    if not history:
        return
    columns = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(Path(run_dir) / METRICS_CSV, buffer.getvalue())
    plot_curves(Path(run_dir) / CURVES_PNG, history, columns)


def plot_curves(path: Path, history: list[dict[str, float]], columns: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [c for c in columns if c not in ("epoch",)]
    fig, axes = plt.subplots(1, len(series), figsize=(3.2 * len(series), 2.8), squeeze=False)
    for axis, name in zip(axes[0], series):
        points = [(row["epoch"], row[name]) for row in history if name in row]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        axis.set_title(name)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def config_dict(config: LoopConfig) -> dict[str, Any]:
    return asdict(config)
