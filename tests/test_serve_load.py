"""The serve load test, small: concurrent recognise and gallery-add requests, none failed, no added item lost."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from serve_load import run_load  # noqa: E402


def test_concurrent_adds_and_searches_lose_nothing(tmp_path):
    result = run_load(workers=1, clients=4, requests=24, add_every=4, det=False, max_seconds=600, work=tmp_path)
    assert result.failed == []
    assert result.requests == 24 and result.adds == 6
    assert result.gallery_adds_seen == 6 and result.lost_items == 0
    assert result.generations >= 2  # searches were answered from more than one generation as adds committed


@pytest.mark.slow
def test_two_worker_processes_share_the_index_through_its_lock(tmp_path):
    result = run_load(workers=2, clients=6, requests=60, add_every=3, det=True, max_seconds=900, work=tmp_path)
    assert result.failed == [] and result.adds == 20
    assert result.gallery_adds_seen == 20 and result.lost_items == 0
