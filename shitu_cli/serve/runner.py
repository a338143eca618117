"""Run the app on uvicorn: bind first (so --port 0 works and the URL said is the real one), then serve
in one process or several worker processes that share the bound socket; Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import os
import signal
import socket
from contextlib import contextmanager
from typing import Callable, Iterator

from shitu_cli.errors import BadInput
from shitu_cli.serve.app import SETTINGS_ENV, create_app
from shitu_cli.serve.service import ServeSettings, Service


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BadInput(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                       hint="pick another --port, or stop what is using it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def serve(settings: ServeSettings, host: str, port: int, workers: int, announce: Callable[[str], None]) -> None:
    """Load the models (a bad index or model fails here, before listening), bind, say the URL, serve until
    Ctrl-C or SIGTERM."""
    import uvicorn

    if workers < 1:
        raise BadInput(f"--workers must be at least 1, got {workers}")
    service = Service(settings)  # a bad index or model fails here; with several workers each loads its own
    if workers > 1:
        service = None
    sock = bind(host, port)
    common = {"log_level": "warning", "timeout_graceful_shutdown": 5, "access_log": False}
    if workers == 1:
        config = uvicorn.Config(create_app(settings, service), **common)
        server = uvicorn.Server(config)
        announce(url_of(sock))
        with stopping_quietly():
            server.run(sockets=[sock])
        return
    from uvicorn.supervisors import Multiprocess

    os.environ[SETTINGS_ENV] = settings.to_json()
    config = uvicorn.Config("shitu_cli.serve.app:app_from_env", factory=True, workers=workers, **common)
    announce(url_of(sock))
    with stopping_quietly():
        Multiprocess(config, sockets=[sock]).run()


class _Stopped(Exception):
    pass


def _raise_stopped(signum, frame) -> None:
    raise _Stopped


@contextmanager
def stopping_quietly() -> Iterator[None]:
    """uvicorn shuts down on Ctrl-C/SIGTERM, then raises the signal again for the handler it found: make that
    handler end the run quietly (no KeyboardInterrupt traceback, no death by SIGTERM before the last line)."""
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except _Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
