"""The milvus index backend on a Milvus SERVER reached by --uri: milvus-lite's own gRPC server
(`milvus-lite server`) runs as a separate process on a free port, and build-index (sync, append, remove),
predict and the Python Pipeline talk to it over the network as they would to a Milvus cluster."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from index_cli import build_index_json, gallery_labels, predicted_labels
from ports import free_port
from synth import draw_object, write_rgb

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

SERVER_START_S = 60


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    """http://127.0.0.1:PORT of a milvus-lite gRPC server in its own process, stopped after the module."""
    exe = Path(sys.executable).parent / "milvus-lite"
    if not exe.exists():
        pytest.skip("milvus-lite's server command is not installed beside this Python")
    data = tmp_path_factory.mktemp("milvus-server")
    port = free_port()
    log = (data / "server.log").open("w", encoding="utf-8")
    server = subprocess.Popen([str(exe), "server", "--data-dir", str(data / "data"), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while "listening" not in (data / "server.log").read_text(encoding="utf-8"):
            assert server.poll() is None, (data / "server.log").read_text(encoding="utf-8")[-2000:]
            assert time.monotonic() < deadline, "milvus-lite server did not start"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _server_ids(uri, collection):
    """The ids the server itself holds, asked through a client of our own (not the index's)."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    try:
        client.load_collection(collection)
        return sorted(int(r["id"]) for r in client.query(collection, filter="id >= 0", output_fields=["id"]))
    finally:
        client.close()


def test_build_sync_append_remove_and_predict_on_a_milvus_server(cli, gallery, rec, tmp_path, milvus_server):
    index = tmp_path / "shop"
    first = build_index_json(cli, gallery, "-o", index, "--rec", rec, "--index-backend", "milvus", "--uri", milvus_server,
                   "--collection", "shop_server")
    assert (first["count"], first["store"]["backend"], first["store"]["uri"]) == (12, "milvus", milvus_server)
    vectors = yaml.safe_load((index / "manifest.yaml").read_text(encoding="utf-8"))["vectors"]
    assert {k: vectors[k] for k in ("backend", "uri", "collection")} == {"backend": "milvus", "uri": milvus_server,
                                                                      "collection": "shop_server_v1"}
    assert not any(p.suffix in (".db", ".index") for p in index.rglob("*"))  # nothing but the id map is local
    assert len(_server_ids(milvus_server, "shop_server_v1")) == 12
    predicted = predicted_labels(cli, index, gallery)
    assert all(label == path.split("/")[-2] for path, label in predicted.items())

    labels = gallery_labels(gallery)  # re-sync with no backend flags: the manifest's server
    (gallery / labels[0] / "000.jpg").unlink()
    write_rgb(gallery / labels[3] / "new.jpg", draw_object(labels[3], 64, np.random.default_rng(8)))
    report = build_index_json(cli, gallery, "-o", index)
    assert (report["added"], report["removed"], report["unchanged"], report["store"]["uri"]) == (1, 1, 11, milvus_server)
    assert len(_server_ids(milvus_server, "shop_server_v1")) == 12

    removed = cli("build-index", "-o", index, "--remove", labels[2], "--json")
    assert removed.exit_code == 0 and json.loads(removed.stdout)["removed"] == 3, removed.stderr
    assert len(_server_ids(milvus_server, "shop_server_v1")) == 9  # deleted on the server after the commit
    assert labels[2] not in set(predicted_labels(cli, index, gallery).values())
    again = build_index_json(cli, gallery, "-o", index, "--append")
    assert (again["added"], again["count"]) == (3, 12)

    moved = tmp_path / "elsewhere" / "shop"  # the folder names the server, not a path: it moves freely
    shutil.copytree(index, moved)
    predicted = predicted_labels(cli, moved, gallery)
    assert len(predicted) == 12 and all(label == path.split("/")[-2] for path, label in predicted.items())


def test_python_pipeline_searches_a_milvus_server_and_closes_old_generations(gallery, rec, tmp_path, milvus_server):
    import gc

    from shitu_cli.api import Index, Pipeline

    index = Index.build(gallery, tmp_path / "api", rec=rec, index_backend="milvus", uri=milvus_server,
                        collection="api_server")
    assert index.manifest.vectors["uri"] == milvus_server
    pipe = Pipeline(index)
    labels = gallery_labels(gallery)
    first = pipe.current().index.index
    assert pipe(sorted((gallery / labels[1]).glob("*.jpg"))[0]).recognitions[0].label == labels[1]
    added = tmp_path / "new.png"
    write_rgb(added, draw_object(labels[0], 64, np.random.default_rng(5)))
    index.add([added], label=labels[0])
    assert pipe(added).recognitions[0].label == labels[0]  # the pipeline reloaded the new generation
    gc.collect()
    assert first.closed and not pipe.current().index.index.closed  # the old generation's client let go
    assert len(_server_ids(milvus_server, "api_server_v1")) == 13
