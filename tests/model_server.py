"""A loopback HTTP server for model-download tests (Range support, a request log) and tar builders."""

from __future__ import annotations

import io
import re
import tarfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Served:
    path: str
    range: str | None
    status: int
    body_bytes: int


@dataclass
class ModelServer:
    """Serves `files` (URL path -> bytes) on 127.0.0.1; `errors` (URL path -> status) fail on purpose."""

    files: dict[str, bytes] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    honour_range: bool = True
    log: list[Served] = field(default_factory=list)
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ModelServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                owner._answer(self)

            def log_message(self, *args):  # keep test output clean
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        path, asked = handler.path, handler.headers.get("Range")
        if path in self.errors or path not in self.files:
            status = self.errors.get(path, 404)
            handler.send_error(status)
            self.log.append(Served(path, asked, status, 0))
            return
        data = self.files[path]
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", asked or "")
        if match and self.honour_range:
            start = int(match.group(1))
            if start >= len(data):
                handler.send_error(416)
                self.log.append(Served(path, asked, 416, 0))
                return
        body = data[start:]
        status = 206 if start else 200
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        handler.wfile.write(body)
        self.log.append(Served(path, asked, status, len(body)))


def tar_bytes(files: dict[str, bytes], top: str | None = "model_infer") -> bytes:
    """An uncompressed tar of `files`, under one top folder as PaddleClas's official tars are."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        if top:
            info = tarfile.TarInfo(top)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_with_member(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    """A tar holding a harmless-looking model plus one crafted member (for the refusal tests)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in {"m/inference.pdmodel": b"model", "m/inference.pdiparams": b"params"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        member.size = len(data) if member.isreg() else 0
        tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return buffer.getvalue()


def fake_model_files(seed: int = 0, params_size: int = 300_000) -> dict[str, bytes]:
    """Legacy-named files with arbitrary bytes: enough to test downloading, never loaded as a model."""
    import numpy as np

    params = np.random.default_rng(seed).integers(0, 256, params_size, dtype=np.uint8).tobytes()
    return {"inference.pdmodel": b"not a real program " + bytes([seed]), "inference.pdiparams": params}


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
