"""The PK batch sampler: P distinct classes x K images, seeded and deterministic."""

from __future__ import annotations

from collections import Counter

import pytest

from shitu_cli.train.samplers import PKBatchSampler


def _labels():
    return [c for c in range(6) for _ in range(5)] + [6]  # six classes of 5 images, one of 1 image


def test_batches_hold_p_distinct_classes_of_k_images():
    labels = _labels()
    sampler = PKBatchSampler(labels, classes_per_batch=3, images_per_class=4, seed=1)
    batches = sampler.epoch(1)
    assert len(batches) == len(sampler) == len(labels) // 12
    for batch in batches:
        per_class = Counter(labels[i] for i in batch)
        assert len(per_class) == 3
        assert set(per_class.values()) == {4}


def test_same_seed_and_epoch_give_the_same_batches_and_epochs_differ():
    a = PKBatchSampler(_labels(), 2, 4, seed=7)
    b = PKBatchSampler(_labels(), 2, 4, seed=7)
    assert a.epoch(3) == b.epoch(3)
    assert a.epoch(3) != a.epoch(4)
    assert a.epoch(3) != PKBatchSampler(_labels(), 2, 4, seed=8).epoch(3)


def test_small_classes_are_drawn_with_replacement_and_every_class_gets_visited():
    labels = _labels()
    sampler = PKBatchSampler(labels, 2, 4, seed=0)
    seen = Counter(labels[i] for epoch in range(1, 6) for batch in sampler.epoch(epoch) for i in batch)
    assert set(seen) == set(labels)
    single = labels.index(6)
    for epoch in range(1, 6):
        for batch in sampler.epoch(epoch):
            if single in batch:
                assert batch.count(single) == 4


def test_p_is_capped_by_the_number_of_classes_and_one_class_is_refused():
    sampler = PKBatchSampler([0, 0, 1, 1], classes_per_batch=8, images_per_class=2)
    assert sampler.batch_size == 4
    with pytest.raises(ValueError):
        PKBatchSampler([0, 0, 0], 2, 2)
