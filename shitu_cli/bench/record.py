"""What benchmark-cpu leaves behind on this machine: the CSV log of runs and the fastest backend per model."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from shitu_cli.artifacts import atomic_write_text

FASTEST_FILE = "fastest_backends.json"
LOG_FILE = "benchmark-cpu.csv"


def shitu_home() -> Path:
    """$SHITU_HOME, else $XDG_CACHE_HOME/shitu, else ~/.cache/shitu."""
    if os.environ.get("SHITU_HOME"):
        return Path(os.environ["SHITU_HOME"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "shitu"


def bench_dir() -> Path:
    return shitu_home() / "bench"


def cpu_key() -> str:
    """Names this machine's CPU, so a record copied from (or shared with) another machine is not used."""
    from shitu_cli.bench.system import cpu_model, physical_cores

    return f"{cpu_model()} / {physical_cores()} cores"


@dataclass
class BackendTiming:
    """One measured inference time for a model on one backend (the inference stage alone, fp32)."""

    model_hash: str
    backend: str
    ms_p50: float
    threads: int
    mkldnn: bool
    ms_spread: float = 0.0  # half the range of the passes' medians: the noise of this measurement
    rounds: tuple[float, ...] = ()  # each pass's median, when the backends took turns (paired by position)


def update_fastest(timings: Iterable[BackendTiming], path: Path | None = None) -> Path:
    """Merge new timings into the record: per model and backend the latest best time wins."""
    path = path or bench_dir() / FASTEST_FILE
    record = _read_json(path)
    machine = record.setdefault(cpu_key(), {})
    best_now: dict[tuple[str, str], BackendTiming] = {}
    for timing in timings:
        key = (timing.model_hash, timing.backend)
        if key not in best_now or timing.ms_p50 < best_now[key].ms_p50:
            best_now[key] = timing
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for (model_hash, backend), timing in best_now.items():
        entry = machine.setdefault(model_hash, {"backends": {}})
        entry["backends"][backend] = {
            "ms_p50": round(timing.ms_p50, 4), "ms_spread": round(timing.ms_spread, 4), "threads": timing.threads,
            "mkldnn": timing.mkldnn, "measured": stamp, "rounds": [round(v, 4) for v in timing.rounds],
        }
        entry["fastest"] = clear_winner(entry["backends"])
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def clear_winner(backends: Mapping[str, Mapping[str, Any]], default: str = "paddle") -> str:
    """The fastest backend, but only where it beats the default by more than the noise; otherwise the default.

    Measured together (same time stamp, the backends taking turns, 3+ rounds): it must be faster in every
    round, so a load change that slows both cancels out. Measured apart: its median plus its spread must
    stay below the default's median minus the default's spread.
    """
    fastest = min(backends, key=lambda name: backends[name]["ms_p50"])
    if default not in backends or fastest == default:
        return fastest
    best, reference = backends[fastest], backends[default]
    ours, theirs = best.get("rounds") or [], reference.get("rounds") or []
    if best.get("measured") == reference.get("measured") and len(ours) == len(theirs) >= 3:
        return fastest if all(a < b for a, b in zip(ours, theirs)) else default
    noise = float(best.get("ms_spread", 0.0)) + float(reference.get("ms_spread", 0.0))
    return fastest if best["ms_p50"] + noise < reference["ms_p50"] else default


def fastest_backend(model_hash: str | None, path: Path | None = None) -> str | None:
    """The fastest backend benchmark-cpu recorded on this machine for this model, or None."""
    if not model_hash:
        return None
    record = _read_json(path or bench_dir() / FASTEST_FILE)
    entry = record.get(cpu_key(), {}).get(model_hash)
    return entry.get("fastest") if isinstance(entry, dict) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        # A missing or damaged record only means "nothing measured yet": auto falls back to paddle.
        return {}
    return data if isinstance(data, dict) else {}


def append_log(rows: Iterable[Mapping[str, Any]], path: Path | None = None) -> Path:
    """Append rows to the CSV log; a header is written when the file is new or its columns changed."""
    path = path or bench_dir() / LOG_FILE
    rows = list(rows)
    if not rows:
        return path
    columns = list(rows[0])
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    first_line = existing.splitlines()[0] if existing else ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    if first_line != ",".join(columns):
        if existing:
            # Columns changed between shitu versions: keep the old log beside the new one.
            os.replace(path, path.with_suffix(f".{datetime.now():%Y%m%d%H%M%S}.csv"))
            existing = ""
        writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, existing + buffer.getvalue())
    return path
