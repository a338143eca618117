"""Start the real `shitu serve` in a subprocess on a free loopback port, and talk HTTP to it (stdlib only)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
URL_LINE = re.compile(r"shitu serve: (http://127\.0\.0\.1:\d+)")


@dataclass
class Answer:
    status: int
    body: dict
    headers: dict


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def stop(self, sig: int = signal.SIGINT, wait: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(wait)

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def get(self, path: str, token: str | None = None) -> Answer:
        return self.request("GET", path, token=token)

    def post_json(self, path: str, document, token: str | None = None) -> Answer:
        return self.request("POST", path, json.dumps(document).encode(), "application/json", token)

    def post_files(self, path: str, files: list[tuple[str, bytes]], fields: dict[str, str] | None = None,
                   token: str | None = None) -> Answer:
        body, content_type = multipart(files, fields or {})
        return self.request("POST", path, body, content_type, token)

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                token: str | None = None) -> Answer:
        headers = {"Content-Type": content_type} if content_type else {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return Answer(response.status, _json(response.read()), {k.lower(): v for k, v in response.headers.items()})
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, _json(exc.read()), {k.lower(): v for k, v in exc.headers.items()})


def _json(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return {"_text": data.decode("utf-8", "replace")}


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for filename, data in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n' \
               f"Content-Type: application/octet-stream\r\n\r\n"
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def start_server(args: list[str], log: Path, env: dict[str, str] | None = None, wait: float = 180) -> Server:
    """`shitu serve ARGS --port 0` (one worker unless ARGS say otherwise), waiting for the URL line it says once it listens."""
    if "--workers" not in map(str, args):
        args = [*args, "--workers", "1"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    handle = open(log, "w", encoding="utf-8")
    process = subprocess.Popen([sys.executable, "-m", "shitu_cli", "serve", *map(str, args), "--host", "127.0.0.1", "--port", "0"],
                               stdout=subprocess.DEVNULL, stderr=handle, env=environment, cwd=ROOT)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        match = URL_LINE.search(log.read_text(encoding="utf-8", errors="replace"))
        if match:
            return Server(process, match.group(1), log)
        if process.poll() is not None:
            raise AssertionError(f"shitu serve exited {process.returncode}: {log.read_text(encoding='utf-8')}")
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"shitu serve said no URL within {wait} s: {log.read_text(encoding='utf-8')}")


def demo_index(root: Path) -> tuple[Path, Path]:
    """A copy of the demo gallery and its index, built with the built-in demo recogniser via the CLI."""
    from shitu_cli.demo import GALLERY

    gallery = root / "gallery"
    shutil.copytree(GALLERY, gallery)
    index = root / "index"
    done = subprocess.run([sys.executable, "-m", "shitu_cli", "build-index", str(gallery), "-o", str(index), "--rec",
                           str(ROOT / "assets/demo/models/rec")], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return gallery, index
