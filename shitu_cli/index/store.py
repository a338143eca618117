"""The index folder on disk: generations of (vector.index, id_map.json) committed by one manifest rename.

Layout: INDEX_DIR/manifest.yaml names the live generation, INDEX_DIR/gen-NNNNNN/ holds its
vector.index and id_map.json, and the manifest records their sha256. A writer fills a new
generation folder, fsyncs it, then atomically replaces manifest.yaml: that rename is the
commit. A writer killed at any point leaves the old manifest pointing at an intact old
generation, so a reader always sees one consistent (index, id map, manifest) triple.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from shitu_cli.artifacts import FORMAT_VERSION, atomic_write_bytes, dump_yaml, read_manifest, sha256_bytes
from shitu_cli.errors import BadInput, ManifestError, write_error, writing_to
from shitu_cli.index.backend import METRIC, IndexChoice
from shitu_cli.index.items import GalleryItem, id_map_text, parse_id_map

INDEX_KIND = "shitu-index"
MANIFEST = "manifest.yaml"
VECTOR_FILE = "vector.index"
ID_MAP_FILE = "id_map.json"
LOCK_FILE = ".lock"
GENERATION_RE = re.compile(r"^gen-(\d{6,})$")
LOCK_TIMEOUT_S = 30.0

# Test hook: a writer stalls (so a test can SIGKILL it) right after the named write stage.
STALL_ENV = "SHITU_INDEX_STALL_AT"
STALL_MARKER_ENV = "SHITU_INDEX_STALL_MARKER"


@dataclass
class ModelRef:
    """The rec model whose features the index holds; predict refuses any other."""

    dir: str
    model_hash: str | None
    embedding_dim: int
    arch: str | None = None


@dataclass
class IndexManifest:
    generation: int
    dim: int
    count: int
    next_id: int  # ids are never reused, so a stale id can never name a different image
    index: dict[str, Any]  # type, params, chosen_by, reason
    model: ModelRef
    files: dict[str, dict[str, Any]]  # name -> {path, sha256, bytes}
    gallery: str | None = None
    metric: str = METRIC
    created_by: dict[str, str] = field(default_factory=dict)
    # where the vectors live: {"backend": "faiss"} (gen-*/vector.index), or {"backend": "milvus", "uri",
    # "collection", "pending_deletes"} (index.milvus); manifests written before this field are faiss
    vectors: dict[str, Any] = field(default_factory=lambda: {"backend": "faiss"})
    shard: dict[str, Any] | None = None  # {"index": i, "count": N, ...} for `build-index --shard i/N` output

    @property
    def choice(self) -> IndexChoice:
        known = ("type", "params", "reason", "chosen_by")
        return IndexChoice(**{k: v for k, v in self.index.items() if k in known})


@dataclass
class StoredIndex:
    """A loaded index: faiss object, id map and manifest, all of one generation."""

    dir: Path
    manifest: IndexManifest
    index: Any  # faiss.IndexIDMap2, or an index.milvus.MilvusVectors (backend.external)
    items: dict[int, GalleryItem]

    def close(self) -> None:
        """Let go of an external store's connection (a no-op for faiss)."""
        if hasattr(self.index, "close"):
            self.index.close()


def index_exists(index_dir: Path) -> bool:
    return (Path(index_dir) / MANIFEST).is_file()


def check_writable(index_dir: Path) -> None:
    """Refuse to write an index into a folder that holds something else."""
    index_dir = Path(index_dir)
    if index_dir.exists() and not index_dir.is_dir():
        raise BadInput("-o names a file, not a folder", path=index_dir)
    if index_dir.is_dir() and not index_exists(index_dir):
        strangers = [p for p in index_dir.iterdir() if p.name not in (LOCK_FILE, "recipe.yaml", "milvus.db") and not GENERATION_RE.match(p.name)]
        if strangers:
            raise BadInput("folder is not empty and holds no shitu index", hint="pass a new or empty folder to -o", path=index_dir)


@contextmanager
def write_lock(index_dir: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """One writer at a time; the OS drops the lock if the writer dies, so a kill never wedges it."""
    from filelock import FileLock, Timeout

    index_dir = Path(index_dir)
    created = not index_dir.exists()
    lock_path = index_dir / LOCK_FILE
    lock_existed = lock_path.exists()
    lock = FileLock(str(lock_path), timeout=timeout)
    try:
        with writing_to(index_dir):
            index_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()
        except Timeout:  # a TimeoutError, hence an OSError: caught before the next clause
            raise BadInput(f"another process has been writing this index for over {timeout:.0f} s",
                           hint="wait for the other build-index to finish", path=index_dir) from None
        except OSError as exc:
            raise write_error(exc, index_dir) from None
    except BaseException:
        _forget_failed_first_build(index_dir, created, lock_existed)
        raise
    try:
        yield
    except BaseException:
        lock.release()
        _forget_failed_first_build(index_dir, created, lock_existed)
        raise
    lock.release()


def _forget_failed_first_build(index_dir: Path, created: bool, lock_existed: bool) -> None:
    """A first build that failed leaves no folder (or, in a folder that was there, no lock) behind, only the error."""
    if index_exists(index_dir) or not index_dir.is_dir():
        return
    if created:
        shutil.rmtree(index_dir, ignore_errors=True)
    elif not lock_existed:
        (index_dir / LOCK_FILE).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reading


def load_index(index_dir: Path) -> StoredIndex:
    """Load the committed generation, checking every file against the manifest's sha256."""
    index_dir = Path(index_dir)
    for attempt in range(2):
        manifest = read_index_manifest(index_dir)
        try:
            return _load_generation(index_dir, manifest)
        except FileNotFoundError:
            # A writer committed twice while we read, retiring our generation: read the new one.
            if attempt:
                raise ManifestError("index files named by the manifest are missing", path=index_dir) from None
    raise AssertionError("unreachable")


def read_index_manifest(index_dir: Path) -> IndexManifest:
    index_dir = Path(index_dir)
    hint = "pass a folder written by `shitu build-index`"
    if not index_dir.is_dir():
        raise BadInput("index folder not found", hint=hint, path=index_dir)
    path = index_dir / MANIFEST
    data = read_manifest(path, INDEX_KIND, hint=hint)
    data.pop("kind", None)
    data.pop("format_version", None)
    try:
        data["model"] = ModelRef(**data["model"])
        return IndexManifest(**data)
    except (TypeError, KeyError) as exc:
        raise ManifestError(f"index manifest is malformed ({exc})", path=path) from None


def load_for_write(index_dir: Path) -> StoredIndex:
    """load_index for a writer holding write_lock: first removes what a writer that died left in an external store."""
    stored = load_index(index_dir)
    if stored.manifest.vectors.get("backend") == "milvus":
        stored.index.clean_up_after_a_dead_writer(stored.manifest.next_id, stored.manifest.vectors.get("pending_deletes", []))
    return stored


def _load_generation(index_dir: Path, manifest: IndexManifest) -> StoredIndex:
    from shitu_cli.index import backend

    id_map_bytes = _checked_bytes(index_dir, manifest, ID_MAP_FILE)
    items = parse_id_map(id_map_bytes.decode("utf-8"), index_dir / manifest.files[ID_MAP_FILE]["path"])
    if manifest.vectors.get("backend") == "milvus":
        from shitu_cli.index.milvus import MilvusVectors

        store = MilvusVectors.open(manifest.vectors, index_dir, manifest.dim, manifest.choice, items)
        return StoredIndex(index_dir, manifest, store, items)
    index_bytes = _checked_bytes(index_dir, manifest, VECTOR_FILE)
    index = backend.from_bytes(index_bytes)
    backend.apply_search_params(index, manifest.choice)
    if index.ntotal != manifest.count or len(items) != manifest.count or index.d != manifest.dim:
        raise ManifestError(
            f"index holds {index.ntotal} vectors of dim {index.d} and {len(items)} id map entries, "
            f"manifest says {manifest.count} of dim {manifest.dim}", path=index_dir)
    return StoredIndex(index_dir, manifest, index, items)


def _checked_bytes(index_dir: Path, manifest: IndexManifest, name: str) -> bytes:
    record = manifest.files.get(name)
    if not record:
        raise ManifestError(f"manifest names no {name}", path=index_dir / MANIFEST)
    path = index_dir / record["path"]
    data = path.read_bytes()
    if sha256_bytes(data) != record["sha256"]:
        raise ManifestError(f"{name} does not match the sha256 in manifest.yaml (modified or damaged)",
                            hint="rebuild the index with `shitu build-index`", path=path)
    return data


# ----------------------------------------------------------------------------- writing


def commit(index_dir: Path, index: Any, items: Mapping[int, GalleryItem], fields: dict[str, Any]) -> tuple[IndexManifest, list[Path]]:
    """Write a new generation and switch the manifest to it; returns the manifest and files written.

    `fields` are the IndexManifest fields other than generation, count, dim and files.
    Call under `write_lock`.
    """
    from shitu_cli.index import backend

    index_dir = Path(index_dir)
    previous = read_index_manifest(index_dir).generation if index_exists(index_dir) else 0
    generation = max([previous, *_generation_numbers(index_dir)]) + 1
    gen_dir = index_dir / f"gen-{generation:06d}"
    external = backend.external(index)
    payloads = {} if external else {VECTOR_FILE: backend.to_bytes(index)}
    payloads[ID_MAP_FILE] = id_map_text(items).encode("utf-8")
    if external:
        fields = {**fields, "vectors": {**fields.get("vectors", {}), **index.manifest_record()}}
    files = {}
    try:
        gen_dir.mkdir(parents=True)
        for name, data in payloads.items():
            _write_synced(gen_dir / name, data)
            files[name] = {"path": f"{gen_dir.name}/{name}", "sha256": sha256_bytes(data), "bytes": len(data)}
            _stall_for_tests(name)
        _fsync_dir(gen_dir)
        if external:
            index.before_commit()
        manifest = IndexManifest(generation=generation, dim=index.d, count=index.ntotal, files=files, **fields)
        manifest_fields = {"kind": INDEX_KIND, "format_version": FORMAT_VERSION, **asdict(manifest)}
        _stall_for_tests("before-commit")
        atomic_write_bytes(index_dir / MANIFEST, dump_yaml(manifest_fields).encode("utf-8"))  # the commit
    except BaseException:
        shutil.rmtree(gen_dir, ignore_errors=True)  # never committed: a half-written generation is only clutter
        raise
    _fsync_dir(index_dir)
    _stall_for_tests("after-commit")
    if external:
        index.after_commit()
    _retire_old_generations(index_dir, keep={generation, previous})
    return manifest, [gen_dir / name for name in payloads] + [index_dir / MANIFEST]


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _generation_numbers(index_dir: Path) -> list[int]:
    return [int(m.group(1)) for p in index_dir.iterdir() if (m := GENERATION_RE.match(p.name))]


def _retire_old_generations(index_dir: Path, keep: set[int]) -> None:
    # The previous generation stays one more round, for a reader that read the old manifest
    # a moment before the commit; older ones, and those a killed writer left, go.
    for path in index_dir.iterdir():
        match = GENERATION_RE.match(path.name)
        if match and int(match.group(1)) not in keep:
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(f".{MANIFEST}.") and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)


def _stall_for_tests(stage: str) -> None:
    if os.environ.get(STALL_ENV) == stage:
        marker = os.environ.get(STALL_MARKER_ENV)
        if marker:
            Path(marker).write_text(stage, encoding="utf-8")
        time.sleep(3600)
