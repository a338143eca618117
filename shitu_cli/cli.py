"""The Typer app: each command lives in `shitu_cli/commands/<name>.py` and is registered here."""

from __future__ import annotations

import functools
import importlib
import logging
import warnings
from typing import Any, Callable

import typer

from shitu_cli import __version__

# Library chatter that says nothing to a user: paddle's JIT warns about ccache on import, and
# faiss logs its SIMD probing once a library (ppcls, ppdet) has set the root logger to INFO.
warnings.filterwarnings("ignore", message="No ccache found")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

app = typer.Typer(
    name="shitu",
    help="PP-ShiTu image recognition on ordinary CPUs: split, train, index, predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# name -> module under shitu_cli.commands; each defines `command` (or `app`, a Typer group). Only working
# commands are listed, so `shitu --help` never offers one that does not run.
COMMANDS = {  # in workflow order, which is the order `shitu --help` lists them
    "demo": "demo",
    "split-dataset": "split_dataset",
    "train-det": "train_det",
    "train-rec": "train_rec",
    "train-cls": "train_cls",
    "build-index": "build_index",
    "merge-index": "merge_index",
    "predict": "predict",
    "serve": "serve",
    "eval": "eval",
    "benchmark-cpu": "benchmark_cpu",
    "compress": "compress",
    "export": "export",
    "models": "models",
    "config": "config",
    "reproduce": "reproduce",
}


def exits_cleanly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the core's typed errors into a one-line message and exit code (2 for bad input)."""
    from shitu_cli.errors import ShituError

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ShituError as exc:
            from shitu_cli import render

            render.error(exc)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _register() -> None:
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"shitu_cli.commands.{module_name}")
        if isinstance(getattr(module, "app", None), typer.Typer):  # a command group: `shitu models pull ...`
            for sub in module.app.registered_commands:
                sub.callback = exits_cleanly(sub.callback)
            app.add_typer(module.app, name=name)
        else:
            app.command(name, help=module.command.__doc__)(exits_cleanly(module.command))


def _version_text() -> str:
    from shitu_cli.recipes import package_versions

    versions = package_versions()
    libs = ", ".join(f"{k} {versions[k]}" for k in ("paddlepaddle", "paddleclas", "paddledet", "faiss-cpu"))
    return f"shitu {__version__} ({libs}; python {versions['python']})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(_version_text())
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print shitu's version and its library versions.", callback=_print_version, is_eager=True
    ),
) -> None:
    """PP-ShiTu image recognition on ordinary CPUs."""


_register()


def main() -> None:
    app()
