"""Data-parallel training under paddle.distributed.launch, on two CPU processes: the same weights as one
process with the same global batch, outputs written once by rank 0, a dead worker ends the job.

Each launched job costs 10-25 s of launcher and worker start-up on 2 shared cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shitu_cli.artifacts import read_yaml
from synth import make_class_tree

TESTS = Path(__file__).parent
TINY_REC = ("--recipe", "tiny", "--input-size", "48", "--num-workers", "0")


def _launch(script: Path, *args: str, log_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
               str(script), *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def _weights(path: Path) -> dict[str, np.ndarray]:
    from shitu_cli.models.legacy import load_weights

    return {k: np.asarray(v) for k, v in load_weights(path).items()}


def test_two_processes_train_the_weights_one_process_trains_with_the_same_global_batch(tmp_path):
    """No batch norm, a per-sample mean loss: 2 x 8 images with averaged gradients IS one batch of 16, up
    to float summation order. Plain SGD weights, EMA weights and the logged loss must all agree."""
    import dp_fit

    alone, launched = tmp_path / "alone", tmp_path / "launched"
    dp_fit.main(alone, 16)
    done = _launch(TESTS / "dp_fit.py", str(launched), "16", log_dir=tmp_path / "logs")
    assert done.returncode == 0, (tmp_path / "logs" / "workerlog.1").read_text()[-3000:]
    assert (launched / "done.txt").read_text() == "world 2\n"
    for name in ("last.pdparams", "last.ema.pdparams", "best.pdparams"):
        one, two = _weights(alone / "checkpoints" / name), _weights(launched / "checkpoints" / name)
        assert one.keys() == two.keys()
        trained = max(float(np.abs(v).max()) for v in one.values())
        for key in one:
            np.testing.assert_allclose(two[key], one[key], atol=2e-5 * trained, rtol=0, err_msg=f"{name}:{key}")
    losses = [[float(row.split(",")[2]) for row in (d / "metrics.csv").read_text().splitlines()[1:]] for d in (alone, launched)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    # Rank 0 alone wrote: the run dir holds exactly what a one-process run writes.
    assert sorted(p.name for p in launched.rglob("*")) == sorted(p.name for p in alone.rglob("*"))


@pytest.mark.slow  # ~90 s: two launched processes, rank 0 evaluating for 35 s after each of 2 epochs
def test_rank_0_evaluating_longer_than_gloos_timeout_does_not_end_the_job(tmp_path):
    """A gloo collective gives up after ~30 s (Paddle 3.3.1); rank 1 waits out rank 0's evaluation through
    the launcher's key-value store instead, however long it takes."""
    run = tmp_path / "run"
    done = _launch(TESTS / "dp_fit.py", str(run), "16", "35", log_dir=tmp_path / "logs")
    assert done.returncode == 0, (tmp_path / "logs" / "workerlog.1").read_text()[-3000:]
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "top1" in rows[0] and (run / "done.txt").read_text() == "world 2\n"


def test_each_rank_gets_whole_distinct_classes_of_every_global_pk_batch():
    from shitu_cli.train.distributed import World
    from shitu_cli.train.samplers import PKBatchSampler

    labels = [i // 6 for i in range(60)]  # 10 classes x 6 images
    alone = PKBatchSampler(labels, 4, 3, seed=9)
    ranks = [PKBatchSampler(labels, 4, 3, seed=9, world=World(rank, 2, rank)) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(alone)  # the same number of (global) steps
    for epoch in (1, 2):
        global_batches = alone.epoch(epoch)
        shares = [sampler.epoch(epoch) for sampler in ranks]
        assert shares[0] == ranks[0].epoch(epoch)  # deterministic per seed and epoch
        for step, batch in enumerate(global_batches):
            first, second = shares[0][step], shares[1][step]
            assert list(first) + list(second) == batch  # nothing duplicated, nothing left out
            classes = [{labels[i] for i in share} for share in (first, second)]
            assert [len(c) for c in classes] == [2, 2] and not classes[0] & classes[1]
            # Each share starts where it sits in the global stream, so augmentation matches one process.
            assert second.start - first.start == 6


def test_a_pk_batch_that_does_not_split_over_the_ranks_is_refused():
    from shitu_cli.errors import BadInput
    from shitu_cli.train.distributed import World
    from shitu_cli.train.samplers import PKBatchSampler

    with pytest.raises(BadInput, match="cannot be split evenly over 2 processes"):
        PKBatchSampler([i // 4 for i in range(40)], 3, 4, world=World(0, 2, 0))


def test_worker_command_line_repeats_the_options_without_the_launch_ones(tmp_path):
    import typer

    from shitu_cli.cli import app
    from shitu_cli.commands.scale_out import worker_argv

    command = typer.main.get_command(app).commands["train-cls"]
    ctx = command.make_context("train-cls", ["data", "-o", str(tmp_path / "r"), "--no-flip", "--epochs", "3",
                                             "--nproc", "2", "--json"])
    argv = worker_argv(ctx, "train-cls")
    assert argv[:2] == ["train-cls", "data"] and "--nproc" not in argv and "2" not in argv
    assert argv[argv.index("--out") + 1] == str(tmp_path / "r") and argv[argv.index("--epochs") + 1] == "3"
    assert "--no-flip" in argv and "--json" in argv and "--resume" not in argv


def test_devices_without_a_cuda_build_is_refused_with_one_line(cli, tmp_path):
    result = cli("train-rec", tmp_path, "-o", tmp_path / "run", "--devices", "0,1")
    assert result.exit_code == 2
    assert "--devices picks GPUs" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def products(tmp_path_factory):
    from typer.testing import CliRunner

    from shitu_cli.cli import app

    root = tmp_path_factory.mktemp("dp") / "products"
    make_class_tree(root, n_classes=12, per_class=10, size=48, seed=5)
    done = CliRunner().invoke(app, ["split-dataset", str(root), "--format", "rec", "--val", "0.34", "--test", "0.3"])
    assert done.exit_code == 0, done.stderr
    return root


def test_train_rec_on_two_processes_writes_every_output_once(cli, products, tmp_path):
    run = tmp_path / "run"
    result = cli("train-rec", products, "-o", run, *TINY_REC, "--epochs", "1", "--nproc", "2", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)  # stdout is rank 0's JSON document and nothing else
    assert summary["batch_size"] == 16 and summary["epochs_done"] == 1
    # One writer: the outputs of a one-process run, plus the launcher's logs in logs/.
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "curves.png", "export", "logs", "metrics.csv",
                                                      "recipe.yaml"]
    assert len((run / "metrics.csv").read_text().splitlines()) == 2
    logs = {p.name for p in (run / "logs").iterdir()}
    assert {"workerlog.0", "workerlog.1", "rank0.stdout"} <= logs
    recipe = read_yaml(run / "recipe.yaml")
    assert recipe["inputs"]["distributed"] == {"world_size": 2, "device": "cpu", "sync_batch_norm": False,
                                               "global_batch": 16, "batch_per_process": 8}
    assert recipe["metrics"]["best_epoch"] == summary["best_epoch"]
    assert "epoch 1/1" in result.stderr and "LAUNCH INFO" not in result.stderr


@pytest.mark.slow  # a launcher and two workers with a teacher (~40-60 s on 2 shared cores)
def test_two_processes_run_the_teacher_once_per_image_view_not_once_per_rank(cli, products, tmp_path):
    """Rank 0 fills the teacher cache, rank 1 only reads it (the default run checks the same logic with
    threads as ranks: test_teacher_fill_once.py)."""
    from test_distill_rec import write_teacher

    run, cache = tmp_path / "run", tmp_path / "cache"
    result = cli("train-rec", products, "-o", run, *TINY_REC, "--epochs", "1", "--nproc", "2", "--teacher",
                 write_teacher(tmp_path / "t.onnx"), "--teacher-output", "embedding", "--teacher-cache", cache, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    images, views = summary["train_images"], summary["distillation"]["views"]
    assert summary["distillation"]["teacher_images_run"] == images * views  # counted over both ranks
    assert read_yaml(run / "recipe.yaml")["inputs"]["distillation"]["teacher_images_run"] == images * views
    assert len(list(cache.rglob("*.npy"))) == images
    rank0, rank1 = ((run / "logs" / f"workerlog.{r}").read_text(errors="replace") for r in (0, 1))
    assert f"teacher: {images}/{images} images run" in rank0 and "teacher:" not in rank1


def _worker_pids(run: Path, rank: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run).encode() in cmdline and b"shitu_cli" in cmdline and f"PADDLE_TRAINER_ID={rank}".encode() in environ:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow  # ~20-30 s: a parent, a launcher and two workers start on 2 shared cores
def test_a_killed_worker_ends_the_job_with_one_line_and_exit_1(products, tmp_path):
    run = tmp_path / "run"
    parent = subprocess.Popen([sys.executable, "-m", "shitu_cli", "train-rec", str(products), "-o", str(run), *TINY_REC,
                               "--epochs", "200", "--nproc", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (run / "checkpoints").is_dir():  # fit() has started
            time.sleep(0.5)
        time.sleep(1.0)
        victims, survivors = _worker_pids(run, 1), _worker_pids(run, 0)
        assert victims and survivors, "the two workers never started training"
        os.kill(victims[0], signal.SIGKILL)
        _, stderr = parent.communicate(timeout=90)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    # Whichever the launcher saw fail first (rank 1 killed, or rank 0 aborting on gloo's lost connection to
    # it, both within the launcher's 2 s poll), the line names rank 1 and its log.
    assert last.startswith("error:") and re.search(r"training worker rank 1 (was killed by SIGKILL|died or stopped "
                                                   r"answering \(rank 0 lost its connection)", last), last
    assert "workerlog.1" in last
    assert not any(Path(f"/proc/{pid}").exists() for pid in survivors)  # rank 0 did not outlive the job
    assert not (run / "export").exists()


def test_sync_batch_norm_swaps_back_to_the_layers_that_hold_the_trained_statistics():
    """On GPUs the BN layers train as SyncBatchNorm; evaluation and export need the original layers back,
    holding what the synced ones learned (the swap shares weights and running statistics)."""
    import paddle

    from shitu_cli.train.distributed import convert_batch_norms, unwrap_model

    model = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4), paddle.nn.Flatten(),
                                 paddle.nn.BatchNorm1D(144))
    kinds = [type(layer) for layer in model.sublayers()]
    assert convert_batch_norms(model) == 2
    assert isinstance(model[1], paddle.nn.SyncBatchNorm) and isinstance(model[3], paddle.nn.SyncBatchNorm)
    model[1]._mean.set_value(paddle.full([4], 0.25))  # what sync BN's in-place statistics update does
    model[3].weight.set_value(paddle.full([144], 2.0))
    unwrap_model(model)
    assert [type(layer) for layer in model.sublayers()] == kinds
    np.testing.assert_array_equal(model[1]._mean.numpy(), np.full(4, 0.25, np.float32))
    np.testing.assert_array_equal(model[3].weight.numpy(), np.full(144, 2.0, np.float32))


def test_a_worker_the_launcher_reports_dead_becomes_one_line_naming_its_rank_and_log(tmp_path):
    from shitu_cli.errors import WorkFailed
    from shitu_cli.train.launch import LaunchOutcome, _take_line, job_exit_code

    outcome = LaunchOutcome(exit_code=1, log_dir=tmp_path / "logs", stdout="")
    shown = []
    for line in ["LAUNCH INFO 2026-12-02 00:20:57,555 Pod failed",
                 "LAUNCH ERROR 2026-12-02 00:20:57,555 Container failed !!!",
                 f"Container rank 1 status failed cmd ['python', '-m', 'shitu_cli'] code -9 log {tmp_path}/logs/workerlog.1",
                 "epoch 1/3  loss 2.1"]:
        _take_line(line, outcome, shown.append)
    assert shown == ["epoch 1/3  loss 2.1"]
    with pytest.raises(WorkFailed) as failed:
        job_exit_code(outcome)
    assert "training worker rank 1 was killed by SIGKILL" in str(failed.value)
    assert f"{tmp_path}/logs/workerlog.1" in str(failed.value)
    outcome.failed_code = 2  # a worker refused its input and said why already
    assert job_exit_code(outcome) == 2
    outcome.signal_name = "SIGINT"  # a stop this process passed on
    assert job_exit_code(outcome) == 130


def test_a_worker_that_aborted_on_a_lost_peer_points_at_the_peer(tmp_path):
    """The launcher names the first failed worker in rank order; when that one only aborted because gloo lost
    its connection to another, the line names the other (the one that died first) and its log."""
    from shitu_cli.errors import WorkFailed
    from shitu_cli.train.launch import LaunchOutcome, _take_line, job_exit_code

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "workerlog.0").write_text(
        "epoch 1/3  loss 2.1\nterminate called after throwing an instance of 'gloo::TimeoutException'\n"
        "  what():  [/paddle/third_party/gloo/gloo/transport/tcp/pair.cc:584] TIMEOUT self_rank = 0 "
        "pair_rank = 1 peer_str = [127.0.0.1]:21890\n", encoding="utf-8")
    outcome = LaunchOutcome(exit_code=1, log_dir=tmp_path / "logs", stdout="")
    _take_line(f"Container rank 0 status failed cmd ['python'] code -6 log {tmp_path}/logs/workerlog.0", outcome, None)
    with pytest.raises(WorkFailed) as failed:
        job_exit_code(outcome)
    message = str(failed.value)
    assert "training worker rank 1 died or stopped answering" in message and "rank 0 lost its connection" in message
    assert "was killed by SIGABRT" in message and f"{tmp_path}/logs/workerlog.1" in message


@pytest.mark.slow  # two full trainings of the digits recipe (~1-3 min each on 2 shared cores)
def test_two_processes_reach_the_quality_of_one_on_real_digits(cli, tmp_path):
    """scikit-learn's digits (real scans), the same recipe and global batch on 1 and 2 processes: batch
    norm statistics per process make the runs differ a little, not the quality they reach."""
    from synth import write_digits

    data = write_digits(tmp_path / "digits")
    recipe = TESTS.parent / "recipes" / "cls" / "digits.yml"
    top1 = {}
    for nproc in (1, 2):
        launch = ("--nproc", "2") if nproc == 2 else ()
        result = cli("train-cls", data, "-o", tmp_path / f"run{nproc}", "--recipe", recipe, "--num-workers", "0",
                     "--json", *launch)
        assert result.exit_code == 0, result.stderr
        top1[nproc] = json.loads(result.stdout)["best_top1"]
    assert top1[1] >= 0.9, top1
    assert abs(top1[2] - top1[1]) <= 0.05, top1


@pytest.mark.slow  # a parent, a launcher and two workers, stopped after two epochs
def test_ctrl_c_stops_every_worker_and_rank_0_exports_the_best_epoch_so_far(products, tmp_path):
    import re

    run = tmp_path / "run"
    parent = subprocess.Popen([sys.executable, "-m", "shitu_cli", "train-rec", str(products), "-o", str(run), *TINY_REC,
                               "--epochs", "200", "--nproc", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log, deadline = run / "logs" / "workerlog.0", time.monotonic() + 180
        while time.monotonic() < deadline and not (log.is_file() and re.search(r"epoch\s+2/200", log.read_text(errors="replace"))):
            time.sleep(0.5)
        workers = _worker_pids(run, 0) + _worker_pids(run, 1)
        assert len(workers) == 2, "the two workers never trained two epochs"
        parent.send_signal(signal.SIGINT)
        stdout, stderr = parent.communicate(timeout=120)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 130, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr  # rank 0's closing words reach the user
    assert "export check" in stdout  # rank 0's table, on stdout
    assert (run / "export" / "inference.json").is_file()
    assert read_yaml(run / "recipe.yaml")["metrics"]["stopped_by"] == "SIGTERM"
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
