"""The Milvus vector store: a gallery's vectors in a Milvus collection (milvus-lite, a folder inside the index
dir, or a Milvus server or cluster by URI); the id map and manifest stay in the index folder as for faiss.

`backend.add/remove/search/stored` hand a MilvusVectors their work, so build-index, predict, eval,
benchmark-cpu, serve and the Python API use it unchanged.

Crash safety, given that a Milvus write and the manifest rename cannot be one transaction:
- new vectors are inserted and flushed BEFORE the manifest that names them is committed;
- removed vectors are deleted AFTER the manifest that drops them is committed (the manifest lists them as
  `pending_deletes`, so a writer killed in between leaves them to the next writer);
- a reader only ever returns ids its committed id map holds, so vectors of a writer that died are invisible;
- the next writer deletes them (ids >= the manifest's next_id, and its pending_deletes) before it writes.
A rebuild (new model or type) fills a NEW collection and drops the old one after the commit.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from shitu_cli.errors import BadInput

TOKEN_ENV = "MILVUS_TOKEN"
LOCAL_DB = "milvus.db"
CONNECT_TIMEOUT_S = 10.0
INSERT_BATCH = 5_000
SEARCH_EXTRA = 16  # results beyond k, so ids a reader must skip (a dead writer's) do not shorten its answer
INDEX_TYPES = {"flat": "FLAT", "ivf": "IVF_FLAT", "hnsw": "HNSW"}
_local_users: dict[str, int] = {}  # milvus-lite db path -> open stores in this process (its server is shared)


def is_server_uri(uri: str) -> bool:
    return bool(re.match(r"^(https?|tcp|unix):", uri))


def resolve_uri(uri: str | None, index_dir: Path) -> tuple[str, str]:
    """(what to connect to, what the manifest records): a local milvus-lite path is recorded relative to
    the index folder when it lies inside it, so the folder can move."""
    if uri is None or not is_server_uri(uri):
        path = Path(index_dir) / LOCAL_DB if uri is None else Path(uri)
        if not path.name.endswith(".db"):
            raise BadInput(f"--uri {uri} is neither a Milvus server URI nor a milvus-lite file",
                           hint="pass http://HOST:19530 for a server, or a path ending in .db for milvus-lite")
        path = path.resolve()
        try:
            recorded = path.relative_to(Path(index_dir).resolve()).as_posix()
        except ValueError:
            recorded = path.as_posix()
        return path.as_posix(), recorded
    return uri, uri


def connect(uri: str, token: str | None):
    """A MilvusClient, or BadInput naming the URI when it cannot be reached (never echoing the token)."""
    logging.getLogger("pymilvus").setLevel(logging.ERROR)
    logging.getLogger("milvus_lite").setLevel(logging.WARNING)  # its INFO lines (server start/stop, segments) are chatter
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise BadInput("the milvus index backend needs pymilvus and milvus-lite",
                       hint="pip install pymilvus milvus-lite (pinned in requirements/base.lock)") from None
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    if not is_server_uri(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        client = MilvusClient(uri=uri, token=token or "", timeout=CONNECT_TIMEOUT_S)
    except Exception as exc:  # pymilvus raises MilvusException and ConnectionConfigException, not one base
        reason = getattr(exc, "message", None) or str(exc)
        hint = (f"check the URI and that the server runs; pass --token or set {TOKEN_ENV} if it needs one"
                if is_server_uri(uri) else
                "milvus-lite lets one process at a time open its folder: is `shitu serve` or another shitu using "
                "this index? Stop it, or keep the gallery on a Milvus server (--uri http://HOST:19530)")
        raise BadInput(f"cannot reach Milvus at {uri}: {reason.splitlines()[0][:200]}", hint=hint) from None
    if not is_server_uri(uri):
        _local_users[uri] = _local_users.get(uri, 0) + 1
    return client


def release(client, uri: str) -> None:
    """Close a client from `connect`; the last one of a milvus-lite folder in this process stops its server."""
    try:
        client.close()
    finally:
        if not is_server_uri(uri):
            _local_users[uri] = _local_users.get(uri, 1) - 1
            if _local_users[uri] <= 0:
                # milvus-lite serves the folder from a thread in this process and holds the folder's LOCK
                # until then; releasing it lets another process open the gallery.
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(uri)


class MilvusVectors:
    """One index's vectors in a Milvus collection, seen through the ids its committed id map holds."""

    external_store = True

    def __init__(self, client, uri: str, recorded_uri: str, collection: str, dim: int, choice, live_ids, family: str):
        self.client, self.uri, self.recorded_uri, self.collection, self.d = client, uri, recorded_uri, collection, dim
        self.family = family  # collections of this index are named FAMILY_vN; a rebuild makes the next N
        self.live = set(int(i) for i in live_ids)
        self.pending_deletes: list[int] = []
        self.retired_collection: str | None = None
        self.search_params: dict[str, Any] = {}
        self.closed = False
        self.apply_search_params(choice)

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(cls, uri: str, token: str | None, family: str, version: int, dim: int, choice, recorded_uri: str | None = None):
        """A new, empty collection FAMILY_vVERSION (refusing to take over one that exists)."""
        from pymilvus import DataType

        if choice.type not in INDEX_TYPES:
            raise BadInput(f"index type {choice.type} is not available on the milvus backend",
                           hint=f"use --index-type {', '.join(INDEX_TYPES)} or auto with --index-backend milvus")
        collection = f"{family}_v{int(version)}"
        client = connect(uri, token)
        if client.has_collection(collection):
            raise BadInput(f"Milvus at {uri} already has a collection {collection!r}",
                           hint="pass another --collection, or drop it on the server first")
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="vector", index_type=INDEX_TYPES[choice.type], metric_type="IP",
                               params=_build_params(choice))
        client.create_collection(collection, schema=schema, index_params=index_params)
        return cls(client, uri, recorded_uri or uri, collection, dim, choice, [], family)

    @classmethod
    def open(cls, record: dict, index_dir: Path, dim: int, choice, live_ids, token: str | None = None):
        recorded = record["uri"]
        uri = recorded if is_server_uri(recorded) else (Path(index_dir) / recorded).resolve().as_posix()
        client = connect(uri, token)
        if not client.has_collection(record["collection"]):
            raise BadInput(f"Milvus at {uri} has no collection {record['collection']!r}, which this index names",
                           hint="rebuild the index with `shitu build-index`", path=index_dir)
        client.load_collection(record["collection"])  # a collection is searchable only once loaded
        family = record.get("family") or record["collection"].rsplit("_v", 1)[0]
        return cls(client, uri, recorded, record["collection"], dim, choice, live_ids, family)

    def close(self) -> None:
        """Let go of the connection; a second call does nothing (a reader's generation may be closed both by
        its owner and when the pipeline that searched it is collected)."""
        if not self.closed:
            self.closed = True
            release(self.client, self.uri)

    # ------------------------------------------------------------------ what backend.py calls

    @property
    def ntotal(self) -> int:
        return len(self.live)

    def apply_search_params(self, choice) -> None:
        params = choice.params
        if choice.type == "ivf":
            self.search_params = {"nprobe": int(params.get("nprobe", 1))}
        elif choice.type == "hnsw":
            self.search_params = {"ef": int(params.get("ef_search", 64))}
        else:
            self.search_params = {}

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        for start in range(0, len(ids), INSERT_BATCH):
            rows = [{"id": int(i), "vector": v} for i, v in zip(ids[start:start + INSERT_BATCH], vectors[start:start + INSERT_BATCH])]
            self.client.insert(self.collection, rows)
        self.live.update(int(i) for i in ids)

    def remove(self, ids: np.ndarray) -> None:
        """Hidden now; deleted from Milvus only after the manifest without them is committed."""
        doomed = [int(i) for i in ids if int(i) in self.live]
        self.live.difference_update(doomed)
        self.pending_deletes.extend(doomed)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        if not self.live:
            return scores, ids
        hits = self.client.search(self.collection, data=[q for q in np.asarray(queries, np.float32)],
                                  limit=min(k + SEARCH_EXTRA, 16_384), output_fields=["id"],
                                  search_params={"metric_type": "IP", "params": self.search_params})
        for row, found in enumerate(hits):
            kept = [(hit["distance"], int(hit["id"])) for hit in found if int(hit["id"]) in self.live][:k]
            for col, (score, item_id) in enumerate(kept):
                scores[row, col], ids[row, col] = score, item_id
        return scores, ids

    def stored(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live (id, vector), ids ascending."""
        iterator = self.client.query_iterator(self.collection, batch_size=INSERT_BATCH, filter="id >= 0",
                                              output_fields=["id", "vector"])
        found: dict[int, Any] = {}
        try:
            while batch := iterator.next():
                found.update((int(r["id"]), r["vector"]) for r in batch if int(r["id"]) in self.live)
        finally:
            iterator.close()
        order = sorted(found)
        vectors = np.asarray([found[i] for i in order], dtype=np.float32).reshape(len(order), self.d)
        return np.asarray(order, dtype=np.int64), vectors

    # ------------------------------------------------------------------ the commit protocol (store.commit)

    def manifest_record(self) -> dict[str, Any]:
        """What manifest.yaml says about the store: never the token."""
        return {"backend": "milvus", "uri": self.recorded_uri, "collection": self.collection, "family": self.family,
                "pending_deletes": sorted(self.pending_deletes)}

    @property
    def version(self) -> int:
        return int(self.collection.rsplit("_v", 1)[1])

    def before_commit(self) -> None:
        self.client.flush(self.collection)  # the vectors the manifest will name are durable first

    def after_commit(self) -> None:
        if self.pending_deletes:
            self.client.delete(self.collection, ids=sorted(self.pending_deletes))
            self.client.flush(self.collection)
        if self.retired_collection and self.client.has_collection(self.retired_collection):
            self.client.drop_collection(self.retired_collection)

    def clean_up_after_a_dead_writer(self, next_id: int, pending: list[int]) -> None:
        """Delete what an uncommitted writer left: ids >= next_id, the last commit's pending deletes, and
        collections of this index's family that no manifest names."""
        self.client.delete(self.collection, filter=f"id >= {int(next_id)}")
        if pending:
            self.client.delete(self.collection, ids=[int(i) for i in pending])
        for name in self.client.list_collections():
            if name != self.collection and re.match(rf"^{re.escape(self.family)}_v\d+$", name):
                self.client.drop_collection(name)


def _build_params(choice) -> dict[str, Any]:
    if choice.type == "ivf":
        return {"nlist": int(choice.params["nlist"])}
    if choice.type == "hnsw":
        return {"M": int(choice.params["M"]), "efConstruction": int(choice.params["ef_construction"])}
    return {}


def collection_family(index_dir: Path, requested: str | None) -> str:
    """The collection name stem: --collection, else `shitu_` + the index folder's name (letters, digits, _)."""
    if requested:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$", requested):
            raise BadInput(f"--collection {requested!r} is not a valid Milvus collection name",
                           hint="letters, digits and _, starting with a letter or _")
        return requested
    stem = re.sub(r"[^A-Za-z0-9_]", "_", Path(index_dir).resolve().name) or "index"
    return f"shitu_{stem}"
