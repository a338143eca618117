"""`shitu build-index` end to end with a real (tiny, untrained) rec model: build, re-sync, append, remove, import."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

from index_cli import build_index_json, gallery_labels, predicted_labels
from synth import draw_object, write_rgb
from tiny_rec import export_tiny_rec

INDEX_TYPES = ["flat", "ivf", "hnsw"]


def _build(cli, gallery, index, *extra):
    return build_index_json(cli, gallery, "-o", index, *extra)


def _manifest(index):
    from shitu_cli.index.store import read_index_manifest

    return read_index_manifest(index)


def test_build_writes_a_self_describing_index(cli, gallery, rec, tmp_path):
    index = tmp_path / "index"
    result = cli("build-index", gallery, "-o", index, "--rec", rec)
    assert result.exit_code == 0, result.stderr
    assert "added" in result.stdout and "12" in result.stdout
    assert "index type: flat" in result.stdout and "exact search is fast enough" in result.stdout
    assert "img/s=" in result.stderr  # the progress bar shows the rate
    manifest = _manifest(index)
    assert (manifest.count, manifest.dim, manifest.metric) == (12, 64, "inner_product")
    assert manifest.index["type"] == "flat" and manifest.index["chosen_by"] == "auto"
    assert manifest.model.model_hash == __import__("shitu_cli.models.manifest", fromlist=["x"]).read_model_manifest(rec).model_hash
    assert manifest.model.embedding_dim == 64
    for name in ("vector.index", "id_map.json"):
        assert (index / manifest.files[name]["path"]).is_file()
    id_map = json.loads((index / manifest.files["id_map.json"]["path"]).read_text(encoding="utf-8"))
    assert {item["label"] for item in id_map.values()} == set(gallery_labels(gallery))
    assert all(len(item["sha256"]) == 64 for item in id_map.values())
    recipe = (index / "recipe.yaml").read_text(encoding="utf-8")
    assert "shitu_cli.index.build:build_index" in recipe and "manifest.yaml" in recipe


def test_list_file_gallery_with_relative_paths_and_spaces_in_labels(cli, gallery, rec, tmp_path):
    listing = gallery / "gallery.txt"
    rows = [f"{p.relative_to(gallery).as_posix()}\t{p.parent.name}" for p in sorted(gallery.rglob("*.jpg"))]
    listing.write_text("\n".join(rows) + "\nmissing/x.jpg\tghost\n", encoding="utf-8")
    report = _build(cli, listing, tmp_path / "index", "--rec", rec)
    assert report["count"] == 12
    assert [s["reason"] for s in report["skipped"]] == ["listed in gallery.txt but not found"]
    assert set(predicted_labels(cli, tmp_path / "index", gallery).values()) == set(gallery_labels(gallery))


def test_bad_images_are_skipped_and_reported_not_fatal(cli, gallery, rec, tmp_path):
    label = gallery_labels(gallery)[0]
    (gallery / label / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (gallery / "loose.jpg").write_bytes((gallery / label / "000.jpg").read_bytes())
    table = cli("build-index", gallery, "-o", tmp_path / "index", "--rec", rec)
    assert table.exit_code == 0, table.stderr
    assert "bad files skipped (2)" in table.stdout and "broken.jpg" in table.stdout
    report = _build(cli, gallery, tmp_path / "index2", "--rec", rec)
    reasons = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in report["skipped"]}
    assert reasons["loose.jpg"] == "not inside a label folder"
    assert "corrupt" in reasons["broken.jpg"] or "not an image" in reasons["broken.jpg"]
    assert report["count"] == 12


@pytest.mark.parametrize("kind", INDEX_TYPES)
def test_remove_by_label_and_list_then_append_back(cli, gallery, rec, tmp_path, kind):
    index = tmp_path / "index"
    first = _build(cli, gallery, index, "--rec", rec, "--index-type", kind)
    assert first["index"]["type"] == kind and first["count"] == 12
    gone = gallery_labels(gallery)[0]
    removed = cli("build-index", "-o", index, "--remove", gone, "--json")
    assert removed.exit_code == 0, removed.stderr
    assert json.loads(removed.stdout)["removed"] == 3
    if kind == "hnsw":
        assert "HNSW cannot remove in place: rebuilt" in removed.stderr
    assert gone not in set(predicted_labels(cli, index, gallery).values())

    listing = tmp_path / "drop.txt"
    victim = sorted((gallery / gallery_labels(gallery)[1]).glob("*.jpg"))[0]
    listing.write_text(f"{victim.relative_to(tmp_path).as_posix()}\n", encoding="utf-8")
    assert json.loads(cli("build-index", "-o", index, "--remove", listing, "--json").stdout)["removed"] == 1
    assert _manifest(index).count == 8

    again = _build(cli, gallery, index, "--append")
    assert (again["added"], len(again["duplicates"]), again["count"]) == (4, 8, 12)
    assert _manifest(index).index["type"] == kind  # an explicit type survives later runs
    predicted = predicted_labels(cli, index, gallery)
    assert all(label == path.split("/")[-2] for path, label in predicted.items())


@pytest.mark.parametrize("kind", INDEX_TYPES)
def test_rerun_on_a_changed_folder_syncs_the_index(cli, gallery, rec, tmp_path, kind):
    index = tmp_path / "index"
    _build(cli, gallery, index, "--rec", rec, "--index-type", kind)
    labels = gallery_labels(gallery)
    (gallery / labels[0] / "000.jpg").unlink()                                        # deleted
    write_rgb(gallery / labels[1] / "000.jpg", draw_object(labels[2], 64, np.random.default_rng(9)))  # changed
    write_rgb(gallery / labels[3] / "new.jpg", draw_object(labels[3], 64, np.random.default_rng(8)))   # added
    report = _build(cli, gallery, index)
    assert (report["added"], report["changed"], report["removed"], report["unchanged"]) == (1, 1, 1, 10)
    assert report["count"] == 12 and _manifest(index).count == 12
    table = cli("build-index", gallery, "-o", index)
    assert table.exit_code == 0 and "unchanged" in table.stdout
    assert _build(cli, gallery, index)["unchanged"] == 12
    predicted = predicted_labels(cli, index, gallery)
    assert all(label == path.split("/")[-2] for path, label in predicted.items())


def test_append_skips_exact_duplicates_even_under_new_names(cli, gallery, rec, tmp_path):
    index = tmp_path / "index"
    _build(cli, gallery, index, "--rec", rec)
    extra = tmp_path / "more"
    label = gallery_labels(gallery)[0]
    (extra / label).mkdir(parents=True)
    shutil.copy(gallery / label / "000.jpg", extra / label / "copy.jpg")
    write_rgb(extra / label / "fresh.jpg", draw_object(label, 64, np.random.default_rng(77)))
    report = _build(cli, extra, index, "--append")
    assert report["added"] == 1 and report["count"] == 13
    assert report["duplicates"][0]["path"].endswith("copy.jpg")
    assert "000.jpg" in report["duplicates"][0]["reason"]


def test_append_with_another_model_is_refused(cli, gallery, rec, tmp_path):
    other = export_tiny_rec(tmp_path / "other", embedding_dim=64, seed=3)
    index = tmp_path / "index"
    _build(cli, gallery, index, "--rec", rec)
    before = (index / "manifest.yaml").read_bytes()
    result = cli("build-index", gallery, "-o", index, "--rec", other, "--append")
    assert result.exit_code == 2
    assert "features of two models cannot be mixed" in result.stderr
    assert (index / "manifest.yaml").read_bytes() == before
    rebuilt = _build(cli, gallery, index, "--rec", other)  # without --append: re-embed everything
    assert rebuilt["action"] == "rebuilt" and rebuilt["count"] == 12


def test_bad_usage_is_one_line_exit_2(cli, gallery, rec, tmp_path):
    cases = [
        (("build-index", tmp_path / "nope", "-o", tmp_path / "i1", "--rec", rec), "gallery not found"),
        (("build-index", gallery, "-o", tmp_path / "i3", "--rec", rec, "--index-type", "pq"), "unknown index type"),
        (("build-index", "-o", tmp_path / "i4", "--remove", "x"), "no index here to remove from"),
        (("build-index", gallery, "-o", gallery, "--rec", rec), "not empty and holds no shitu index"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr
    assert not any((tmp_path / name).exists() for name in ("i1", "i3", "i4"))  # nothing half-made


def _paddleclas_index(folder, vectors, docs, metric="IP"):
    """What PaddleClas's build_gallery writes: IndexIDMap2(HNSW32) + pickled {id: 'path<TAB>label'}."""
    import faiss

    folder.mkdir(parents=True)
    kind = faiss.METRIC_INNER_PRODUCT if metric == "IP" else faiss.METRIC_L2
    index = faiss.IndexIDMap2(faiss.index_factory(vectors.shape[1], "HNSW32", kind))
    ids = np.arange(len(vectors), dtype=np.int64)
    index.add_with_ids(vectors, ids)
    faiss.write_index(index, str(folder / "vector.index"))
    with open(folder / "id_map.pkl", "wb") as handle:
        pickle.dump({int(i): doc for i, doc in zip(ids, docs)}, handle)


def test_paddleclas_import_needs_trust_pickle(cli, gallery, rec, tmp_path):
    from shitu_cli.infer.embedder import Embedder

    images = sorted(gallery.rglob("*.jpg"))
    from shitu_cli.data.images import read_image

    vectors = Embedder(rec).embed([read_image(p) for p in images]) * 3.0  # PaddleClas may store unnormalised features
    docs = [f"{p.relative_to(gallery).as_posix()}\t{p.parent.name}" for p in images]
    source = tmp_path / "ppcls_index"
    _paddleclas_index(source, vectors, docs, metric="L2")
    canary = tmp_path / "canary"

    refused = cli("build-index", "-o", tmp_path / "imported", "--import-paddleclas", source, "--rec", rec)
    assert refused.exit_code == 2
    assert "unpickling runs any code" in refused.stderr and "--trust-pickle" in refused.stderr
    assert not (tmp_path / "imported").exists() and not canary.exists()

    done = cli("build-index", "-o", tmp_path / "imported", "--import-paddleclas", source, "--rec", rec, "--trust-pickle", "--json")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["count"] == 12
    assert "L2-normalised" in done.stderr
    result = json.loads(cli("predict", images[4], "--index", tmp_path / "imported", "--json").stdout)
    top = result["images"][0]["recognitions"][0]
    assert top["label"] == images[4].parent.name and top["score"] == pytest.approx(1.0, abs=1e-4)
    assert top["matches"][0]["gallery_path"] == docs[4].split("\t")[0]


def test_pickle_is_never_loaded_without_the_flag(cli, rec, tmp_path):
    source = tmp_path / "evil"
    _paddleclas_index(source, np.eye(64, dtype=np.float32)[:2], ["a.jpg\ta", "b.jpg\tb"])
    canary = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    with open(source / "id_map.pkl", "wb") as handle:
        pickle.dump(Payload(), handle)
    result = cli("build-index", "-o", tmp_path / "out", "--import-paddleclas", source, "--rec", rec)
    assert result.exit_code == 2
    assert not canary.exists()
