"""Start `shitu train-*` in a child process and signal it once its checkpoint state says enough has run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml


def epochs_done(state_file: Path) -> int:
    """The epoch a run's checkpoint state file records; 0 while there is none (or it is being replaced)."""
    try:
        return int((yaml.safe_load(state_file.read_text(encoding="utf-8")) or {}).get("epoch", 0))
    except (OSError, yaml.YAMLError):
        return 0


def signal_when(args: list[str], ready: Callable[[], bool], signal_number: int, timeout: float = 240) -> tuple[int, str]:
    """Run `python -m shitu_cli *args`, send `signal_number` once `ready()` holds; (return code, stderr).

    Fails the test when the child ends before it was signalled, with the end of its stderr.
    """
    process = subprocess.Popen([sys.executable, "-m", "shitu_cli", *map(str, args)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None and not ready():
        time.sleep(0.05)
    if process.poll() is not None:
        raise AssertionError(f"the run ended (exit {process.returncode}) before it could be signalled:\n"
                             f"{process.communicate()[1][-2000:]}")
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)  # generous: a run stops after its current step
    return process.returncode, stderr
