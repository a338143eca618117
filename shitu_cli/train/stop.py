"""Stopping a training run cleanly on Ctrl-C (SIGINT) or SIGTERM: the loop finishes its step, keeps
the last epoch's checkpoint, and the run exports the best epoch so far.

Paddle installs a C++ SIGTERM handler that prints a C++ traceback and aborts; Python's
KeyboardInterrupt lands wherever the main thread happens to be (a decoder pool, a ppdet
callback) and takes tens of seconds to unwind there. A flag read between steps does neither.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import threading
import time
from typing import Iterator

from shitu_cli.errors import ShituError

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# paddle.distributed.launch stops a worker with SIGTERM sent up to 3 times, 0.2 s apart: repeats
# that close together are the same request, not the user insisting.
REPEAT_GRACE_S = 1.0


class StopRequest:
    """Set by the first SIGINT/SIGTERM; a second one aborts at once (KeyboardInterrupt / default SIGTERM)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.signal_number: int | None = None
        self._first_at = 0.0
        self._adopted = False  # set by a peer's stop, not by a signal to this process

    def __bool__(self) -> bool:
        return self.signal_name is not None

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (130 for Ctrl-C)."""
        return 128 + (self.signal_number or signal.SIGINT)

    def adopt(self, number: int) -> None:
        """Take a stop another training process received (data-parallel ranks stop together)."""
        self.signal_number, self.signal_name = number, signal.Signals(number).name
        self._adopted = True

    def _handle(self, number: int, _frame) -> None:
        if self._adopted:  # the launcher's own signal, arriving after the peers' stop: not a second one
            self._adopted, self._first_at = False, time.monotonic()
            return
        if self and number == signal.SIGTERM and time.monotonic() - self._first_at < REPEAT_GRACE_S:
            return
        if self:
            signal.signal(number, signal.SIG_DFL)
            if number == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(number)
            return
        self.signal_number, self.signal_name = number, signal.Signals(number).name
        self._first_at = time.monotonic()


def exit_code_for(signal_name: str) -> int:
    """128 + the signal's number, the shell's convention for a process a signal ended (130 for Ctrl-C)."""
    return 128 + int(signal.Signals[signal_name])


class StopTraining(Exception):
    """Raised inside a third-party loop (ppdet's) to leave it at a step boundary after a stop request."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """A StopRequest that SIGINT/SIGTERM set while inside; outside the main thread it is never set."""
    # Importing paddle installs glog's C++ failure handlers, SIGTERM among them, over whatever Python
    # had: import it first so that ours, installed next, are the ones that stay.
    importlib.import_module("paddle")

    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {number: signal.getsignal(number) for number in SIGNALS}
    for number in SIGNALS:
        signal.signal(number, request._handle)
    try:
        yield request
    except RuntimeError as exc:
        from shitu_cli.train.distributed import lost_peer

        failure = lost_peer(exc)  # a data-parallel peer died: one line, not a traceback from inside gloo
        if failure is None:
            raise
        raise failure from None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


class Interrupted(ShituError):
    """A run stopped by a signal before it had anything to export; exits 128 + the signal number."""

    def __init__(self, stop: StopRequest, what: str, path=None):
        self.exit_code = stop.exit_code
        super().__init__(f"stopped by {stop.signal_name} {what}", hint="start it again, or --resume once an epoch has ended", path=path)
