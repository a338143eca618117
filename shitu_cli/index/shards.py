"""Building one gallery's index on many machines: `build-index --shard i/N` embeds the images whose path hashes
to shard i, and `merge_index` joins the shard indexes into one (the library twin of `shitu merge-index`).

A file's shard is sha256(its path relative to the gallery root) mod N: the same on every machine whatever the
mount point, so any scheduler can run the N shards anywhere and each image is embedded exactly once.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from shitu_cli.errors import BadInput, writing_to

SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
MERGE_CORE = "shitu_cli.index.shards:merge_index"
# What every shard of one index must share, by the name a user sees in the error.
SETTINGS = ("model hash", "embedding dim", "metric", "shard count", "det", "det_thresh")


def parse_shard(text: str) -> dict[str, Any]:
    match = SHARD_RE.match(str(text))
    if not match or not (0 <= int(match.group(1)) < int(match.group(2))):
        raise BadInput(f"--shard {text!r} is not i/N with 0 <= i < N",
                       hint="e.g. --shard 0/4 ... --shard 3/4 for four shards (i counts from 0)")
    return {"index": int(match.group(1)), "count": int(match.group(2))}


def shard_key(path: Path, gallery: Path) -> str:
    root = Path(gallery).resolve()
    root = root.parent if root.is_file() else root  # a list file: paths count from its folder
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def in_shard(path: Path, gallery: Path, shard: dict[str, Any]) -> bool:
    digest = hashlib.sha256(shard_key(path, gallery).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % int(shard["count"]) == int(shard["index"])


def _settings(manifest) -> dict[str, Any]:
    shard = manifest.shard or {}
    return dict(zip(SETTINGS, (manifest.model.model_hash, manifest.model.embedding_dim, manifest.metric,
                               shard.get("count"), shard.get("det"), shard.get("det_thresh"))))


def check_shards(shard_dirs: Sequence[Path]) -> tuple[list, list[str]]:
    """The shards' manifests, refusing a folder that is no shard, a repeated shard, or other settings."""
    from shitu_cli.index.store import read_index_manifest

    if not shard_dirs:
        raise BadInput("no shard folders given", hint="shitu merge-index SHARD_DIR... -o INDEX_DIR")
    manifests = []
    for folder in shard_dirs:
        manifest = read_index_manifest(Path(folder))
        if manifest.shard is None:
            raise BadInput("is an index but not a shard", hint="build shards with `shitu build-index GALLERY --shard i/N`",
                           path=folder)
        manifests.append(manifest)
    first, seen = _settings(manifests[0]), {}
    for folder, manifest in zip(shard_dirs, manifests):
        for name, value in _settings(manifest).items():
            if value != first[name]:
                raise BadInput(f"shard was built with {name} {value!r}, but {shard_dirs[0]} with {first[name]!r}",
                               hint="build every shard with the same model and settings", path=folder)
        number = manifest.shard["index"]
        if number in seen:
            raise BadInput(f"is shard {number}/{first['shard count']} again (also {seen[number]})", path=folder)
        seen[number] = folder
    missing = sorted(set(range(int(first["shard count"]))) - set(seen))
    notes = [f"shards {', '.join(map(str, missing))} of {first['shard count']} are missing: their images are not in "
             "the merged index (a later `shitu build-index GALLERY -o INDEX` syncs them in)"] if missing else []
    return manifests, notes


def merge_index(shard_dirs: Sequence[Path | str], out: Path | str, index_type: str = "auto",
                index_backend: str | None = None, uri: str | None = None, token: str | None = None,
                collection: str | None = None, target_recall: float | None = 0.99, removals_expected: bool | None = None,
                notify: Callable[[str], None] | None = None, tune_queries: Path | str | None = None,
                det: Path | str | None = None, threads: int = 1):
    """Join shard indexes (from `build_index(..., shard="i/N")`) into one new index at `out`.

    `tune_queries` measures the recall target on held-out query photos (as `build_index`'s), embedded with the
    shards' model; `det` must then be the detector the shards cropped with, if any."""
    from shitu_cli.index.build import BuildReport, IndexState, _announce_estimate, commit_state
    from shitu_cli.index.update import apply_update, wanted_choice
    from shitu_cli.index.build import write_build_recipe
    from shitu_cli.index.store import check_writable, index_exists, load_index, write_lock
    from shitu_cli.index.stores import StoreSpec

    started = time.perf_counter()
    shard_dirs = [Path(p) for p in shard_dirs]
    out = Path(out)
    manifests, notes = check_shards(shard_dirs)
    _check_query_cropping(manifests[0], tune_queries, det, target_recall)
    if index_exists(out):
        raise BadInput("already holds an index; merge-index writes a new one", hint="pass a new -o folder", path=out)
    check_writable(out)
    with write_lock(out):
        store = StoreSpec.resolve(index_backend, uri, token, collection, None, out)
        store.check_reachable()
        ids, vectors, items = _gather(shard_dirs, load_index)
        dim = manifests[0].model.embedding_dim
        _announce_estimate(None, index_type, removals_expected, len(ids), dim, store, notify)
        queries, skipped = _query_vectors(manifests[0], tune_queries, det, threads)
        try:
            wanted = wanted_choice(None, index_type, len(ids), removals_expected, notes, store, dim)
            index, choice = apply_update(None, wanted, [], ids, vectors, len(ids), notes, dim, store, target_recall,
                                         queries)
            model = manifests[0].model
            result = IndexState(index, items, choice, len(ids), model, None)
            with writing_to(out):
                files = commit_state(out, result, manifests[0].gallery, removals_expected, None)
        finally:
            store.close_all(None, locals().get("result"))
    report = BuildReport(index_dir=out, action="merged", count=len(ids), added=len(ids), index=choice, notes=notes,
                         files=files, store=store.record(index), skipped=skipped)
    report.seconds = time.perf_counter() - started
    options = {"shard_dirs": [p.resolve().as_posix() for p in shard_dirs], "out": out.resolve().as_posix(),
               "index_type": index_type, "target_recall": target_recall, "removals_expected": removals_expected,
               "tune_queries": None if tune_queries is None else Path(tune_queries).resolve().as_posix(),
               "det": None if det is None else Path(det).resolve().as_posix(),
               **store.recipe_options()}
    with writing_to(out):
        report.recipe = write_build_recipe(report, options, core=MERGE_CORE, command="merge-index")
    return report


def _check_query_cropping(manifest, tune_queries, det, target_recall) -> None:
    """Query photos must be cropped as the shards' gallery images were: same detector, or none."""
    if tune_queries is None:
        if det is not None:
            raise BadInput("--det only crops --tune-queries photos; none were given", hint="drop --det")
        return
    from shitu_cli.index.build import check_tune_queries

    check_tune_queries(tune_queries, target_recall, None)
    used = manifest.shard.get("det")
    if used is not None and (det is None or Path(det).name != used):
        raise BadInput(f"the shards cropped their images with detector {used!r}; --tune-queries photos must be "
                       "cropped the same", hint=f"pass --det {used} (its folder)", path=tune_queries)
    if used is None and det is not None:
        raise BadInput("the shards embedded whole images; --det would crop the query photos differently",
                       hint="drop --det", path=tune_queries)


def _query_vectors(manifest, tune_queries, det, threads: int):
    if tune_queries is None:
        return None, []
    from shitu_cli.index.build import _main_object
    from shitu_cli.index.tune_queries import embed_queries
    from shitu_cli.infer.embedder import Embedder
    from shitu_cli.infer.predictor import PredictorOptions

    options = PredictorOptions("auto", threads)
    main_object = _main_object(det, manifest.shard.get("det_thresh") or 0.3, options)
    return embed_queries(Path(tune_queries), Embedder(Path(manifest.model.dir), options), main_object)


def _gather(shard_dirs: Sequence[Path], load_index) -> tuple[np.ndarray, np.ndarray, dict]:
    """Every shard's (vector, item), renumbered 0..n-1 in shard order."""
    from shitu_cli.index import backend

    all_vectors, items = [], {}
    for folder in shard_dirs:
        stored = load_index(folder)
        try:
            ids, vectors = backend.stored(stored.index)
        finally:
            stored.close()
        for item_id in ids:
            items[len(items)] = stored.items[int(item_id)]
        all_vectors.append(vectors)
    vectors = np.concatenate(all_vectors) if all_vectors else np.zeros((0, 1), np.float32)
    return np.arange(len(items), dtype=np.int64), vectors, items
