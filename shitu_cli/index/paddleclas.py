"""Importing an index built by PaddleClas (`vector.index` + pickled `id_map.pkl`), only when the user trusts the pickle.

The vectors are read back out of the faiss file, L2-normalised and re-indexed our way, so an
L2-metric or odd-typed PaddleClas index becomes an ordinary inner-product shitu index.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np

from shitu_cli.errors import BadInput
from shitu_cli.index import backend
from shitu_cli.index.build import BuildReport, IndexState, commit_state, write_build_recipe
from shitu_cli.index.items import GalleryItem
from shitu_cli.index.store import ModelRef, check_writable, index_exists, write_lock

PICKLE_NAME = "id_map.pkl"


def import_paddleclas(source: Path | str, out: Path | str, rec: Path | str | None, trust_pickle: bool = False,
                      index_type: str = "auto", removals_expected: bool | None = None) -> BuildReport:
    """Turn PaddleClas's `source` folder into a shitu index at `out` for the rec model `rec`."""
    started = time.perf_counter()
    source, out = Path(source), Path(out)
    _check_source(source, trust_pickle)
    if rec is None:
        raise BadInput("a PaddleClas index records no model", hint="name the rec model that built it with --rec MODEL_DIR")
    from shitu_cli.models.manifest import read_model_manifest

    model = read_model_manifest(Path(rec), task="rec")
    ids, vectors, notes = _read_vectors(source / "vector.index")
    if vectors.shape[1] != model.embedding_dim:
        raise BadInput(f"index vectors have dim {vectors.shape[1]} but the --rec model's embedding_dim is {model.embedding_dim}",
                       hint="pass the rec model that built this index", path=source / "vector.index")
    items = _items(_unpickle(source / PICKLE_NAME), ids, source)
    check_writable(out)
    if index_exists(out):
        raise BadInput("an index already exists here; import into a new folder", path=out)
    choice = backend.choose_index(index_type, len(ids), True if removals_expected is None else removals_expected)
    index = backend.new_index(choice, vectors.shape[1], training=vectors if choice.type == "ivf" else None)
    backend.add(index, ids, vectors)
    result = IndexState(index, items, choice, int(ids.max()) + 1 if len(ids) else 0,
                    ModelRef(Path(rec).resolve().as_posix(), model.model_hash, int(model.embedding_dim), model.arch))
    report = BuildReport(index_dir=out, action="imported", count=index.ntotal, added=index.ntotal, index=choice, notes=notes)
    with write_lock(out):
        report.files = commit_state(out, result, None, removals_expected, None)
    report.seconds = time.perf_counter() - started
    options = {"source": source.resolve().as_posix(), "out": out.resolve().as_posix(), "rec": Path(rec).resolve().as_posix(),
               "trust_pickle": trust_pickle, "index_type": index_type, "removals_expected": removals_expected}
    report.recipe = write_build_recipe(report, options, core="shitu_cli.index.paddleclas:import_paddleclas", command="build-index --import-paddleclas")
    return report


def _check_source(source: Path, trust_pickle: bool) -> None:
    if not (source / "vector.index").is_file():
        raise BadInput("no vector.index here; not a PaddleClas index folder", path=source)
    if not (source / PICKLE_NAME).is_file():
        raise BadInput(f"no {PICKLE_NAME} here; not a PaddleClas index folder", path=source)
    if not trust_pickle:
        raise BadInput(f"refusing to load {PICKLE_NAME}: unpickling runs any code the file contains",
                       hint="pass --trust-pickle only if you made this index or trust who did", path=source / PICKLE_NAME)


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle)  # the user passed --trust-pickle
    except Exception as exc:  # a pickle can raise anything
        raise BadInput(f"cannot unpickle ({exc.__class__.__name__}: {exc})", path=path) from None


def _read_vectors(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    faiss = backend.faiss_module()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise BadInput(f"faiss cannot read this index ({str(exc).splitlines()[0][:120]})", path=path) from None
    notes = []
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        inner = faiss.downcast_index(index.index)
    else:  # PaddleClas's android-demo builder writes a bare IndexFlatIP with ids 0..n-1
        ids, inner = np.arange(index.ntotal, dtype=np.int64), index
    try:
        ivf = faiss.extract_index_ivf(inner)
        ivf.make_direct_map()
    except RuntimeError:
        pass  # not IVF: flat and HNSW reconstruct without a direct map
    try:
        vectors = np.asarray(inner.reconstruct_n(0, inner.ntotal), dtype=np.float32)
    except RuntimeError as exc:
        raise BadInput(f"cannot read vectors back from this {type(inner).__name__} ({str(exc).splitlines()[0][:120]})", path=path) from None
    norms = np.linalg.norm(vectors, axis=1)
    if len(norms) and np.abs(norms - 1).max() > 1e-3:
        notes.append(f"PaddleClas vectors were not unit length (norms {norms.min():.3g}..{norms.max():.3g}); L2-normalised them")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        notes.append("PaddleClas index used L2 distance; imported as inner product on normalised vectors")
    from shitu_cli.infer.embedder import l2_normalise

    return ids, l2_normalise(vectors), notes


def _items(id_map: Any, ids: np.ndarray, source: Path) -> dict[int, GalleryItem]:
    if not isinstance(id_map, dict):
        raise BadInput(f"{PICKLE_NAME} holds a {type(id_map).__name__}, expected a dict of id -> 'path<TAB>label'", path=source)
    items = {}
    for item_id in ids.tolist():
        doc = id_map.get(item_id, id_map.get(str(item_id)))
        if not isinstance(doc, str):
            raise BadInput(f"{PICKLE_NAME} has no 'path<TAB>label' text for id {item_id}", path=source / PICKLE_NAME)
        items[int(item_id)] = GalleryItem(*_split_doc(doc))
    return items


def _split_doc(doc: str) -> tuple[str, str]:
    """PaddleClas stores the gallery list line: `path<TAB>label`, or `path label` in older lists."""
    doc = doc.strip()
    fields = doc.split("\t", 1) if "\t" in doc else doc.split(maxsplit=1)
    return (fields[0], fields[1]) if len(fields) == 2 else (fields[0], fields[0])
