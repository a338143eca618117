"""The milvus index backend on milvus-lite (a folder in the index dir, no server), through the same scenarios the
faiss backend passes: build, predict, re-sync, append, remove, a writer killed mid-write; plus what is Milvus's own:
the manifest names the store (never a token), an unreachable server is one line naming it, and the Python API
searches it unchanged."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from shitu_cli.index.store import STALL_ENV, STALL_MARKER_ENV, load_index
from index_cli import build_index_json, gallery_labels, predicted_labels
from synth import draw_object, write_rgb
from tiny_rec import export_tiny_rec

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

MILVUS = ("--index-backend", "milvus")


def _manifest(index):
    return yaml.safe_load((index / "manifest.yaml").read_text(encoding="utf-8"))


def _stored_ids(index):
    stored = load_index(index)
    try:
        return sorted(int(i) for i in stored.index.client.query(stored.index.collection, filter="id >= 0", output_fields=["id"])
                      for i in [i["id"]])
    finally:
        stored.close()


@pytest.mark.parametrize("kind", ["flat", pytest.param("hnsw", marks=pytest.mark.slow)])
def test_build_predict_sync_append_remove_on_milvus_lite(cli, gallery, rec, tmp_path, kind, monkeypatch):
    monkeypatch.setenv("MILVUS_TOKEN", "root:sekrit")  # ignored by milvus-lite; must never reach the disk
    index = tmp_path / "index"
    first = build_index_json(cli, gallery, "-o", index, "--rec", rec, "--index-type", kind, *MILVUS)
    assert (first["count"], first["index"]["type"], first["store"]["backend"]) == (12, kind, "milvus")
    manifest = _manifest(index)
    assert manifest["vectors"]["backend"] == "milvus" and manifest["vectors"]["uri"] == "milvus.db"
    assert manifest["vectors"]["collection"] == "shitu_index_v1"
    assert not any(p.name == "vector.index" for p in index.rglob("*"))  # the vectors are in Milvus only
    assert (index / "milvus.db").is_dir()
    assert "sekrit" not in "".join(p.read_text(encoding="utf-8", errors="replace") for p in index.rglob("*.yaml"))
    predicted = predicted_labels(cli, index, gallery)
    assert all(label == path.split("/")[-2] for path, label in predicted.items())

    labels = gallery_labels(gallery)  # re-sync: one deleted, one changed, one added
    (gallery / labels[0] / "000.jpg").unlink()
    write_rgb(gallery / labels[1] / "000.jpg", draw_object(labels[2], 64, np.random.default_rng(9)))
    write_rgb(gallery / labels[3] / "new.jpg", draw_object(labels[3], 64, np.random.default_rng(8)))
    report = build_index_json(cli, gallery, "-o", index)  # no flags: the index's own backend
    assert (report["added"], report["changed"], report["removed"], report["unchanged"]) == (1, 1, 1, 10)
    assert _manifest(index)["vectors"]["backend"] == "milvus" and len(_stored_ids(index)) == 12

    removed = cli("build-index", "-o", index, "--remove", labels[2], "--json")
    assert removed.exit_code == 0, removed.stderr
    assert json.loads(removed.stdout)["removed"] == 3
    assert len(_stored_ids(index)) == 9  # deleted from the collection after the commit, not just hidden
    assert labels[2] not in set(predicted_labels(cli, index, gallery).values())
    again = build_index_json(cli, gallery, "-o", index, "--append")
    assert (again["added"], again["count"]) == (3, 12)
    predicted = predicted_labels(cli, index, gallery)
    assert all(label == path.split("/")[-2] for path, label in predicted.items())


@pytest.mark.slow
def test_new_model_rebuilds_into_a_new_collection_and_drops_the_old(cli, gallery, rec, tmp_path):
    index = tmp_path / "index"
    build_index_json(cli, gallery, "-o", index, "--rec", rec, *MILVUS)
    other = export_tiny_rec(tmp_path / "other", embedding_dim=32, seed=3)
    rebuilt = build_index_json(cli, gallery, "-o", index, "--rec", other)
    assert rebuilt["action"] == "rebuilt" and rebuilt["store"]["collection"] == "shitu_index_v2"
    stored = load_index(index)
    try:
        assert stored.index.client.list_collections() == ["shitu_index_v2"] and stored.index.d == 32
    finally:
        stored.close()


def test_python_api_and_eval_search_the_milvus_index(cli, gallery, rec, tmp_path):
    from shitu_cli.api import Index, Pipeline

    index = Index.build(gallery, tmp_path / "index", rec=rec, index_backend="milvus")
    pipe = Pipeline(index)
    first = pipe.current().index.index
    image = sorted((gallery / gallery_labels(gallery)[1]).glob("*.jpg"))[0]
    assert pipe(image).recognitions[0].label == gallery_labels(gallery)[1]
    added = tmp_path / "new.png"
    write_rgb(added, draw_object(gallery_labels(gallery)[0], 64, np.random.default_rng(5)))
    index.add([added], label=gallery_labels(gallery)[0])  # the same process holds the lite folder open: shared, not locked
    assert pipe(added).recognitions[0].label == gallery_labels(gallery)[0]
    gc.collect()
    assert first.closed and not pipe.current().index.index.closed  # a reload lets the old generation's client go
    result = cli("eval", gallery, "--index", tmp_path / "index", "--json")
    assert result.exit_code == 0, result.stderr


def test_reading_an_index_through_the_api_lets_its_milvus_client_go(gallery, rec, tmp_path):
    """Index.labels/add/remove read the id map; the Milvus client loading it opens must not outlive the call
    (milvus-lite holds its folder's lock while any client of it is open in this process)."""
    from shitu_cli.api import Index
    from shitu_cli.index import milvus

    index = Index.build(gallery, tmp_path / "index", rec=rec, index_backend="milvus")
    lite_folder = (tmp_path / "index" / index.manifest.vectors["uri"]).resolve().as_posix()
    assert milvus._local_users.get(lite_folder, 0) == 0
    assert sum(index.labels().values()) == 12
    assert milvus._local_users.get(lite_folder, 0) == 0


@pytest.mark.slow  # a subprocess that imports paddle: ~25 s on 2 shared cores
def test_killed_writer_leaves_a_consistent_milvus_index(cli, gallery, rec, tmp_path):
    index = tmp_path / "index"
    build_index_json(cli, gallery, "-o", index, "--rec", rec, *MILVUS)
    labels = gallery_labels(gallery)
    write_rgb(gallery / labels[0] / "added.jpg", draw_object(labels[0], 64, np.random.default_rng(11)))
    (gallery / labels[1] / "001.jpg").unlink()
    marker = tmp_path / "stalled"
    env = {**os.environ, STALL_ENV: "before-commit", STALL_MARKER_ENV: str(marker)}
    cmd = [sys.executable, "-m", "shitu_cli", "build-index", str(gallery), "-o", str(index)]
    writer = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert writer.poll() is None, writer.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "writer never stalled"
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)

    # the killed writer inserted the new vector; readers do not see it, the removed one is still there
    stored = load_index(index)
    try:
        assert stored.manifest.count == 12 == stored.index.ntotal
        _, ids = stored.index.search(np.ones((1, 64), np.float32) / 8, 12)
        assert set(ids[0][ids[0] >= 0]) <= set(stored.items)
    finally:
        stored.close()
    assert len(_stored_ids(index)) == 13  # the stray is in the collection until the next writer
    report = build_index_json(cli, gallery, "-o", index)
    assert (report["added"], report["removed"], report["count"]) == (1, 1, 12)
    assert len(_stored_ids(index)) == 12  # the next writer cleaned up the stray


def test_unreachable_server_is_one_line_naming_it_and_writes_nothing(cli, gallery, rec, tmp_path):
    index = tmp_path / "index"
    result = cli("build-index", gallery, "-o", index, "--rec", rec, *MILVUS, "--uri", "http://127.0.0.1:9")
    assert result.exit_code == 2
    assert "cannot reach Milvus at http://127.0.0.1:9" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert not index.exists()
    for args, message in [(("--backend", "milvus"), "pass --index-backend milvus"),
                          (("--uri", "http://127.0.0.1:9"), "--uri and --collection are options of the milvus"),
                          ((*MILVUS, "--index-type", "ivfpq"), "not available on the milvus backend")]:
        bad = cli("build-index", gallery, "-o", index, "--rec", rec, *args)
        assert bad.exit_code == 2 and message in bad.stderr, bad.stderr
        assert not index.exists()
