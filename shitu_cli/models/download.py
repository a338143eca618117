"""Getting models into the cache: resumable HTTP download, sha256 trust-on-first-use, safe tar extraction.

Nothing from a download is ever executed or unpickled: tars are unpacked member by
member after checks, and only the model files we know are kept.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from shitu_cli import __version__
from shitu_cli.artifacts import sha256_file
from shitu_cli.errors import BadInput
from shitu_cli.models import registry
from shitu_cli.models.export import atomic_dir
from shitu_cli.models.manifest import MODEL_MANIFEST, read_model_manifest, write_model_manifest
from shitu_cli.models.official_manifest import official_manifest
from shitu_cli.models.registry import INFERENCE, WEIGHTS, CachedModel, OfficialModel

CHUNK = 1 << 16
TIMEOUT_S = 30
MAX_UNPACKED_BYTES = 4 << 30  # no official model comes near this; a tar bomb would
# (model file, params file) pairs Paddle writes, newest format first.
MODEL_FILE_PAIRS = (
    ("inference.json", "inference.pdiparams"),
    ("inference.pdmodel", "inference.pdiparams"),
    ("model.json", "model.pdiparams"),
    ("model.pdmodel", "model.pdiparams"),
)
SIDE_FILES = ("infer_cfg.yml",)  # PaddleDetection's preprocessing/label description, read as YAML data

Progress = Callable[[int, "int | None"], None]  # (bytes just received, total bytes or None)


class DownloadError(BadInput):
    """A download that failed: offline, HTTP error, truncated. Exit code 2, naming the URL."""


@dataclass
class Fetched:
    path: Path
    total_bytes: int
    fetched_bytes: int  # what came over the network this time (less than total when resumed)
    resumed_from: int


@dataclass
class Installed:
    name: str
    kind: str
    path: Path  # the model dir, or the .pdparams file
    sha256: str
    status: str  # downloaded | resumed | already cached | added
    fetched_bytes: int = 0
    source: str = ""


# ---------------------------------------------------------------- HTTP with resume


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def fetch(url: str, dest: Path, progress: Progress | None = None, timeout: float = TIMEOUT_S, name: str | None = None) -> Fetched:
    """Download `url` to `dest`, resuming from `dest`.part with an HTTP Range request if one is there."""
    if not url.startswith(("http://", "https://")):
        raise DownloadError(f"refusing to download {url}: only http(s) URLs are fetched", hint=f"check ${registry.BASE_URL_ENV}")
    part = part_path(dest)
    part.parent.mkdir(parents=True, exist_ok=True)
    start = part.stat().st_size if part.is_file() else 0
    try:
        response = _open(url, start, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # our .part is stale or already whole: start over once
            part.unlink()
            return fetch(url, dest, progress, timeout, name)
        raise _download_error(url, f"HTTP {exc.code} {exc.reason}", name) from None
    except (urllib.error.URLError, OSError) as exc:
        raise _download_error(url, _reason(exc), name) from None
    with response:
        start = _resume_offset(response, start)
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        received = _stream(response, part, start, total, progress, url)
    if total is not None and start + received < total:
        raise DownloadError(f"download of {url} stopped at {start + received} of {total} bytes",
                            hint=f"run the same command again to resume from {part}")
    os.replace(part, dest)
    return Fetched(dest, start + received, received, start)


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": f"shitu/{__version__}"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _resume_offset(response, asked: int) -> int:
    """Where the body starts: `asked` if the server honoured our Range, else 0 (it sent the whole file)."""
    if response.status != 206:
        return 0
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return asked if match and int(match.group(1)) == asked else 0


def _stream(response, part: Path, start: int, total: int | None, progress: Progress | None, url: str) -> int:
    received = 0
    if progress and start:
        progress(start, total)
    try:
        with open(part, "ab" if start else "wb") as handle:
            while chunk := response.read(CHUNK):
                handle.write(chunk)
                received += len(chunk)
                if progress:
                    progress(len(chunk), total)
    except OSError as exc:  # connection reset, timeout mid-body: keep the .part for a resume
        raise DownloadError(f"download of {url} broke off ({_reason(exc)})",
                            hint=f"run the same command again to resume from {part}") from None
    return received


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return str(reason).strip() or exc.__class__.__name__


def _download_error(url: str, why: str, name: str | None = None) -> DownloadError:
    file_name = url.rsplit("/", 1)[-1]
    return DownloadError(
        f"cannot download {url} ({why})",
        hint=f"download {file_name} by hand on a connected machine, then `shitu models add PATH/{file_name} --name {name or 'NAME'}`",
    )


# ---------------------------------------------------------------- safe extraction


def check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse anything that could land outside the target or is not plain data."""
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or PurePosixPath(name).is_absolute():
        raise BadInput(f"archive member {name!r} has an absolute path; refusing to extract", path=archive)
    if ".." in parts or "\\" in name:
        raise BadInput(f"archive member {name!r} points outside the archive; refusing to extract", path=archive)
    if not (member.isreg() or member.isdir()):
        what = "link" if (member.issym() or member.islnk()) else "device or special file"
        raise BadInput(f"archive member {name!r} is a {what}; model archives hold plain files only", path=archive)


def safe_extract(archive: Path, dest: Path) -> None:
    """Unpack a tar into `dest` after checking every member; on any refusal nothing is extracted."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                check_member(member, archive)
            if sum(m.size for m in members) > MAX_UNPACKED_BYTES:
                raise BadInput("archive unpacks to more than 4 GiB; refusing", path=archive)
            if hasattr(tarfile, "data_filter"):  # Python's own guard as a second line
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4; our checks above already ran
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError) as exc:
        raise BadInput(f"not a readable tar archive ({exc.__class__.__name__}: {exc})", path=archive,
                       hint="download it again; a truncated file cannot be unpacked") from None


def find_model_files(root: Path) -> tuple[Path, str, str]:
    """The one folder under `root` holding a Paddle inference model, and its model and params file names."""
    found = []
    for folder in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        for model_file, params_file in MODEL_FILE_PAIRS:
            if (folder / model_file).is_file() and (folder / params_file).is_file():
                found.append((folder, model_file, params_file))
                break
    if len(found) != 1:
        names = " / ".join(f"{m} + {p}" for m, p in MODEL_FILE_PAIRS[:2])
        what = "no" if not found else f"{len(found)}"
        raise BadInput(f"{what} Paddle inference models found (looked for {names})", path=root)
    return found[0]


# ---------------------------------------------------------------- installing into the cache


def pull(name: str, *, force: bool = False, trust_new: bool = False, progress: Progress | None = None) -> Installed:
    """Download an official model into the cache (resuming a partial download) and install it."""
    model = registry.official_model(name)
    entries = registry.read_registry()
    entry = entries.get(name)
    if registry.is_cached(entry) and not force:
        verify_cached(entry)
        return Installed(name, model.kind, entry.location(), entry.sha256, "already cached", source=entry.source)
    archive = registry.downloads_dir() / model.file_name
    fetched = fetch(model.url, archive, progress, name=model.name)
    status = "resumed" if fetched.resumed_from else "downloaded"
    try:
        installed = install(archive, model.name, model, origin=model.url, trust_new=trust_new, downloaded=True)
    finally:
        archive.unlink(missing_ok=True)  # installed, refused (moved aside) or unusable: never reused as is
    installed.status, installed.fetched_bytes = status, fetched.fetched_bytes
    return installed


def add(path: Path, name: str | None = None, *, trust_new: bool = False) -> Installed:
    """Register a manually downloaded tar, .pdparams or model folder into the cache under `name`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BadInput("no such file or folder", path=path)
    model = registry.OFFICIAL_MODELS.get(name) if name else registry.model_for_file(path.name)
    if name is None and model is None:
        raise BadInput("cannot tell which model this is from its file name", path=path,
                       hint="pass --name with a name from `shitu models list` (or your own name for a shitu export)")
    installed = install(path, name or model.name, model, origin=str(path.resolve()), trust_new=trust_new, downloaded=False)
    installed.status = "added"
    return installed


def install(given: Path, name: str, model: OfficialModel | None, *, origin: str, trust_new: bool,
            downloaded: bool) -> Installed:
    """Check, unpack and register `given` (a tar, a .pdparams or a model folder) as cache entry `name`."""
    from filelock import FileLock

    check_name(name)
    root = registry.cache_root()
    root.mkdir(parents=True, exist_ok=True)
    kind = _kind_of(given)
    if model is not None and model.kind != kind:
        raise BadInput(f"{name} is {model.kind}, but this is {kind}", path=given)
    with FileLock(str(root / ".lock"), timeout=600):
        entries = registry.read_registry()
        if given.is_file():
            digest, extra = sha256_file(given), {}
            _check_first_seen(entries.get(name), digest, given, origin, trust_new, downloaded)
        else:  # a folder has no file sum comparable with a download's; record its params file's sum
            digest, extra = _params_sha256(given), {"sha256_of": "params file of an added folder"}
        if kind == WEIGHTS:
            location = _install_weights(given, root / name, model.file_name if model else given.name)
        else:
            location = _install_model_dir(given, root / name, name, model, origin)
        entries[name] = CachedModel(
            name=name, kind=kind, task=model.task if model else _task_of(location, kind), path=location.relative_to(root).as_posix(),
            source=origin, file_name=given.name, sha256=digest, bytes=_size(given),
            added=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), extra=extra,
        )
        registry.write_registry(entries)
    return Installed(name, kind, location, digest, "installed", source=origin)


def check_name(name: str) -> None:
    # The name becomes a folder in the cache: no separators, no dot-dot, nothing hidden.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}", name) or name == "downloads":
        raise BadInput(f"model name {name!r} is not usable as a cache folder name",
                       hint="use letters, digits, '.', '_', '-' (e.g. my-rec-v2)")


def _params_sha256(folder: Path) -> str:
    found, _, params_file = find_model_files(folder)
    return sha256_file(found / params_file)


def _kind_of(given: Path) -> str:
    if given.is_dir():
        return INFERENCE
    if given.suffix == ".pdparams":
        return WEIGHTS
    if tarfile.is_tarfile(given):
        return INFERENCE
    raise BadInput("expected a .tar archive, a .pdparams file or a model folder", path=given)


def _check_first_seen(entry: CachedModel | None, digest: str, given: Path, origin: str, trust_new: bool,
                      downloaded: bool) -> None:
    """Trust on first use: a file whose sha256 differs from the one first recorded for this name is refused."""
    if entry is None or entry.extra.get("sha256_of") or entry.sha256 == digest or trust_new:
        return  # first sighting, a folder was recorded (not comparable), the same file, or told to trust it
    kept = given
    if downloaded:  # a download: move it aside so nothing picks it up, but keep it for inspection
        kept = given.with_name(f"{given.name}.rejected-{digest[:12]}")
        os.replace(given, kept)
    raise BadInput(
        f"sha256 of {origin} is {digest[:16]}..., but {entry.sha256[:16]}... was recorded when {entry.name} "
        f"was first installed; not using it (kept at {kept})",
        hint="if the new file is genuine, rerun with --trust-new to record its sum",
    )


def _install_weights(given: Path, target: Path, file_name: str) -> Path:
    with atomic_dir(target) as staging:
        shutil.copyfile(given, staging / file_name)
    return target / file_name


def _install_model_dir(given: Path, target: Path, name: str, model: OfficialModel | None, origin: str) -> Path:
    with tempfile.TemporaryDirectory(prefix=f".{name}.unpack-", dir=target.parent) as unpack:
        source_root = given
        if given.is_file():
            source_root = Path(unpack)
            safe_extract(given, source_root)
        folder, model_file, params_file = find_model_files(source_root)
        with atomic_dir(target) as staging:
            for file_name in (model_file, params_file, *SIDE_FILES):
                if (folder / file_name).is_file():
                    shutil.copyfile(folder / file_name, staging / file_name)
            if (folder / MODEL_MANIFEST).is_file():  # a shitu export: its own manifest is the truth
                shutil.copyfile(folder / MODEL_MANIFEST, staging / MODEL_MANIFEST)
                read_model_manifest(staging)
            elif model is not None:
                write_model_manifest(staging, official_manifest(model, staging, model_file, params_file, origin))
            else:
                raise BadInput(f"{name!r} is not an official model and this folder has no {MODEL_MANIFEST}",
                               path=given, hint="use a name from `shitu models list`, or add a folder exported by shitu")
    return target


def _task_of(location: Path, kind: str) -> str | None:
    return read_model_manifest(location).task if kind == INFERENCE else None


def _size(given: Path) -> int:
    if given.is_file():
        return given.stat().st_size
    return sum(p.stat().st_size for p in given.rglob("*") if p.is_file())


def verify_cached(entry: CachedModel) -> None:
    """Check a cached model against what was recorded when it was installed."""
    location = entry.location()
    if entry.kind == WEIGHTS:
        ok = sha256_file(location) == entry.sha256
    else:
        manifest = read_model_manifest(location)
        ok = manifest.model_hash is None or sha256_file(location / manifest.params_file) == manifest.model_hash
    if not ok:
        raise BadInput(f"cached files of {entry.name} changed since they were installed", path=location,
                       hint=f"`shitu models pull {entry.name} --force` downloads it again")
