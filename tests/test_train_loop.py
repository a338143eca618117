"""The shared training loop: it learns, keeps the best checkpoint, and resumes to the same result."""

from __future__ import annotations

import numpy as np
import pytest

from shitu_cli.train.loop import LoopConfig, fit


def _toy_data(n=32, size=32, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.normal(0, 0.2, (n, 3, size, size)).astype("float32")
    images[labels == 1, 0] += 1.0  # class 1 is "red": learnable in a few steps
    return images, labels.astype("int64")


def _run(run_dir, crash_at_epoch=None, resume=False, epochs=3):
    import paddle

    from shitu_cli.models.ppcls import build_arch
    from shitu_cli.train.loop import seed_everything

    seed_everything(7)
    model = build_arch({"name": "PPLCNet_x0_25", "class_num": 2})
    images, labels = _toy_data()

    def make_loader(epoch):
        if epoch == crash_at_epoch:
            raise KeyboardInterrupt("simulated kill")
        order = np.random.permutation(len(images))
        for start in range(0, len(order), 8):
            idx = order[start : start + 8]
            yield paddle.to_tensor(images[idx]), paddle.to_tensor(labels[idx])

    def loss_fn(m, batch):
        x, y = batch
        return paddle.nn.functional.cross_entropy(m(x), y), {}

    def evaluate(m):
        m.eval()
        with paddle.no_grad():
            pred = m(paddle.to_tensor(images)).numpy().argmax(1)
        return {"top1": float((pred == labels).mean())}

    config = LoopConfig(epochs=epochs, lr=0.05, warmup_epochs=0.5, ema_decay=0.9, seed=3)
    result = fit(model, make_loader, 4, loss_fn, evaluate, config, run_dir, resume=resume, batch_size=8)
    return model, result


def test_fit_writes_metrics_and_best(tmp_path):
    _, result = _run(tmp_path, epochs=2)
    assert (tmp_path / "metrics.csv").read_text(encoding="utf-8").startswith("epoch,lr,loss,top1")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert result.best_checkpoint.is_file()
    assert len(result.history) == 2


def test_resume_after_kill_reaches_the_same_weights(tmp_path):
    straight_model, straight = _run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "killed", crash_at_epoch=3)
    resumed_model, resumed = _run(tmp_path / "killed", resume=True)
    assert [round(r["loss"], 6) for r in resumed.history] == [round(r["loss"], 6) for r in straight.history]
    for (name, a), b in zip(straight_model.state_dict().items(), resumed_model.state_dict().values()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, err_msg=name)


def test_ema_decay_warms_up_then_holds():
    from shitu_cli.train.loop import ema_decay_at

    assert ema_decay_at(0.999, 1) < 0.2
    assert ema_decay_at(0.999, 100) < 0.95
    assert ema_decay_at(0.999, 10**6) == 0.999


def test_short_run_ema_tracks_the_trained_weights_not_the_init(tmp_path):
    """With a fixed 0.999 decay, 12 steps leave the EMA ~99% random init: a useless 'best' model."""
    import paddle

    from shitu_cli.models.ppcls import build_arch
    from shitu_cli.train.loop import seed_everything

    seed_everything(1)
    model = build_arch({"name": "PPLCNet_x0_25", "class_num": 2})
    initial = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    images, labels = _toy_data()

    def make_loader(epoch):
        for start in range(0, len(images), 8):
            yield paddle.to_tensor(images[start : start + 8]), paddle.to_tensor(labels[start : start + 8])

    def loss_fn(m, batch):
        return paddle.nn.functional.cross_entropy(m(batch[0]), batch[1]), {}

    config = LoopConfig(epochs=3, lr=0.2, warmup_epochs=0, ema_decay=0.999, seed=1)
    fit(model, make_loader, 4, loss_fn, None, config, tmp_path)  # best == the EMA weights
    raw = paddle.load(str(tmp_path / "checkpoints" / "last.pdparams"))
    ema = model.state_dict()
    key = next(k for k in raw if k.endswith("weight") and raw[k].ndim == 4)
    to_raw = np.abs(ema[key].numpy() - raw[key].numpy()).mean()
    to_init = np.abs(ema[key].numpy() - initial[key]).mean()
    assert to_raw < to_init
