"""`build_index`: create, re-sync, append to or shrink a gallery index; the library twin of `shitu build-index`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from shitu_cli.errors import BadInput, writing_to
import shitu_cli.index.backend as backend
from shitu_cli.index.backend import IndexChoice
from shitu_cli.index.items import GalleryItem, Skipped, hash_entries, plan_update, read_gallery, select_for_removal
from shitu_cli.infer.predictor import PredictorOptions
from shitu_cli.index.store import ModelRef, StoredIndex, check_writable, commit, index_exists, load_for_write, write_lock
from shitu_cli.index.stores import StoreSpec
from shitu_cli.index.update import apply_update, wanted_choice

CORE = "shitu_cli.index.build:build_index"
DEFAULT_INDEX_DIR = Path("index")  # in the current folder, where a bare `shitu predict` looks for it


@dataclass
class BuildReport:
    index_dir: Path
    action: str  # created | updated | rebuilt | removed | imported
    count: int
    added: int = 0
    changed: int = 0  # same path, new content (re-embedded) or new label
    removed: int = 0
    unchanged: int = 0
    duplicates: list[Skipped] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    index: IndexChoice | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float | None = None
    files: list[Path] = field(default_factory=list)
    recipe: Path | None = None
    memory: dict[str, Any] | None = None  # the estimate made before building (faiss), bytes and text
    store: dict[str, Any] | None = None  # where the vectors live: backend, uri (never a token), collection
    shard: dict[str, Any] | None = None


@dataclass
class IndexState:
    """A new index state, ready to commit."""

    index: Any
    items: dict[int, GalleryItem]
    choice: IndexChoice
    next_id: int
    model: ModelRef
    shard: dict[str, Any] | None = None


def build_index(
    gallery: Path | str | None,
    out: Path | str | None = None,
    rec: Path | str | None = None,
    index_type: str = "auto",
    append: bool = False,
    remove: str | None = None,
    removals_expected: bool | None = None,
    batch_size: int = 32,
    threads: int = 1,
    mkldnn: bool = True,
    progress: Callable[..., None] | None = None,
    det: Path | str | None = None,
    det_thresh: float = 0.3,
    predictor_backend: str = "auto",
    only: Sequence[Path] | None = None,
    index_backend: str | None = None,
    uri: str | None = None,
    token: str | None = None,
    collection: str | None = None,
    target_recall: float | None = 0.99,
    shard: str | None = None,
    notify: Callable[[str], None] | None = None,
    tune_queries: Path | str | None = None,
) -> BuildReport:
    """Make INDEX_DIR `out` hold GALLERY's images as `rec` embeds them.

    Without an index there, builds one. With one: re-syncs it to the gallery (new files
    added, deleted removed, changed re-embedded), or with `append` only adds content not
    indexed yet. `remove` (a list file of paths, or a label) drops items instead. With `det`
    (a mainbody detector), each image's main-object crop is embedded instead of the whole image.
    With `append`, `only` limits the work to these gallery files (the server's live adds: nothing
    else of a large gallery is hashed again).
    Without `out`, the index is ./index; without `rec`, the index's own model, else
    `default_rec_model()`. The report's notes say which were used.
    `index_backend` "milvus" keeps the vectors in Milvus (milvus-lite in INDEX_DIR/milvus.db, or the server at
    `uri`); default: the index's own backend, else faiss. IVF and HNSW get the cheapest nprobe / efSearch whose
    measured recall@1 reaches `target_recall` (None: keep the size rule). `shard` "i/N" indexes only shard i of N
    of the gallery (index.shards), for `merge_index`. `notify` hears the memory estimate before the build.
    `tune_queries` (a folder of query photos, or a list file) measures that recall on held-out photos instead of
    leave-one-out gallery vectors; the search setting is then re-chosen even when the index is updated in place.
    """
    from shitu_cli.index.shards import parse_shard

    started = time.perf_counter()
    _check_arguments(gallery, remove, append)
    check_tune_queries(tune_queries, target_recall, remove)
    shard_spec = parse_shard(shard) if shard is not None else None
    notes: list[str] = []
    out = _output_dir(out, gallery, notes)
    check_writable(out)
    with write_lock(out):
        current = load_for_write(out) if index_exists(out) else None
        store = StoreSpec.resolve(index_backend, uri, token, collection, current, out)
        try:
            if remove is not None:
                report, result = _remove(current, out, remove)
            else:
                rec = _rec_model(rec, current, notes)
                shard_spec = shard_spec or (current.manifest.shard if current else None)
                report, result = _update(current, Path(gallery), out, rec, index_type, append, removals_expected,
                                         batch_size, PredictorOptions(predictor_backend, threads, mkldnn), progress, det, det_thresh,
                                         only if append else None, store, target_recall, shard_spec, notify,
                                         tune_queries)
            with writing_to(out):
                report.files = commit_state(out, result, gallery, removals_expected, current)
        finally:
            store.close_all(current, locals().get("result"))
        report.count, report.index = result.index.ntotal, result.choice
        report.store, report.shard = store.record(result.index), result.shard
    report.notes[:0] = notes
    report.seconds = time.perf_counter() - started
    with writing_to(out):
        report.recipe = write_build_recipe(report, _recipe_options(gallery, out, rec, index_type, append, remove,
                                                                 removals_expected, batch_size, threads, mkldnn)
                                    | {"det": None if det is None else Path(det).resolve().as_posix(), "det_thresh": det_thresh,
                                       "predictor_backend": predictor_backend, "target_recall": target_recall, "shard": shard,
                                       "tune_queries": None if tune_queries is None else Path(tune_queries).resolve().as_posix()}
                                    | store.recipe_options())
    return report


def _output_dir(out: Path | str | None, gallery, notes: list[str]) -> Path:
    """`out`, else ./index; a defaulted ./index that holds another gallery's index is not silently re-synced."""
    if out is not None:
        return Path(out)
    out = DEFAULT_INDEX_DIR
    if out.exists() and not out.is_dir():
        raise BadInput("no -o given, and ./index, where the index would go, is a file", hint="pass -o INDEX_DIR",
                       path=out.resolve())
    if gallery is not None and index_exists(out):
        from shitu_cli.index.store import read_index_manifest

        indexed = read_index_manifest(out).gallery
        if indexed and indexed != Path(gallery).resolve().as_posix():
            raise BadInput(f"./index already holds the index of another gallery ({indexed})",
                           hint="pass -o NEW_FOLDER, or -o index to re-sync it to this gallery", path=out.resolve())
    notes.append(f"no -o given: the index is {out.resolve()} (`shitu predict` run here finds it)")
    return out


def _rec_model(rec: Path | str | None, current: StoredIndex | None, notes: list[str]) -> Path | str | None:
    """The rec model to embed with: `rec`, else the index's own (resolved later), else the default one."""
    if rec is not None or current is not None:
        return rec
    from shitu_cli.models.registry import default_rec_model

    chosen, why = default_rec_model()
    notes.append(f"no --rec given: embedding with {why}: {chosen}")
    return chosen


def _recipe_options(gallery, out, rec, index_type, append, remove, removals_expected, batch_size, threads, mkldnn) -> dict[str, Any]:
    as_text = lambda p: None if p is None else Path(p).resolve().as_posix()  # noqa: E731
    return {"gallery": as_text(gallery), "out": as_text(out), "rec": as_text(rec), "index_type": index_type,
            "append": append, "remove": remove, "removals_expected": removals_expected,
            "batch_size": batch_size, "threads": threads, "mkldnn": mkldnn}


def _check_arguments(gallery, remove, append) -> None:
    if remove is not None and gallery is not None:
        raise BadInput("pass either GALLERY (to build or update) or --remove, not both")
    if remove is None and gallery is None:
        raise BadInput("no GALLERY given", hint="shitu build-index GALLERY [-o INDEX_DIR] [--rec MODEL_DIR]")
    if remove is not None and append:
        raise BadInput("--append and --remove cannot be combined")


# ----------------------------------------------------------------------------- add / re-sync


def _update(current: StoredIndex | None, gallery: Path, out: Path, rec, index_type, append, removals_expected,
            batch_size, options, progress, det, det_thresh, only=None, store: StoreSpec | None = None,
            target_recall: float | None = None, shard: dict | None = None, notify=None,
            tune_queries: Path | None = None) -> tuple[BuildReport, IndexState]:
    from shitu_cli.index.shards import in_shard
    from shitu_cli.infer.embedder import Embedder

    store = store or StoreSpec()
    backend.choose_index(index_type, 0)  # refuse an unknown type before any work
    store.check_reachable()  # a wrong --uri fails now, not after the embedding
    pairs, skipped = read_gallery(gallery)
    if shard is not None:
        pairs = [(path, label) for path, label in pairs if in_shard(path, gallery, shard)]
        index_type = "flat"  # a shard is exact; merge-index chooses the final type for the whole gallery
        shard = {"index": shard["index"], "count": shard["count"], "det": None if det is None else Path(det).name,
                 "det_thresh": det_thresh if det is not None else None}
    if only is not None:
        wanted = {Path(p).resolve() for p in only}
        pairs = [(path, label) for path, label in pairs if path in wanted]
    model_dir = Path(rec) if rec is not None else _model_of(current)
    embedder = Embedder(model_dir, options, batch_size=batch_size)
    main_object = _main_object(det, det_thresh, options)
    notes: list[str] = []
    items, same_model = _comparable_items(current, embedder, append, notes)
    entries, unreadable = hash_entries(pairs)
    plan = plan_update(items, entries, append)
    memory = _announce_estimate(current, index_type, removals_expected, len(items) - len(plan.remove) - len(plan.replaced)
                                + len(plan.embed), embedder.dim, store, notify)

    if progress is not None and hasattr(progress, "set_total"):
        progress.set_total(len(plan.embed))
    backend.set_threads(options.threads)
    embed_started = time.perf_counter()
    positions, vectors, failures, boxes = embedder.embed_files([e.path for e in plan.embed], progress, main_object=main_object)
    rate = len(plan.embed) / (time.perf_counter() - embed_started) if plan.embed else None
    query_vectors, query_skipped = _tune_query_vectors(tune_queries, target_recall, embedder, main_object)

    next_id = current.manifest.next_id if current else 0
    new_ids = np.arange(next_id, next_id + len(positions), dtype=np.int64)
    new_items = {int(i): GalleryItem(plan.embed[p].path, plan.embed[p].label, plan.embed[p].sha256, box)
                 for i, p, box in zip(new_ids, positions, boxes)}
    drop = sorted(set(plan.remove) | set(plan.replaced) | (set(current.items) - set(items) if current else set()))
    final_count = len(items) - len(set(drop) & set(items)) + len(new_items)
    if final_count == 0:
        raise BadInput("no gallery image could be embedded, so there is nothing to index", path=gallery)

    wanted = wanted_choice(current, index_type, final_count, removals_expected, notes, store, embedder.dim)
    index, choice = apply_update(current if same_model and store.same_as(current) else None, wanted, drop, new_ids, vectors,
                           final_count, notes, embedder.dim, store, target_recall, query_vectors)
    kept = {i: item for i, item in items.items() if i not in set(drop)}
    for item_id, label in plan.relabel.items():
        kept[item_id].label = label
    model = ModelRef(model_dir.resolve().as_posix(), embedder.model_hash, embedder.dim, embedder.manifest.arch)
    changed = sum(1 for p in positions if plan.embed[p].path in plan.changed_paths)
    report = BuildReport(
        index_dir=out, action=_action(current, notes), count=final_count, added=len(new_items) - changed,
        changed=changed + len(plan.relabel), removed=len(drop) - len(plan.replaced),
        unchanged=plan.unchanged, duplicates=plan.duplicates,
        skipped=skipped + unreadable + [Skipped(f.path, f.reason) for f in failures] + query_skipped, notes=notes,
        images_per_s=rate,
        memory=memory,
    )
    return report, IndexState(index, {**kept, **new_items}, choice, int(next_id + len(positions)), model, shard)


def check_tune_queries(source, target_recall, remove) -> None:
    """Refuse a --tune-queries that cannot be used before any embedding starts."""
    if source is None:
        return
    if target_recall is None or remove is not None:
        what = "--target-recall 0 turns the tuning off" if target_recall is None else "--remove does not re-tune"
        raise BadInput(f"--tune-queries measures a recall target, but {what}", hint="drop one of them", path=source)
    from shitu_cli.index.tune_queries import query_paths

    query_paths(Path(source))


def _tune_query_vectors(source, target_recall, embedder, main_object) -> tuple[np.ndarray | None, list[Skipped]]:
    if source is None:
        return None, []
    from shitu_cli.index.tune_queries import embed_queries

    return embed_queries(Path(source), embedder, main_object)


def _announce_estimate(current, index_type, removals_expected, count, dim, store: StoreSpec, notify) -> dict | None:
    """The memory the index will take, said (through `notify`) before any embedding or building starts."""
    from shitu_cli.index.sizing import estimate_memory

    if store.backend == "milvus":
        return None  # Milvus holds the vectors; its own sizing applies
    choice = wanted_choice(current, index_type, max(1, count), removals_expected, [], store, dim)
    estimate = estimate_memory(choice.type, choice.params, count, dim)
    text = f"memory estimate for {count} vectors as {choice.type}: {estimate.as_text()}"
    if notify is not None:
        notify(text)
    return {"index_bytes": estimate.index_bytes, "build_peak_bytes": estimate.build_peak_bytes, "text": text}


def _main_object(det, det_thresh: float, options):
    """The gallery cropper for `--det`: the detector's best box, or the whole image when it finds none."""
    if det is None:
        return None
    from shitu_cli.infer.detector import Detector
    from shitu_cli.infer.pipeline import main_object_crop

    return main_object_crop(Detector(det, options), det_thresh)


def _model_of(current: StoredIndex | None) -> Path:
    if current is None:
        raise BadInput("no --rec model given", hint="pass --rec MODEL_DIR (an exported rec model, e.g. runs/rec/export)")
    return Path(current.manifest.model.dir)


def _comparable_items(current: StoredIndex | None, embedder, append: bool, notes: list[str]) -> tuple[dict[int, GalleryItem], bool]:
    """The current items whose vectors the new model's features can be compared with, and whether that is all of them."""
    if current is None:
        return {}, False
    indexed = current.manifest.model
    if indexed.model_hash == embedder.model_hash and indexed.embedding_dim == embedder.dim:
        return dict(current.items), True
    if append:
        raise BadInput(
            f"--rec model (hash {str(embedder.model_hash)[:12]}, dim {embedder.dim}) is not the model this index was built with "
            f"(hash {str(indexed.model_hash)[:12]}, dim {indexed.embedding_dim}); features of two models cannot be mixed",
            hint="drop --append to re-embed the whole gallery with the new model, or pass the index's own model",
            path=current.dir)
    notes.append(f"the rec model changed: every image is re-embedded (was {str(indexed.model_hash)[:12]})")
    return {}, False


def _action(current, notes) -> str:
    if current is None:
        return "created"
    return "rebuilt" if any(n.startswith(("the rec model changed", "rebuilt")) for n in notes) else "updated"


# ----------------------------------------------------------------------------- remove


def _remove(current: StoredIndex | None, out: Path, what: str) -> tuple[BuildReport, IndexState]:
    if current is None:
        raise BadInput("there is no index here to remove from", hint="build one first with `shitu build-index GALLERY -o ...`", path=out)
    ids, described = select_for_removal(current.items, what)
    if not ids:
        raise BadInput(f"none of the {described} is in the index", hint="paths must match the indexed files", path=what)
    choice = current.manifest.choice
    notes = []
    if choice.type == "hnsw":
        notes.append(f"HNSW cannot remove in place: rebuilt it from its {current.index.ntotal - len(ids)} stored vectors")
    index = backend.remove(current.index, choice, np.array(ids, dtype=np.int64))
    items = {i: item for i, item in current.items.items() if i not in set(ids)}
    report = BuildReport(index_dir=out, action="removed", count=index.ntotal, removed=len(ids),
                         unchanged=len(items), notes=notes)
    return report, IndexState(index, items, choice, current.manifest.next_id, current.manifest.model, current.manifest.shard)


# ----------------------------------------------------------------------------- writing


def commit_state(out: Path, result: IndexState, gallery, removals_expected, current: StoredIndex | None) -> list[Path]:
    from dataclasses import asdict

    from shitu_cli.recipes import package_versions

    index_fields = asdict(result.choice)
    if removals_expected is None:
        removals_expected = current.manifest.index.get("removals_expected", True) if current else True
    index_fields["removals_expected"] = bool(removals_expected)
    gallery_text = Path(gallery).resolve().as_posix() if gallery is not None else (current.manifest.gallery if current else None)
    fields = {"next_id": result.next_id, "index": index_fields, "model": result.model,
              "gallery": gallery_text, "created_by": package_versions(), "shard": result.shard}
    _, written = commit(out, result.index, result.items, fields)
    return written


def write_build_recipe(report: BuildReport, options: dict[str, Any], core: str = CORE, command: str = "build-index") -> Path:
    from shitu_cli.recipes import Recipe, write_recipe

    metrics = {"count": report.count, "added": report.added, "changed": report.changed, "removed": report.removed,
               "unchanged": report.unchanged, "skipped": len(report.skipped), "duplicates": len(report.duplicates),
               "index_type": report.index.type if report.index else None}
    recipe = Recipe(command=command, core=core, options=options, metrics=metrics)
    return write_recipe(report.index_dir, recipe, report.files)
