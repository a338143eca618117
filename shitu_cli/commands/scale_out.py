"""The options train-cls / train-rec / train-det share for data-parallel training, and re-running the
command under paddle.distributed.launch with the same arguments (not a subcommand of its own)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from shitu_cli import render

PANEL = "Scale out"
LAUNCH_OPTIONS = ("nproc", "devices", "nnodes", "master")


def nproc_option() -> Optional[int]:
    return typer.Option(None, "--nproc", rich_help_panel=PANEL,
                        help="Train data-parallel in N processes on this machine (N GPUs on a CUDA build, else N CPU "
                             "processes), re-run under paddle.distributed.launch. --batch-size stays the global batch.")


def devices_option() -> Optional[str]:
    return typer.Option(None, "--devices", rich_help_panel=PANEL,
                        help="GPUs to train on, e.g. 0,1 (one process each; needs the GPU build of Paddle).")


def nnodes_option() -> Optional[int]:
    return typer.Option(None, "--nnodes", rich_help_panel=PANEL,
                        help="Machines in the job; run the same command on each, with the same --master.")


def master_option() -> Optional[str]:
    return typer.Option(None, "--master", rich_help_panel=PANEL,
                        help="HOST:PORT where the machines of a --nnodes job meet (any free port on the first one).")


def relaunch_if_asked(ctx: typer.Context, command_name: str, out: Path, resume: bool, nproc: int | None, devices: str | None,
                      nnodes: int | None, master: str | None) -> bool:
    """Run this very command under the launcher when --nproc/--devices/--nnodes/--master ask for it and
    this process is not a worker already; prints rank 0's output and exits with the job's code. False
    when nothing was asked for: the caller trains in this process. In a worker it routes rank 0's stdout."""
    from shitu_cli.train.launch import LaunchPlan, check_plan, job_exit_code, redirect_worker_stdout, run_launcher
    from shitu_cli.train.run_dir import check_run_dir

    plan = LaunchPlan(nproc=nproc, devices=devices, nnodes=nnodes, master=master)
    if not plan.wanted:
        redirect_worker_stdout()
        return False
    check_plan(plan)
    check_run_dir(out, resume, command_name)  # a refusal is one line here, not one per worker
    render.info(f"launching {command_name} on {_describe(plan)}; worker logs in {Path(out) / 'logs'}")
    outcome = run_launcher(plan, worker_argv(ctx, command_name), out, on_line=_echo)
    sys.stdout.write(outcome.stdout)
    sys.stdout.flush()
    code = job_exit_code(outcome)  # WorkFailed (one line, exit 1) when a worker died
    raise typer.Exit(code)


def _describe(plan) -> str:
    where = f"GPUs {plan.devices}" if plan.devices else f"{plan.nproc or 1} process(es)"
    return where + (f" x {plan.nnodes} machines via {plan.master}" if plan.nnodes and plan.nnodes > 1 else "")


def _echo(line: str) -> None:
    render.err_console.print(line, markup=False, highlight=False, soft_wrap=True)


def worker_argv(ctx: typer.Context, command_name: str) -> list[str]:
    """The command line that gives the workers the same arguments, without the launch options."""
    args = [command_name]
    for param in ctx.command.params:
        if param.name in LAUNCH_OPTIONS:
            continue
        value = ctx.params.get(param.name)
        if value is None:
            continue
        if param.param_type_name == "argument":
            args += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        elif getattr(param, "is_flag", False) and param.secondary_opts:  # --flip/--no-flip
            args.append(param.opts[0] if value else param.secondary_opts[0])
        elif getattr(param, "is_flag", False):
            if value:
                args.append(param.opts[0])
        elif getattr(param, "multiple", False):
            for item in value:
                args += [param.opts[0], str(item)]
        else:
            args += [param.opts[0], str(value)]
    return args
