"""Where an index's vectors live, as a writer sees it: faiss inside the index folder, or a Milvus collection
(milvus-lite file or server). `StoreSpec` turns --index-backend/--uri/--token/--collection plus the existing
manifest into that choice, and makes new stores for a (re)build."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shitu_cli.errors import BadInput

BACKENDS = ("faiss", "milvus")


@dataclass
class StoreSpec:
    backend: str = "faiss"
    uri: str | None = None  # what to connect to
    recorded_uri: str | None = None  # what the manifest records (a lite path relative to the index folder)
    token: str | None = field(default=None, repr=False)  # never written anywhere
    family: str | None = None  # collections FAMILY_v1, FAMILY_v2, ... one per rebuild
    previous: Any = None  # the committed index's MilvusVectors, if its vectors are in Milvus
    opened: list = field(default_factory=list)

    @classmethod
    def resolve(cls, requested: str | None, uri: str | None, token: str | None, collection: str | None,
                current, index_dir: Path) -> "StoreSpec":
        """--index-backend (default: the index's own, else faiss) with its URI and collection family."""
        from shitu_cli.index import milvus

        if requested is not None and requested not in BACKENDS:
            raise BadInput(f"unknown index backend {requested!r}", hint=f"choose one of: {', '.join(BACKENDS)}")
        have = current.manifest.vectors if current is not None else {"backend": "faiss"}
        chosen = requested or have.get("backend", "faiss")
        previous = current.index if current is not None and have.get("backend") == "milvus" else None
        if chosen == "faiss":
            if uri is not None or collection is not None:
                raise BadInput("--uri and --collection are options of the milvus index backend",
                               hint="add --index-backend milvus")
            return cls("faiss", previous=previous)
        if previous is not None and uri is None and collection is None:
            return cls("milvus", previous.uri, have["uri"], token, previous.family, previous)
        connect_uri, recorded = milvus.resolve_uri(uri, index_dir)
        return cls("milvus", connect_uri, recorded, token, milvus.collection_family(index_dir, collection), previous)

    def check_reachable(self) -> None:
        """Fail on an unreachable server before any embedding is done."""
        from shitu_cli.index import milvus

        if self.backend == "milvus" and milvus.is_server_uri(self.uri):
            milvus.connect(self.uri, self.token).close()

    def same_as(self, current) -> bool:
        """Whether the committed index's vectors are in the store this writer writes to."""
        if current is None:
            return False
        have = current.manifest.vectors
        if have.get("backend", "faiss") != self.backend:
            return False
        return self.backend == "faiss" or (have.get("uri") == self.recorded_uri and have.get("family") == self.family)

    def new_index(self, choice, dim: int, training, current):
        """An empty index of `choice` in this store (IVF trained on `training` for faiss)."""
        from shitu_cli.index import backend
        from shitu_cli.index.milvus import MilvusVectors, is_server_uri

        if self.backend == "faiss":
            return backend.new_index(choice, dim, training=training if choice.type in backend.IVF_TYPES else None)
        same_family = self.previous is not None and self.previous.family == self.family and self.previous.uri == self.uri
        version = self.previous.version + 1 if same_family else 1
        if self.previous is None and not is_server_uri(self.uri):
            self._drop_uncommitted_lite_collection(version)
        store = MilvusVectors.create(self.uri, self.token, self.family, version, dim, choice, self.recorded_uri)
        self.opened.append(store)
        if same_family:
            store.retired_collection = self.previous.collection  # dropped once the manifest names the new one
        return store

    def _drop_uncommitted_lite_collection(self, version: int) -> None:
        # A first build killed before its commit leaves a collection no manifest names in the index's own
        # milvus-lite folder; on a server nothing is dropped that this index never committed.
        from shitu_cli.index.milvus import connect, release

        client = connect(self.uri, self.token)
        try:
            name = f"{self.family}_v{version}"
            if client.has_collection(name):
                client.drop_collection(name)
        finally:
            release(client, self.uri)

    def close_all(self, current, result) -> None:
        for store in {id(s): s for s in [*(self.opened), getattr(current, "index", None), getattr(result, "index", None)]
                      if s is not None and hasattr(s, "close")}.values():
            store.close()

    def record(self, index) -> dict[str, Any]:
        if hasattr(index, "manifest_record"):
            return {k: v for k, v in index.manifest_record().items() if k != "pending_deletes"}
        return {"backend": "faiss"}

    def recipe_options(self) -> dict[str, Any]:
        """build_index's own parameter names, so `shitu reproduce` can replay them (a default milvus-lite folder
        inside the index is no --uri: the replay makes its own)."""
        from shitu_cli.index.milvus import LOCAL_DB

        uri = None if self.backend == "faiss" or self.recorded_uri == LOCAL_DB else self.uri
        return {"index_backend": self.backend, "uri": uri, "collection": self.family}

