"""The one error family the core raises; the CLI maps it to a one-line message and exit code."""

from __future__ import annotations

from pathlib import Path


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
