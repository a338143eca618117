"""The one error family the core raises; the CLI maps it to a one-line message and exit code."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class ShituError(Exception):
    """A failure with a message a user can act on, and an optional hint saying the fix."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, path: Path | str | None = None):
        self.message = message
        self.hint = hint
        self.path = Path(path) if path is not None else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        fix = f" (hint: {self.hint})" if self.hint else ""
        return f"{where}{self.message}{fix}"


class BadInput(ShituError):
    """The user's input or usage is wrong: a file, a folder, an option. Exit code 2."""

    exit_code = 2


class ImageReadError(BadInput):
    """An image file that cannot be decoded: corrupt, truncated, not an image, too large."""


class ManifestError(BadInput):
    """An artifact folder whose manifest is missing, of the wrong kind, or inconsistent."""


class WorkFailed(ShituError):
    """The input was fine but the work itself failed (a model diverged, a backend crashed)."""

    exit_code = 1


def write_error(exc: OSError, path: Path | str | None = None) -> ShituError:
    """An OS refusal to write, as one line naming the path: a full disk failed the job (exit 1),
    a read-only or forbidden place is the user's choice of output (exit 2)."""
    import errno

    where = path if path is not None else exc.filename
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return WorkFailed("no space left on the device", hint="free some space or write elsewhere", path=where)
    if exc.errno == errno.EROFS:
        return BadInput("cannot write here: read-only file system", hint="choose a writable output folder", path=where)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return BadInput("cannot write here: permission denied", hint="choose a writable output folder", path=where)
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return BadInput(f"cannot write here: {exc.strerror.lower()}", hint="a file is in the way of a folder, or the other way round", path=where)
    return WorkFailed(f"cannot write: {exc.strerror or exc.__class__.__name__}", path=where)


@contextmanager
def writing_to(path: Path | str) -> Iterator[None]:
    """Turn an OSError raised while writing under `path` into `write_error`, naming the file it hit."""
    try:
        yield
    except OSError as exc:
        raise write_error(exc, exc.filename if exc.filename is not None else path) from None
