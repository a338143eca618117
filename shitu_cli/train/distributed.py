"""Data-parallel training under `paddle.distributed.launch`: which process this is, the device it
trains on, the DataParallel wrapper, each rank's share of a global batch, and the few collectives
the loop needs (agreeing on a stop, letting rank 0 go first).

The contract: `batch_size` in a recipe is the GLOBAL batch. N processes each take 1/N of every
global batch, DataParallel averages their gradients, so the optimiser sees the same mean gradient
over the same images as one process would (up to float summation order, batch norm's per-process
statistics on the CPU, and losses that mine within a batch). lr, warm-up and steps per epoch are
therefore unchanged by N; a larger global batch wants a linearly larger lr (Goyal et al. 2017),
which the user asks for with --batch-size and --lr together.

Without the launcher's environment every function here is a no-op for a world of one process.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

from shitu_cli.errors import BadInput, WorkFailed

# What paddle.distributed.launch sets in each worker's environment.
ENV_RANK = "PADDLE_TRAINER_ID"
ENV_WORLD_SIZE = "PADDLE_TRAINERS_NUM"
ENV_LOCAL_RANK = "PADDLE_LOCAL_RANK"
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank 0 of 1 when not launched."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 evaluates and writes every output of the run; the others only train."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current_world() -> World:
    """The world the launcher described in the environment (no paddle import)."""
    try:
        size = int(os.environ.get(ENV_WORLD_SIZE, "1") or 1)
        rank = int(os.environ.get(ENV_RANK, "0") or 0)
        local = int(os.environ.get(ENV_LOCAL_RANK, str(rank)) or 0)
    except ValueError:
        return World()
    return World(rank=rank, size=max(size, 1), local_rank=local) if size > 1 else World()


def gpu_available() -> bool:
    """True when Paddle was built with CUDA and sees a GPU: training then runs there."""
    import paddle

    return bool(paddle.is_compiled_with_cuda()) and paddle.device.cuda.device_count() > 0


def device_for(world: World) -> str:
    """'gpu:<id>' on a CUDA build with a GPU (the launcher's --devices pick the id), else 'cpu'."""
    if not gpu_available():
        return "cpu"
    selected = os.environ.get("FLAGS_selected_gpus", "").split(",")[0]
    return f"gpu:{int(selected) if selected.strip().isdigit() else world.local_rank}"


def start(world: World | None = None) -> World:
    """Pick this process's device and, under the launcher, join the process group (once)."""
    import paddle
    import paddle.distributed as dist

    world = world or current_world()
    paddle.set_device(device_for(world))
    if world.distributed and not dist.is_initialized():
        dist.init_parallel_env()
    return world


def uses_sync_batch_norm(world: World) -> bool:
    """Sync BN on GPUs when several processes train: each GPU's share of a PK batch is small, and
    Paddle has no CPU kernel for it (on the CPU each process normalises by its own share's statistics)."""
    return world.distributed and gpu_available()


def wrap_model(model, world: World):
    """The layer to train through: the model itself, or a DataParallel around it (which also makes
    every rank start from rank 0's weights). With sync BN the model's BN layers are swapped in place;
    `unwrap_model` puts the original layers back before evaluation on one process and export."""
    import paddle

    if not world.distributed:
        return model
    if uses_sync_batch_norm(world):
        convert_batch_norms(model)
    return paddle.DataParallel(model)


def back_to_cpu(model) -> None:
    """After GPU training: the model and later tensors on the CPU, where export is traced and checked
    against CPU inference (the deployment target; cuDNN/TF32 rounding would exceed the export checks)."""
    import paddle

    if paddle.get_device().startswith("gpu"):
        paddle.set_device("cpu")
        model.to(device="cpu")


SWAPPED = "_shitu_swapped_batch_norms"  # where convert_batch_norms leaves the layers it replaced


def convert_batch_norms(model) -> int:
    """Swap every BatchNorm sublayer for a SyncBatchNorm sharing its weights and running statistics
    (Paddle's convert_sync_batchnorm does the sharing); returns how many were swapped."""
    import paddle

    swapped = []
    for parent in model.sublayers(include_self=True):
        for name, child in list(parent.named_children()):
            if isinstance(child, paddle.nn.layer.norm._BatchNormBase) and not isinstance(child, paddle.nn.SyncBatchNorm):
                setattr(parent, name, paddle.nn.SyncBatchNorm.convert_sync_batchnorm(child))
                swapped.append((parent, name, child))
    model.__dict__[SWAPPED] = swapped
    return len(swapped)


def unwrap_model(model) -> None:
    """Undo `convert_batch_norms`: the original BatchNorm1D/2D layers, which share the trained weights and
    statistics, go back in place (SyncBatchNorm needs a GPU and a process group even to evaluate)."""
    for parent, name, original in model.__dict__.pop(SWAPPED, []):
        setattr(parent, name, original)


class Shard(list):
    """One rank's part of a global batch (sample indices), with `start`: where it begins in the epoch's
    global sample stream, so per-sample augmentation seeds are those a single process would use."""

    start: int = 0


def shard_batches(batches: Sequence[Sequence[int]], world: World, unit: int = 1) -> list[Sequence[int]]:
    """Each global batch's contiguous 1/N share for this rank, in groups of `unit` samples (K images of
    one class for PK batches, so every rank gets whole classes); the batches unchanged for one process."""
    if not world.distributed:
        return list(batches)
    shards, start = [], 0
    for batch in batches:
        groups = len(batch) // unit
        first, last = (groups * world.rank) // world.size, (groups * (world.rank + 1)) // world.size
        shard = Shard(batch[first * unit : last * unit])
        shard.start = start + first * unit
        shards.append(shard)
        start += len(batch)
    return shards


def check_divisible(groups: int, world: World, what: str, hint: str, minimum: int = 1) -> None:
    """BadInput unless `groups` (classes or images of a global batch) split evenly, `minimum` each, over the ranks."""
    if world.distributed and (groups % world.size or groups // world.size < minimum):
        raise BadInput(f"{what} cannot be split evenly over {world.size} processes "
                       f"(at least {minimum} each)", hint=hint)


def agree_stop(stop, world: World) -> bool:
    """True on every rank once any rank got SIGINT/SIGTERM; all ranks must call it at the same steps.

    A stop seen by one rank only would leave the others waiting in the next gradient all-reduce, so the
    flag is all-reduced (max of the signal numbers) and a rank that got none takes the peer's signal."""
    if not world.distributed:
        return bool(stop)
    import paddle
    import paddle.distributed as dist

    number = paddle.to_tensor([int(stop.signal_number or 0) if stop is not None else 0], dtype="int64")
    dist.all_reduce(number, op=dist.ReduceOp.MAX)
    agreed = int(number.numpy()[0])
    if agreed and stop is not None and not stop:
        stop.adopt(agreed)
    return agreed > 0


def check_resumed_together(epoch: int, world: World, run_dir) -> None:
    """WorkFailed unless every rank resumes from the same epoch: a rank that found no checkpoint (another
    machine without the run dir) would restart the lr schedule and momentum and silently diverge."""
    if not world.distributed:
        return
    import paddle
    import paddle.distributed as dist

    low, high = paddle.to_tensor([-epoch], dtype="int64"), paddle.to_tensor([epoch], dtype="int64")
    dist.all_reduce(low, op=dist.ReduceOp.MAX)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if -int(low.numpy()[0]) != int(high.numpy()[0]):
        raise WorkFailed(f"the training processes found different checkpoints to resume from (epochs "
                         f"{-int(low.numpy()[0])} to {int(high.numpy()[0])})", path=run_dir,
                         hint="every machine needs the same run dir: put it on a shared file system")


def mean_over_ranks(value: float, world: World) -> float:
    """The mean of a per-rank number (an epoch's loss) over all ranks; every rank must call it."""
    if not world.distributed:
        return value
    import paddle
    import paddle.distributed as dist

    total = paddle.to_tensor([value], dtype="float64")
    dist.all_reduce(total)
    return float(total.numpy()[0]) / world.size


# How a collective says that a peer process is gone (gloo on the CPU, NCCL on GPUs).
PEER_LOST = ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out")


def lost_peer(exc: BaseException) -> WorkFailed | None:
    """A one-line WorkFailed for a collective that failed because another rank died, else None."""
    text = str(exc)
    if not current_world().distributed or not isinstance(exc, RuntimeError) or not any(m in text for m in PEER_LOST):
        return None
    detail = next((line.strip() for line in text.splitlines() if any(m in line for m in PEER_LOST)), text)[:200]
    return WorkFailed(f"another training process of this job is gone ({detail})",
                      hint="the launcher's log names the worker that failed")


# ----------------------------------------------------------------------------- long waits through the store
# A gloo barrier or all-reduce on the CPU gives up after about 30 s (measured on Paddle 3.3.1), so a rank that
# must wait for minutes (rank 0 filling the teacher cache) waits on the launcher's key-value store instead:
# the others poll a counter there, which has no such limit, and the launcher still ends the job if a rank dies.
POLL_SECONDS = 0.2


def job_store():
    """The TCP key-value store every process of the launched job shares (created by init_parallel_env)."""
    from paddle.base import core

    return core.create_or_get_global_tcp_store()


def _add(store, key: str, amount: int) -> int:
    """store.add with SIGINT/SIGTERM held back until it returns: a signal landing in the store client's
    blocking receive fails the call (EINTR) instead of retrying it. The signal is handled right after."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        return int(store.add(key, amount))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def in_turn(world: World, name: str, work: Callable[[], T], store=None) -> T:
    """`work()` on rank 0 first, then on the first process of each other machine, then on the rest, each
    starting only once the one before it has finished. For a job that fills a cache: rank 0 fills it, a
    machine that shares the cache's file system finds it full, one that does not fills its own copy once,
    and every other process only reads. `name` must be the same on every rank and unique within the job."""
    if not world.distributed:
        return work()
    store = store if store is not None else job_store()
    leader = world.rank - world.local_rank  # the launcher numbers a machine's processes consecutively
    if world.local_rank != 0:
        _wait_for(store, name, leader)
        return work()
    try:
        if world.rank != 0:
            _wait_for(store, name, 0)
        result = work()
    except BaseException:
        _add(store, f"{name}/{world.rank}/failed", 1)
        raise
    _add(store, f"{name}/{world.rank}/done", 1)
    return result


def _wait_for(store, name: str, rank: int) -> None:
    import time

    while not _add(store, f"{name}/{rank}/done", 0):
        if _add(store, f"{name}/{rank}/failed", 0):
            raise WorkFailed(f"training process rank {rank} failed at: {name}",
                             hint="the launcher's log of that rank (RUN_DIR/logs/workerlog.N) says why")
        time.sleep(POLL_SECONDS)


def total_over_ranks(world: World, name: str, value: int, store=None) -> int:
    """The sum of a per-rank count over every rank, once all have given theirs: a barrier without gloo's
    time limit. Every rank must call it once with the same `name`."""
    import time

    if not world.distributed:
        return value
    store = store if store is not None else job_store()
    _add(store, f"{name}/sum", int(value))
    _add(store, f"{name}/given", 1)  # after the sum: once every rank has given, the sum is complete
    while _add(store, f"{name}/given", 0) < world.size:
        time.sleep(POLL_SECONDS)
    return _add(store, f"{name}/sum", 0)


_barriers = itertools.count()  # every rank passes the same barriers in the same order


def barrier(world: World, store=None) -> None:
    """Every rank waits here until all have arrived, for as long as that takes (through the store: rank 0
    may be evaluating, exporting or converting a dataset for minutes)."""
    if world.distributed:
        total_over_ranks(world, f"barrier/{next(_barriers)}", 0, store)


@contextlib.contextmanager
def main_first(world: World) -> Iterator[None]:
    """Rank 0 runs the block first (it writes, e.g. a split of class folders); the others wait, then run it."""
    if not world.is_main:
        barrier(world)
    yield
    if world.is_main:
        barrier(world)


def describe(world: World, global_batch: int | None = None) -> dict[str, Any]:
    """What the recipe records about the processes that trained."""
    record: dict[str, Any] = {"world_size": world.size, "device": "gpu" if gpu_available() else "cpu",
                              "sync_batch_norm": uses_sync_batch_norm(world)}
    if global_batch is not None:
        record.update({"global_batch": global_batch, "batch_per_process": global_batch // world.size})
    return record
