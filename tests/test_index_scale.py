"""Galleries at scale: build-index --shard i/N + merge-index, the memory estimate said before building, and
nprobe / efSearch chosen by a measured recall target (recorded in the manifest, used by every search)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shitu_cli.errors import BadInput
from shitu_cli.index import backend, tuning
from shitu_cli.index.shards import in_shard, parse_shard
from shitu_cli.index.sizing import estimate_memory
from shitu_cli.index.store import load_index, read_index_manifest
from synth import clustered_vectors, make_class_tree
from tiny_rec import export_tiny_rec


@pytest.fixture
def gallery(tmp_path):
    root = tmp_path / "gallery"
    make_class_tree(root, n_classes=4, per_class=4, size=64, seed=2)
    return root


# ----------------------------------------------------------------------------- shards


def test_shards_split_a_gallery_exactly_once_the_same_on_any_mount(tmp_path):
    paths = [tmp_path / "g" / f"c{i % 5}" / f"{i}.jpg" for i in range(200)]
    moved = [tmp_path / "elsewhere" / p.relative_to(tmp_path / "g") for p in paths]
    owners = [[s for s in range(3) if in_shard(p, tmp_path / "g", {"index": s, "count": 3})] for p in paths]
    assert all(len(o) == 1 for o in owners)  # every file in exactly one shard
    assert all(len([p for p, o in zip(paths, owners) if o == [s]]) > 40 for s in range(3))  # roughly even
    assert owners == [[s for s in range(3) if in_shard(p, tmp_path / "elsewhere", {"index": s, "count": 3})] for p in moved]
    for bad in ("3/2", "2/2", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(BadInput, match="is not i/N"):
            parse_shard(bad)


def test_shards_build_anywhere_and_merge_into_one_index(cli, gallery, rec, tmp_path):
    shards = []
    for i in range(2):
        out = tmp_path / f"shard{i}"
        result = cli("build-index", gallery, "-o", out, "--rec", rec, "--shard", f"{i}/2", "--json")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["shard"]["index"] == i
        shards.append(out)
    counts = [read_index_manifest(s).count for s in shards]
    assert sum(counts) == 16 and min(counts) > 0
    paths = [set(item.path for item in load_index(s).items.values()) for s in shards]
    assert not paths[0] & paths[1]

    merged = tmp_path / "index"
    result = cli("merge-index", *shards, "-o", merged, "--index-type", "ivf", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["action"], report["count"], report["index"]["type"]) == ("merged", 16, "ivf")
    assert "memory estimate for 16 vectors as ivf" in result.stderr
    manifest = read_index_manifest(merged)
    assert manifest.shard is None and manifest.index["params"]["tuned"]["target_recall"] == 0.99
    predicted = cli("predict", gallery, "--index", merged, "--json")
    assert predicted.exit_code == 0, predicted.stderr
    images = json.loads(predicted.stdout)["images"]
    assert all(img["recognitions"][0]["label"] == img["path"].split("/")[-2] for img in images)
    assert "merge-index" in (merged / "recipe.yaml").read_text(encoding="utf-8")

    # merging shards of another model, a repeated shard, a non-shard, or into an existing index: exit 2, nothing written
    other = export_tiny_rec(tmp_path / "other", embedding_dim=64, seed=5)
    alien = tmp_path / "alien"
    assert cli("build-index", gallery, "-o", alien, "--rec", other, "--shard", "1/2").exit_code == 0
    for args, message in [((shards[0], alien), "shard was built with model hash"),
                          ((shards[0], shards[0]), "is shard 0/2 again"),
                          ((shards[0], merged), "is an index but not a shard"),
                          ((shards[1],), "already holds an index")]:
        out = merged if message == "already holds an index" else tmp_path / "never"
        bad = cli("merge-index", *args, "-o", out)
        assert bad.exit_code == 2 and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr and not (tmp_path / "never").exists()
    bad = cli("build-index", gallery, "-o", tmp_path / "never", "--rec", rec, "--shard", "3/2")
    assert bad.exit_code == 2 and "is not i/N" in bad.stderr and not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------- memory estimate


def test_memory_estimate_is_said_before_building_and_in_json(cli, gallery, rec, tmp_path):
    result = cli("build-index", gallery, "-o", tmp_path / "index", "--rec", rec, "--index-type", "ivfpq", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["memory"]["text"].startswith("memory estimate for 16 vectors as ivfpq")
    assert report["memory"]["text"] in result.stderr
    assert report["memory"]["index_bytes"] == estimate_memory("ivfpq", report["index"]["params"], 16, 64).index_bytes


def test_estimates_scale_with_vectors_and_pq_is_much_smaller_than_flat():
    flat = estimate_memory("flat", {}, 10**6, 512)
    assert flat.index_bytes == 10**6 * (512 * 4 + 64)  # floats plus IDMap2's id array and reverse map
    pq = backend.choose_index("ivfpq", 10**7, dim=512)
    ivfpq = estimate_memory("ivfpq", pq.params, 10**7, 512)
    assert ivfpq.per_vector_bytes < flat.per_vector_bytes / 3
    assert estimate_memory("ivfpq", pq.params, 2 * 10**7, 512).index_bytes > 1.9 * ivfpq.index_bytes
    assert backend.choose_index("auto", 3 * 10**6, dim=512).type == "ivfpq"
    assert backend.choose_index("auto", 3 * 10**6, dim=128).type == "ivf"  # 1.4 GiB of floats still fits


# ----------------------------------------------------------------------------- recall target


def test_leave_one_out_never_answers_a_query_with_itself():
    vectors = clustered_vectors(300)
    vectors[7] = vectors[3]  # an exact duplicate: the other copy is its exact best, at score 1
    rows = np.array([3, 7, 50])
    best, where = tuning.exact_neighbours(vectors, rows)
    assert list(where[:2]) == [7, 3] and np.allclose(best[:2], 1.0)
    assert where[2] != 50


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_tuning_takes_the_cheapest_setting_reaching_the_target_and_search_uses_it(kind):
    vectors = clustered_vectors(3000)
    ids = np.arange(100, 3100, dtype=np.int64)
    choice = backend.choose_index(kind, len(vectors), dim=32)
    index = backend.new_index(choice, 32, training=vectors if kind == "ivf" else None)
    backend.add(index, ids, vectors)
    result = backend.tune_search(index, choice, ids, vectors, target=0.97)
    param = "nprobe" if kind == "ivf" else "ef_search"
    assert result.reached and result.recall >= 0.97 and choice.params[param] == result.value
    assert all(recall < 0.97 for value, recall in result.curve.items() if value < result.value)
    assert choice.params["tuned"]["recall_at_1"] == round(result.recall, 4)
    again = backend.from_bytes(backend.to_bytes(index))
    backend.apply_search_params(again, choice)  # what load_index does with the manifest's params
    if kind == "ivf":
        assert backend.ivf_of(again).nprobe == result.value
    else:
        assert backend.faiss_module().downcast_index(again.index).hnsw.efSearch == result.value


def test_an_unreachable_target_keeps_the_best_setting_and_says_so():
    vectors = clustered_vectors(2000)
    ids = np.arange(len(vectors), dtype=np.int64)
    choice = backend.choose_index("ivfpq", len(vectors), dim=32)
    choice.params["k_factor"] = 1  # no re-ranking: PQ codes alone cannot rank exactly
    index = backend.new_index(choice, 32, training=vectors)
    backend.add(index, ids, vectors)
    result = backend.tune_search(index, choice, ids, vectors, target=1.0)
    assert not result.reached and "NOT reached" in result.as_text()
    assert result.recall == max(result.curve.values()) and choice.params["tuned"]["reached"] is False
