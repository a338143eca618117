"""build-index --tune-queries: the recall target measured on held-out query photos, not leave-one-out gallery vectors."""

from __future__ import annotations

import json

import numpy as np

from shitu_cli.index import backend
from shitu_cli.index.store import read_index_manifest
from synth import clustered_vectors, make_class_tree


def _new_photos(vectors, count, seed=1):
    rng = np.random.default_rng(seed)
    picked = vectors[rng.integers(0, len(vectors), count)]
    noisy = picked + 0.3 * rng.normal(size=picked.shape).astype(np.float32) / np.sqrt(vectors.shape[1])
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


def test_held_out_tuning_reaches_the_target_on_the_queries_as_exact_search_scores_them():
    vectors = clustered_vectors(4000)
    ids = np.arange(10, 4010, dtype=np.int64)
    choice = backend.choose_index("ivf", len(vectors), dim=32)
    index = backend.new_index(choice, 32, training=vectors)
    backend.add(index, ids, vectors)
    queries = _new_photos(vectors, 400)
    result = backend.tune_search(index, choice, ids, vectors, target=0.98, queries=queries)
    assert result.proxy == "held-out" and result.queries == 400 and result.reached
    assert "held-out queries" in result.as_text() and choice.params["tuned"]["proxy"] == "held-out"
    # checked independently of the tuning code: first results against numpy's exact best
    _, found = backend.search(index, queries, 1)
    exact = (queries @ vectors.T).max(axis=1)
    got = np.einsum("ij,ij->i", queries, vectors[found[:, 0] - 10])
    assert (got >= exact - 1e-5).mean() >= 0.98
    if result.value > 1:  # one step cheaper misses the target on these queries
        assert max(r for v, r in result.curve.items() if v < result.value) < 0.98
    loo = backend.tune_search(index, choice, ids, vectors, target=0.98)
    assert loo.proxy == "leave-one-out" and "leave-one-out queries" in loo.as_text()


def test_build_index_tunes_on_query_photos_and_names_bad_ones(cli, gallery, rec, tmp_path):
    queries = tmp_path / "queries"
    make_class_tree(queries, n_classes=4, per_class=6, size=64, seed=9)
    (queries / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "index"
    result = cli("build-index", gallery, "-o", out, "--rec", rec, "--index-type", "ivf", "--tune-queries", queries, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert any(s["path"].endswith("broken.jpg") and "--tune-queries" in s["reason"] for s in report["skipped"])
    tuned = read_index_manifest(out).index["params"]["tuned"]
    assert (tuned["proxy"], tuned["queries"]) == ("held-out", 24)
    assert "held-out queries" in result.stderr
    assert "tune_queries: " + queries.resolve().as_posix() in (out / "recipe.yaml").read_text(encoding="utf-8")
    replay = cli("reproduce", out, "-o", tmp_path / "replay", "--json")
    assert replay.exit_code == 0 and json.loads(replay.stdout)["identical"], replay.stderr + replay.stdout

    # an index built without them, re-run with them and nothing changed: re-tuned in place on the photos
    plain = tmp_path / "plain"
    assert cli("build-index", gallery, "-o", plain, "--rec", rec, "--index-type", "ivf").exit_code == 0
    assert read_index_manifest(plain).index["params"]["tuned"]["proxy"] == "leave-one-out"
    again = cli("build-index", gallery, "-o", plain, "--tune-queries", queries)
    assert again.exit_code == 0, again.stderr
    assert read_index_manifest(plain).index["params"]["tuned"]["proxy"] == "held-out"
    predicted = cli("predict", gallery, "--index", plain, "--json")
    assert predicted.exit_code == 0, predicted.stderr


def test_unusable_tune_queries_exit_2_before_anything_is_written(cli, gallery, rec, tmp_path):
    few = tmp_path / "few"
    make_class_tree(few, n_classes=2, per_class=3, size=64, seed=4)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(["--tune-queries", tmp_path / "missing"], "--tune-queries not found"),
             (["--tune-queries", empty], "has no images"),
             (["--tune-queries", few], "has 6 readable images"),
             (["--tune-queries", few, "--target-recall", "0"], "turns the tuning off")]
    for extra, message in cases:
        out = tmp_path / "never"
        result = cli("build-index", gallery, "-o", out, "--rec", rec, "--index-type", "ivf", *extra)
        assert result.exit_code == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not (out / "manifest.yaml").exists()


def test_merge_index_tunes_the_merged_index_on_query_photos(cli, gallery, rec, tmp_path):
    queries = tmp_path / "queries"
    make_class_tree(queries, n_classes=4, per_class=6, size=64, seed=9)
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, shard in enumerate(shards):
        assert cli("build-index", gallery, "-o", shard, "--rec", rec, "--shard", f"{i}/2").exit_code == 0
    merged = tmp_path / "merged"
    result = cli("merge-index", *shards, "-o", merged, "--index-type", "hnsw", "--tune-queries", queries)
    assert result.exit_code == 0, result.stderr
    tuned = read_index_manifest(merged).index["params"]["tuned"]
    assert (tuned["proxy"], tuned["queries"]) == ("held-out", 24)
    # the shards embedded whole images: a detector for the queries would crop them differently
    bad = cli("merge-index", *shards, "-o", tmp_path / "never", "--tune-queries", queries, "--det", rec)
    assert bad.exit_code == 2 and "embedded whole images" in bad.stderr and not (tmp_path / "never").exists()
