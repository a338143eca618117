"""Runs shitu's training loop (fit) on a small batch-norm-free classifier: alone, or as one rank under
`python -m paddle.distributed.launch`. tests/test_distributed.py compares the two runs' weights.

Usage: python dp_fit.py RUN_DIR [GLOBAL_BATCH [EVAL_SECONDS]]

EVAL_SECONDS > 0 gives the run an evaluation (accuracy on the training features, rank 0 alone, every epoch)
that takes at least that long, as a big validation set would.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def main(run_dir: Path, global_batch: int, eval_seconds: float = 0.0) -> None:
    import time

    import paddle

    from shitu_cli.train.distributed import current_world, shard_batches
    from shitu_cli.train.loop import LoopConfig, fit
    from shitu_cli.train.distributed import start

    world = start()
    rng = np.random.default_rng(0)
    features = rng.normal(size=(96, 12)).astype("float32")
    labels = (features[:, :3].argmax(axis=1)).astype("int64")  # learnable: which of 3 features is largest
    paddle.seed(7)
    model = paddle.nn.Sequential(paddle.nn.Linear(12, 16), paddle.nn.ReLU(), paddle.nn.Linear(16, 3))

    def make_loader(epoch: int):
        order = np.random.default_rng([1, epoch]).permutation(len(features))
        batches = [order[i : i + global_batch].tolist() for i in range(0, len(order), global_batch)]
        for batch in shard_batches(batches, world):
            yield paddle.to_tensor(features[list(batch)]), paddle.to_tensor(labels[list(batch)])

    def loss_fn(net, batch):
        return paddle.nn.functional.cross_entropy(net(batch[0]), batch[1]), {}

    def evaluate(net) -> dict[str, float]:
        time.sleep(eval_seconds)
        with paddle.no_grad():
            predicted = net(paddle.to_tensor(features)).numpy().argmax(axis=1)
        return {"top1": float((predicted == labels).mean())}

    config = LoopConfig(epochs=2, lr=0.2, weight_decay=1e-4, warmup_epochs=0.5, ema_decay=0.9, seed=3)
    fit(model, make_loader, len(features) // global_batch, loss_fn, evaluate if eval_seconds > 0 else None, config, run_dir)
    if current_world().is_main:
        (run_dir / "done.txt").write_text(f"world {world.size}\n", encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 16, float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
