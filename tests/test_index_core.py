"""The index core without the CLI: choosing a type, add/remove/search per type, id map round trip, update plans."""

from __future__ import annotations

import numpy as np
import pytest

from shitu_cli.errors import BadInput, ManifestError
from shitu_cli.index import backend
from shitu_cli.index.items import GalleryEntry, GalleryItem, id_map_text, parse_id_map, plan_update, select_for_removal


def _unit_vectors(n, dim=16, seed=0):
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _built(kind, n=120, dim=16, first_id=1000):
    choice = backend.choose_index(kind, n, dim=dim)
    vectors = _unit_vectors(n, dim)
    index = backend.new_index(choice, dim, training=vectors if kind in backend.IVF_TYPES else None)
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    backend.add(index, ids, vectors)
    return choice, index, ids, vectors


def test_auto_picks_flat_when_small_ivf_when_large_and_hnsw_only_without_removals():
    assert backend.choose_index("auto", 500).type == "flat"
    large = backend.choose_index("auto", 200_000)
    assert large.type == "ivf" and large.chosen_by == "auto"
    assert large.params["nlist"] == round(4 * np.sqrt(200_000))
    assert "200000 vectors" in large.reason
    assert backend.choose_index("auto", 200_000, removals_expected=False).type == "hnsw"
    assert backend.choose_index("auto", 500, removals_expected=False).type == "flat"


def test_ivf_lists_never_outnumber_what_kmeans_can_train():
    for n in (10, 1000, 30_000, 10**6):
        nlist = backend.ivf_nlist(n)
        assert 1 <= nlist <= max(1, n // backend.MIN_POINTS_PER_CENTROID)
        assert 1 <= backend.ivf_nprobe(nlist) <= nlist


def test_unknown_index_type_is_refused_with_choices():
    with pytest.raises(BadInput, match="unknown index type 'pq'.*ivfpq, opq-ivfpq"):
        backend.choose_index("pq", 10)


ALL_TYPES = ["flat", "ivf", "hnsw", "ivfpq", "opq-ivfpq"]


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_every_type_finds_each_vector_by_its_stable_id(kind):
    _, index, ids, vectors = _built(kind)
    scores, found = backend.search(index, vectors, 1)
    assert np.array_equal(found[:, 0], ids)
    # PQ types score on their 8-bit re-ranking codes: within a few thousandths of the exact product
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5 if "pq" not in kind else 0.01)


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_remove_keeps_the_other_ids_pointing_at_their_own_vectors(kind):
    # IndexIDMap2 over IVF mislabels results after faiss's own remove_ids; ours must not.
    choice, index, ids, vectors = _built(kind)
    doomed = ids[:40]
    index = backend.remove(index, choice, doomed)
    assert index.ntotal == len(ids) - 40
    _, found = backend.search(index, vectors[40:], 1)
    assert np.array_equal(found[:, 0], ids[40:])
    _, found = backend.search(index, vectors[:40], 5)
    assert not np.isin(found, doomed).any()


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_serialised_index_round_trips_vectors_and_ids(kind):
    choice, index, ids, vectors = _built(kind)
    again = backend.from_bytes(backend.to_bytes(index))
    backend.apply_search_params(again, choice)
    stored_ids, stored_vectors = backend.stored(again)
    assert np.array_equal(stored_ids, ids)
    # PQ types read vectors back from their 8-bit re-ranking codes: within a quantisation step
    np.testing.assert_allclose(stored_vectors, vectors, atol=1e-6 if "pq" not in kind else 0.02)
    if "pq" in kind:
        assert "Refine(SQ8)" in backend.factory_string(choice, 16) and "np" in backend.factory_string(choice, 16)


def test_ivf_needs_vectors_to_train_on():
    with pytest.raises(BadInput, match="needs at least"):
        backend.new_index(backend.IndexChoice("ivf", {"nlist": 8, "nprobe": 1}), 16, training=_unit_vectors(3))


def test_id_map_round_trips_unicode_labels_and_boxes(tmp_path):
    items = {7: GalleryItem("/g/红茶/1.jpg", "红茶 500ml", "ab" * 32), 2: GalleryItem("rel/2.jpg", "cola", None, [1.0, 2.0, 30.0, 40.0])}
    text = id_map_text(items)
    assert list(__import__("json").loads(text)) == ["2", "7"]
    assert parse_id_map(text, tmp_path / "id_map.json") == items


def test_malformed_id_map_names_the_file(tmp_path):
    with pytest.raises(ManifestError, match="id_map.json: id map is malformed"):
        parse_id_map('{"x": {"path": 1}}', tmp_path / "id_map.json")


def _entry(path, label, sha):
    return GalleryEntry(path, label, sha)


def test_sync_plan_adds_removes_reembeds_and_relabels():
    items = {1: GalleryItem("/g/a/1.jpg", "a", "s1"), 2: GalleryItem("/g/a/2.jpg", "a", "s2"),
             3: GalleryItem("/g/b/3.jpg", "b", "s3"), 4: GalleryItem("/g/b/4.jpg", "b", "s4")}
    entries = [_entry("/g/a/1.jpg", "a", "s1"),          # unchanged
               _entry("/g/a/2.jpg", "a", "s2-edited"),   # changed content
               _entry("/g/b/4.jpg", "c", "s4"),          # relabelled (list file moved it)
               _entry("/g/c/5.jpg", "c", "s5")]          # new; 3.jpg is gone
    plan = plan_update(items, entries, append=False)
    assert [e.path for e in plan.embed] == ["/g/a/2.jpg", "/g/c/5.jpg"]
    assert plan.replaced == [2] and plan.changed_paths == {"/g/a/2.jpg"}
    assert plan.remove == [3]
    assert plan.relabel == {4: "c"}
    assert plan.unchanged == 1


def test_append_plan_skips_content_already_indexed_or_repeated():
    items = {1: GalleryItem("/g/a/1.jpg", "a", "s1")}
    entries = [_entry("/new/copy-of-1.jpg", "a", "s1"), _entry("/new/2.jpg", "b", "s2"), _entry("/new/2-again.jpg", "b", "s2")]
    plan = plan_update(items, entries, append=True)
    assert [e.path for e in plan.embed] == ["/new/2.jpg"]
    assert [d.path for d in plan.duplicates] == ["/new/copy-of-1.jpg", "/new/2-again.jpg"]
    assert "same content as /g/a/1.jpg" in plan.duplicates[0].reason
    assert plan.remove == [] and plan.replaced == []


def test_removal_by_label_or_list_file(tmp_path):
    items = {1: GalleryItem((tmp_path / "a/1.jpg").as_posix(), "a"), 2: GalleryItem((tmp_path / "b/2.jpg").as_posix(), "b")}
    assert select_for_removal(items, "b")[0] == [2]
    listing = tmp_path / "drop.txt"
    listing.write_text("a/1.jpg\ta\n\n", encoding="utf-8")
    assert select_for_removal(items, str(listing))[0] == [1]
    with pytest.raises(BadInput, match="did you mean label 'a'"):
        select_for_removal(items, "A")


@pytest.mark.slow  # OPQ's rotation training on 10k vectors: ~35 s on 2 shared cores
def test_opq_needs_enough_vectors_to_train_its_rotation_else_builds_plain_ivfpq():
    small = backend.choose_index("opq-ivfpq", 5000, dim=16)
    assert small.type == "ivfpq" and "too few to train OPQ" in small.reason
    choice, index, ids, vectors = _built("opq-ivfpq", n=backend.OPQ_MIN_VECTORS, dim=16)
    assert choice.type == "opq-ivfpq" and backend.factory_string(choice, 16).startswith("OPQ2,IVF")
    _, found = backend.search(index, vectors[:200], 1)
    assert (found[:, 0] == ids[:200]).mean() >= 0.95  # untuned nprobe, 2 codes a vector: most, not all
