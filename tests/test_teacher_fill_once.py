"""train-rec --teacher under paddle.distributed.launch: the teacher cache is filled once (rank 0 first,
then each other machine's first process, then the rest, who only read), with waits that go through
Paddle's real TCP key-value store. Ranks are threads here, each with its own store client and its own
loaded teacher; tests/test_distributed.py runs the same thing as two launched processes (slow)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from ports import free_port
from synth import make_class_tree
from test_distill_rec import write_teacher


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("fill-once")
    make_class_tree(root / "products", n_classes=3, per_class=4, size=40, seed=4)
    return {"root": root, "train": sorted((root / "products").rglob("*.jpg")), "teacher": write_teacher(root / "t.onnx")}


def _run_ranks(images, caches: list[Path], fail_rank: int | None = None) -> dict[int, object]:
    """One thread per rank of a `len(caches)`-process job on machines of two processes each; rank r reads
    and writes the teacher cache `caches[r]`. Returns each rank's DistillData, teacher or exception."""
    from paddle.base import core

    from shitu_cli.data.loader import LabeledImage
    from shitu_cli.train.distributed import World
    from shitu_cli.train.rec_distill import distill_settings, fill_once, teacher_targets
    from shitu_cli.train.teachers import TeacherOptions, load_teacher_model

    port, size = free_port(), len(caches)
    master = core.TCPStore("127.0.0.1", port, True, 1, 60)
    stores = [master] + [core.TCPStore("127.0.0.1", port, False, 1, 60) for _ in range(size - 1)]
    train = [LabeledImage(p, 0) for p in images["train"]]
    outcome: dict[int, object] = {}

    def rank(r: int) -> None:
        teacher = load_teacher_model(images["teacher"], TeacherOptions(output="embedding"))
        settings = distill_settings({"teacher_output": "embedding", "cache_dir": str(caches[r])})

        def targets():
            if r == fail_rank:
                raise RuntimeError("the teacher fell over")
            return teacher_targets(teacher, train, [], settings, seed=3, num_workers=0)

        try:
            outcome[r] = (fill_once(targets, World(r, size, r % 2), stores[r]), teacher)
        except Exception as exc:  # noqa: BLE001 - the test inspects what each rank raised
            outcome[r] = exc

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a rank never finished waiting"
    return outcome


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.npy"))


def test_rank_0_fills_the_cache_once_and_the_other_ranks_only_read_it(images, tmp_path):
    cache = tmp_path / "cache"
    outcome = _run_ranks(images, [cache, cache])
    (first, teacher0), (second, teacher1) = outcome[0], outcome[1]
    views = first.record["views"]
    assert teacher0.calls == len(images["train"]) * views and teacher1.calls == 0
    assert second.record["cache_hits"] == len(images["train"]) and second.record["cache_misses"] == 0
    # The run's record counts the teacher's work over every rank: each image view once.
    assert first.record["teacher_images_run"] == second.record["teacher_images_run"] == len(images["train"]) * views
    np.testing.assert_array_equal(first.targets, second.targets)
    assert len(_entries(cache)) == len(images["train"])
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]  # no half-written entry left behind


def test_a_second_machine_without_the_shared_cache_fills_its_own_copy_once(images, tmp_path):
    """Four processes on two machines: machine 2 (ranks 2, 3) sees another cache folder than machine 1."""
    here, there = tmp_path / "here", tmp_path / "there"
    outcome = _run_ranks(images, [here, here, there, there])
    per_rank = len(images["train"]) * outcome[0][0].record["views"]
    assert [outcome[r][1].calls for r in range(4)] == [per_rank, 0, per_rank, 0]
    assert {outcome[r][0].record["teacher_images_run"] for r in range(4)} == {2 * per_rank}
    assert len(_entries(here)) == len(_entries(there)) == len(images["train"])
    shared = _run_ranks(images, [tmp_path / "shared"] * 4)  # one file system: machine 2 only reads
    assert [shared[r][1].calls for r in range(4)] == [per_rank, 0, 0, 0]


def test_when_rank_0_fails_the_waiting_ranks_stop_with_one_line_naming_it(images, tmp_path):
    from shitu_cli.errors import WorkFailed

    outcome = _run_ranks(images, [tmp_path / "cache"] * 2, fail_rank=0)
    assert isinstance(outcome[0], RuntimeError)
    assert isinstance(outcome[1], WorkFailed) and "rank 0 failed at: teacher-targets" in str(outcome[1])
    assert not _entries(tmp_path / "cache")
