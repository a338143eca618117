"""The pure splitting rules: stratified train/val/test of each group, and the retrieval split of whole classes.

Seeded and order-free: the same groups and seed give the same split on any machine.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Mapping, Sequence

from shitu_cli.errors import BadInput

PARTS = ("train", "val", "test")
REC_PARTS = ("train", "gallery", "query")


@dataclass
class Plan:
    """Which items went where. `parts` lists are sorted; `kept_in_train` names groups too small to split."""

    parts: dict[str, list[str]]
    per_group: dict[str, dict[str, int]]
    kept_in_train: list[str] = field(default_factory=list)


def check_fractions(val: float, test: float) -> None:
    for name, value in (("--val", val), ("--test", test)):
        if not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise BadInput(f"{name} must be a fraction in [0, 1), got {value!r}", hint="e.g. --val 0.2 --test 0.1")
    if val + test >= 1:
        raise BadInput(f"--val {val} + --test {test} leaves nothing to train on", hint="make --val + --test less than 1")


def split_groups(groups: Mapping[str, Sequence[str]], val: float, test: float, seed: int) -> Plan:
    """Stratified train/val/test split of each group's items.

    Each group keeps at least one training item and gets floor or ceil of its exact share
    of val and test; the totals are round(N * fraction), the leftover units going to the
    groups with the largest remainders (ties in seeded order). A group with fewer items
    than parts requested stays whole in train.
    """
    check_fractions(val, test)
    needed = 1 + (val > 0) + (test > 0)
    names = sorted(groups)
    big = [g for g in names if len(groups[g]) >= needed]
    small = [g for g in names if len(groups[g]) < needed]
    sizes = [len(groups[g]) for g in big]
    n_val = _apportion(sizes, val, [n - 1 for n in sizes], _tiebreak(big, seed, "val"))
    n_test = _apportion(sizes, test, [n - 1 - v for n, v in zip(sizes, n_val)], _tiebreak(big, seed, "test"))
    parts: dict[str, list[str]] = {p: [] for p in PARTS}
    per_group = {}
    for name, nv, nt in zip(big, n_val, n_test):
        items = _shuffled(groups[name], seed, name)
        chunks = {"val": items[:nv], "test": items[nv : nv + nt], "train": items[nv + nt :]}
        for part in PARTS:
            parts[part].extend(chunks[part])
        per_group[name] = {p: len(chunks[p]) for p in PARTS}
    for name in small:
        parts["train"].extend(groups[name])
        per_group[name] = {"train": len(groups[name]), "val": 0, "test": 0}
    return Plan({p: sorted(items) for p, items in parts.items()}, dict(sorted(per_group.items())), small)


def split_classes(groups: Mapping[str, Sequence[str]], val: float, test: float, seed: int) -> Plan:
    """Retrieval split: held-out classes feed gallery and query only, never train.

    round(classes * val) classes are held out (at least one when val > 0 and there are
    two classes); only classes with 2+ items qualify. Each held-out class gives
    max(1, round(n * test)) items to query, keeping at least one for the gallery.
    """
    check_fractions(val, test)
    names = sorted(groups)
    eligible = [g for g in names if len(groups[g]) >= 2]
    n_held = _round(len(names) * Fraction(repr(val)))
    if val > 0 and len(names) >= 2:
        n_held = max(n_held, 1)
    n_held = min(n_held, len(eligible), max(len(names) - 1, 0))
    held = set(_shuffled(eligible, seed, "held-out classes")[:n_held])
    parts: dict[str, list[str]] = {p: [] for p in REC_PARTS}
    per_group = {}
    for name in names:
        items = _shuffled(groups[name], seed, name)
        if name in held:
            n_query = min(len(items) - 1, max(1, _round(len(items) * Fraction(repr(test)))))
            chunks = {"train": [], "query": items[:n_query], "gallery": items[n_query:]}
        else:
            chunks = {"train": items, "query": [], "gallery": []}
        for part in REC_PARTS:
            parts[part].extend(chunks[part])
        per_group[name] = {p: len(chunks[p]) for p in REC_PARTS}
    single = [g for g in names if len(groups[g]) < 2] if val > 0 else []
    return Plan({p: sorted(items) for p, items in parts.items()}, per_group, single)


def _apportion(sizes: list[int], fraction: float, caps: list[int], tiebreak: list[int]) -> list[int]:
    """Largest-remainder apportionment of round(sum * fraction) units, each group within its cap."""
    exact = [n * Fraction(repr(fraction)) for n in sizes]  # repr: 0.1 means 1/10, not its binary cousin
    counts = [min(math.floor(e), cap) for e, cap in zip(exact, caps)]
    remaining = min(_round(sum(exact)), sum(caps)) - sum(counts)
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - math.floor(exact[i])), tiebreak[i]))
    for limit in (lambda i: math.ceil(exact[i]), lambda i: caps[i]):  # ceil first; past it only if caps forced a floor down
        for i in by_remainder:
            if remaining > 0 and counts[i] < min(limit(i), caps[i]):
                counts[i] += 1
                remaining -= 1
    return counts


def _round(value: Fraction | float) -> int:
    return math.floor(value + Fraction(1, 2))  # half up, not Python's round-half-even


def _shuffled(items: Sequence[str], seed: int, salt: str) -> list[str]:
    # One RNG per group, seeded by (seed, group): adding a class leaves the others' splits alone.
    result = sorted(items)
    random.Random(f"{seed}/{salt}").shuffle(result)
    return result


def _tiebreak(names: list[str], seed: int, salt: str) -> list[int]:
    order = {name: rank for rank, name in enumerate(_shuffled(names, seed, f"tiebreak/{salt}"))}
    return [order[name] for name in names]
