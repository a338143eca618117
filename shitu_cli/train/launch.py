"""Re-running a train command under `paddle.distributed.launch` (--nproc / --devices / --nnodes /
--master): the launcher command, a run that forwards Ctrl-C and SIGTERM to it, and what its workers'
exits mean. The launcher's own logs and one log per worker go to RUN_DIR/logs/.

Rank 0's stdout (the summary table or the --json document) goes to a file the launching process
prints when the job ends, so stdout carries exactly what a one-process run would print.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from shitu_cli.errors import BadInput, WorkFailed

LOG_DIR = "logs"
STDOUT_ENV = "SHITU_WORKER_STDOUT"  # where rank 0 of a job we launched writes its stdout
STDOUT_FILE = "rank0.stdout"
# The launcher's chatter and Paddle's start-up noise; every other line a worker or the launcher prints is shown.
NOISE = re.compile(
    r"^(LAUNCH (INFO|DEBUG)|[IW]\d{4} \d\d:\d\d:\d\d|=+$|=+ Modified FLAGS|FLAGS\(name=|.*UserWarning: No ccache found"
    r"|\s+warnings\.warn\(|.*UserWarning: When training, we now always track|-+ ERROR LOG DETAIL -+)"
)
FAILED = re.compile(r"Container rank (\d+) status \w+ cmd .* code (-?\d+) log (\S+)")
# gloo's last words when the worker on the other end of a connection died or hung: the launcher then names
# this worker (the first failed one in rank order), not the one that died first.
LOST_PEER = re.compile(r"gloo/transport/.*self_rank = (\d+) pair_rank = (\d+)")


@dataclass
class LaunchPlan:
    """How many processes on this machine, on which GPUs, and how this machine joins others."""

    nproc: int | None = None
    devices: str | None = None
    nnodes: int | None = None
    master: str | None = None

    @property
    def wanted(self) -> bool:
        """True when asked for, and this process is not already a launched worker."""
        from shitu_cli.train.distributed import current_world

        asked = self.nproc is not None or self.devices is not None or self.nnodes is not None or self.master is not None
        return asked and not current_world().distributed


@dataclass
class LaunchOutcome:
    exit_code: int  # the launcher's
    log_dir: Path
    stdout: str  # rank 0's stdout
    signal_name: str | None = None  # a signal this process received and passed on
    failed_rank: int | None = None
    failed_code: int | None = None
    failed_log: str | None = None
    lines: list[str] = field(default_factory=list)


def check_plan(plan: LaunchPlan) -> None:
    """Refuse what the launcher would only fail on later, or less clearly."""
    from shitu_cli.train.distributed import gpu_available

    if plan.nproc is not None and plan.nproc < 1:
        raise BadInput(f"--nproc {plan.nproc}: need at least one process", hint="--nproc 2 trains on two")
    if plan.nnodes is not None and plan.nnodes < 1:
        raise BadInput(f"--nnodes {plan.nnodes}: need at least one machine")
    if plan.nnodes is not None and plan.nnodes > 1 and not plan.master:
        raise BadInput("--nnodes over 1 needs --master HOST:PORT (the same on every machine)",
                       hint="e.g. --master 10.0.0.1:8090 on each of the machines")
    if plan.devices is not None:
        if not gpu_available():
            raise BadInput("--devices picks GPUs, and this Paddle has no CUDA (or sees no GPU)",
                           hint="use --nproc N for N CPU processes, or install the GPU build of paddlepaddle")
        count = len([d for d in plan.devices.split(",") if d.strip()])
        if plan.nproc is not None and plan.nproc != count:
            raise BadInput(f"--nproc {plan.nproc} but --devices names {count} GPUs",
                           hint="give one of them, or as many processes as devices")


def launcher_command(plan: LaunchPlan, worker_args: list[str], log_dir: Path) -> list[str]:
    """`python -m paddle.distributed.launch ... python -m shitu_cli <command> <same options>`."""
    command = [sys.executable, "-m", "paddle.distributed.launch", "--log_dir", str(log_dir), "--job_id", "shitu"]
    if plan.nproc is not None:
        command += ["--nproc_per_node", str(plan.nproc)]
    if plan.devices is not None:
        command += ["--devices", plan.devices]
    if plan.nnodes is not None:
        command += ["--nnodes", str(plan.nnodes)]
    if plan.master is not None:
        command += ["--master", plan.master]
    # A path not ending in .py is run as given: the worker is this interpreter running the CLI.
    return command + [sys.executable, "-u", "-m", "shitu_cli", *worker_args]


def run_launcher(plan: LaunchPlan, worker_args: list[str], run_dir: Path,
                 on_line: Callable[[str], None] | None = None) -> LaunchOutcome:
    """Run the job to its end; Ctrl-C / SIGTERM here go to the launcher, which stops every worker (SIGTERM)
    and gives them 30 s to finish their step and export. The launcher runs in its own session, so a
    terminal's Ctrl-C reaches the workers once, through it, not twice."""
    log_dir = Path(run_dir).resolve() / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout_file = log_dir / STDOUT_FILE
    stdout_file.write_text("", encoding="utf-8")
    env = {**os.environ, STDOUT_ENV: str(stdout_file), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(launcher_command(plan, worker_args, log_dir), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env=env, start_new_session=True, text=True,
                               encoding="utf-8", errors="replace")
    outcome = LaunchOutcome(exit_code=0, log_dir=log_dir, stdout="")

    def forward(number: int, _frame) -> None:
        outcome.signal_name = outcome.signal_name or signal.Signals(number).name
        process.send_signal(number)

    previous = {number: signal.signal(number, forward) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert process.stdout is not None
        for line in process.stdout:
            _take_line(line.rstrip("\n"), outcome, on_line)
        outcome.exit_code = process.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if process.poll() is None:
            process.kill()
    outcome.stdout = stdout_file.read_text(encoding="utf-8", errors="replace")
    for line in _unseen_rank0_lines(log_dir / "workerlog.0", outcome.lines):
        _take_line(line, outcome, on_line)
    return outcome


def _unseen_rank0_lines(log: Path, seen: list[str]) -> list[str]:
    """Rank 0's last lines that the launcher did not pass on: it stops echoing once it is told to stop,
    and a stopped run's closing words (which epoch it exported) come after that."""
    if not log.is_file():
        return []
    lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
             if line.strip() and not NOISE.match(line)]
    shown = set(seen)
    last_shown = max((i for i, line in enumerate(lines) if line in shown), default=-1)
    return lines[last_shown + 1 :]


def _take_line(line: str, outcome: LaunchOutcome, on_line: Callable[[str], None] | None) -> None:
    failed = FAILED.search(line)
    if failed:
        outcome.failed_rank, outcome.failed_code = int(failed.group(1)), int(failed.group(2))
        outcome.failed_log = failed.group(3)
        return
    if NOISE.match(line) or not line.strip() or line.startswith("LAUNCH ERROR") and "Container failed" in line:
        return
    outcome.lines.append(line)
    if on_line is not None:
        on_line(line)


def job_exit_code(outcome: LaunchOutcome) -> int:
    """The exit code of the whole job; WorkFailed (one line, exit 1) when a worker died or crashed.

    A stop we passed on ends like a one-process stop (130 / 143); a worker's bad-input exit (2) has
    already printed its one-line error."""
    from shitu_cli.train.stop import exit_code_for

    if outcome.signal_name:
        return exit_code_for(outcome.signal_name)
    if outcome.exit_code == 0:
        return 0
    if outcome.failed_code == 2:
        return 2
    lost = _lost_peer(outcome.failed_log)
    if lost is not None:
        reporter, peer = lost
        raise WorkFailed(f"training worker rank {peer} died or stopped answering (rank {reporter} lost its connection "
                         f"to it and {_how_it_ended(outcome.failed_code, outcome.exit_code)}); the launcher stopped the others",
                         hint=f"rank {peer}'s log: {outcome.log_dir / f'workerlog.{peer}'}", path=outcome.log_dir.parent)
    rank = "a training worker" if outcome.failed_rank is None else f"training worker rank {outcome.failed_rank}"
    raise WorkFailed(f"{rank} {_how_it_ended(outcome.failed_code, outcome.exit_code)}; the launcher stopped the others",
                     hint=f"its log: {outcome.failed_log or outcome.log_dir}", path=outcome.log_dir.parent)


def _lost_peer(log: str | None) -> tuple[int, int] | None:
    """(this rank, the peer it lost) when a worker's log ends in gloo's lost-connection error."""
    if not log or not Path(log).is_file():
        return None
    tail = Path(log).read_text(encoding="utf-8", errors="replace").splitlines()[-20:]
    for line in reversed(tail):
        found = LOST_PEER.search(line)
        if found:
            return int(found.group(1)), int(found.group(2))
    return None


def _how_it_ended(code: int | None, launcher_code: int) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    if code is not None and code > 128 and code - 128 in signal.Signals._value2member_map_:
        return f"was killed by {signal.Signals(code - 128).name}"
    return f"failed with exit code {code if code is not None else launcher_code}"


def redirect_worker_stdout() -> None:
    """In rank 0 of a job `run_launcher` started: send stdout (fd 1) to the file the launching process prints."""
    from shitu_cli.train.distributed import current_world

    target = os.environ.get(STDOUT_ENV)
    if not target or not current_world().distributed or not current_world().is_main:
        return
    sys.stdout.flush()
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(descriptor, 1)
    os.close(descriptor)
