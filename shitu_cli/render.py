"""All terminal output: rich tables and progress on stderr, results and JSON on stdout.

Commands render through this module only, so every command looks the same and
`shitu ... --json | jq .` always gets exactly one JSON document on stdout.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from shitu_cli.errors import ShituError

# Chatter (progress, logs, errors) goes to stderr; results to stdout.
err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return value.as_posix()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def print_json(document: Any) -> None:
    """Write one JSON document to stdout, bypassing rich so nothing is wrapped or coloured."""
    sys.stdout.write(json.dumps(_jsonable(document), ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    err_console.print(message)


def warn(message: str) -> None:
    # soft_wrap: a warning stays one line in a log, as an error does
    err_console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)


def error(exc: ShituError) -> None:
    # One line, no traceback: the message names the file and the problem, the hint the fix.
    err_console.print(f"[bold red]error:[/bold red] {exc.one_line()}", soft_wrap=True)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    result = Table(title=title, title_justify="left", header_style="bold")
    for name in columns:
        numeric = name.lower().split(" ")[0] in {"count", "images", "n", "ms", "fps", "size", "score"}
        result.add_column(name, justify="right" if numeric else "left")
    for row in rows:
        result.add_row(*[_cell(v) for v in row])
    return result


FILE_ROWS_SHOWN = 20


def file_problems(title: str, rows: Sequence[tuple[Any, Any]]) -> None:
    """A (file, reason) table of skipped or failed files, cut at FILE_ROWS_SHOWN (--json has them all)."""
    if not rows:
        return
    show(table(title, ["file", "reason"], rows[:FILE_ROWS_SHOWN]))
    if len(rows) > FILE_ROWS_SHOWN:
        show(f"... and {len(rows) - FILE_ROWS_SHOWN} more (all of them are in --json)")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def show(renderable: Any) -> None:
    """Print a result (table, text) to stdout."""
    out_console.print(renderable)


def epoch_line(summary: Any) -> str:
    """One line per finished epoch (a train.loop.EpochSummary): what a log file or CI output shows."""
    width = len(str(summary.epochs))
    parts = [f"epoch {summary.epoch:>{width}}/{summary.epochs}", f"loss {summary.loss:.4f}"]
    parts += [f"{name} {value:.4f}" for name, value in summary.metrics.items() if isinstance(value, (int, float))]
    parts += [f"{summary.images_per_second:.1f} img/s", f"{summary.seconds:.1f} s", f"eta {duration(summary.eta_seconds)}"]
    return "  ".join(parts)


def print_epoch(summary: Any) -> None:
    # soft_wrap: a log line is never cut at the 80 columns rich assumes off a terminal
    err_console.print(epoch_line(summary), highlight=False, soft_wrap=True)


def duration(seconds: float) -> str:
    """3s, 4m05s, 2h03m: short enough for a log line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@contextmanager
def progress(description: str, total: int | None, *, unit: str = "img", transient: bool = False) -> Iterator["ProgressHandle"]:
    """A progress bar on stderr; `handle.advance(n, **fields)` moves it and updates live fields."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, console=err_console, transient=transient) as bar:
        task_id = bar.add_task(description, total=total, status="")
        yield ProgressHandle(bar, task_id, unit)


class ProgressHandle:
    """What a command hands to the core as its progress callback."""

    def __init__(self, bar: Progress, task_id: Any, unit: str):
        self._bar, self._task_id, self._unit = bar, task_id, unit

    def __call__(self, advance: int = 1, epoch_end: Any = None, **fields: Any) -> None:
        if epoch_end is not None:  # printed above the bar on a terminal; off one, the line is the progress
            print_epoch(epoch_end)
            return
        status = "  ".join(f"{k}={_cell(v)}" for k, v in fields.items())
        self._bar.update(self._task_id, advance=advance, status=status)

    def set_total(self, total: int) -> None:
        self._bar.update(self._task_id, total=total)
