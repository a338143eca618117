"""Writing artifacts safely: temp file then rename, sha256 sums, and small YAML manifests.

Every artifact folder (model dir, index dir, run dir) carries a YAML file whose `kind`
says what it is, so nothing that loads it has to guess.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from shitu_cli.errors import ManifestError

FORMAT_VERSION = 1


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staged_bytes(path: Path, data: bytes) -> Path:
    """`data` in a synced temp file beside `path`, with the permissions a new file would get; the caller
    renames it into place (or unlinks it)."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; an artifact should get the permissions any new file would.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return Path(tmp_name)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` so that `path` holds either its old content or all of the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = staged_bytes(path, data)
    try:
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=None)


def write_yaml(path: Path, data: Any) -> None:
    atomic_write_text(path, dump_yaml(data))


def read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except FileNotFoundError:
        raise ManifestError("file not found", path=path) from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"not valid YAML ({exc.__class__.__name__})", path=path) from None


def write_manifest(path: Path, kind: str, fields: dict[str, Any]) -> None:
    write_yaml(path, {"kind": kind, "format_version": FORMAT_VERSION, **fields})


def read_manifest(path: Path, kind: str, hint: str | None = None) -> dict[str, Any]:
    """Load a manifest and check it says it is a `kind`; raise ManifestError naming the file if not."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"no {kind} manifest here", hint=hint, path=path)
    data = read_yaml(path)
    if not isinstance(data, dict) or data.get("kind") != kind:
        found = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise ManifestError(f"expected a {kind} manifest, found kind={found!r}", hint=hint, path=path)
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise ManifestError(
            f"{kind} manifest format {data['format_version']} is newer than this shitu understands",
            hint="upgrade shitu",
            path=path,
        )
    return data
