"""`shitu build-index`: build, re-sync, append to or prune a gallery index (faiss, or Milvus by --index-backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from shitu_cli import render


def command(  # noqa: C901 (options only)
    gallery: Optional[Path] = typer.Argument(None, help="Folder with one subfolder per label, or a list file "
                                             "(`path<TAB>label`, or split-dataset's `path class_id` with labels.txt)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The index folder to create or update "
                                       "(default: ./index, where `shitu predict` looks)."),
    rec: Optional[str] = typer.Option(None, "--rec", help="Exported rec model dir or model name (default: the index's own "
                                      "model; for a new index `shitu config get rec`, else the official PP-ShiTuV2-rec "
                                      "if pulled, else the built-in demo recogniser)."),
    det: Optional[str] = typer.Option(None, "--det", help="Mainbody detector dir or name: index each image's main-object crop, not the whole image."),
    det_thresh: float = typer.Option(0.3, "--det-thresh", help="With --det: the score the main box needs; below it the whole image is used."),
    index_type: str = typer.Option("auto", "--index-type", help="auto, flat, hnsw, ivf, ivfpq or opq-ivfpq (inner product on "
                                   "L2-normalised features; auto: flat when small, IVF when large, IVF-PQ past 4 GiB of vectors)."),
    index_backend: Optional[str] = typer.Option(None, "--index-backend", help="faiss (a file in the index folder) or milvus "
                                                "(milvus-lite in INDEX_DIR/milvus.db, or the server given by --uri); "
                                                "default: the index's own, else faiss."),
    uri: Optional[str] = typer.Option(None, "--uri", help="With --index-backend milvus: a Milvus server (http://host:19530) "
                                      "or a milvus-lite path ending in .db."),
    token: Optional[str] = typer.Option(None, "--token", envvar="MILVUS_TOKEN", show_envvar=True,
                                        help="Milvus token (user:password or API key); never written to the index."),
    collection: Optional[str] = typer.Option(None, "--collection", help="Milvus collection name stem (default: shitu_ + the index folder's name)."),
    target_recall: float = typer.Option(0.99, "--target-recall", help="IVF/HNSW: the cheapest nprobe/efSearch whose measured "
                                        "recall@1 (vs exact search; on --tune-queries, else leave-one-out gallery images) reaches this; 0 keeps the size rule."),
    tune_queries: Optional[Path] = typer.Option(None, "--tune-queries", help="Query photos (a folder, or a list file such as split-dataset's val_list.txt) to "
                                                "measure --target-recall on: new photos of gallery products, not gallery images. "
                                                "Closer to real searches than leave-one-out; re-tunes an index updated in place too."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/N: index only shard i (from 0) of N of the gallery, by path "
                                        "hash, for `shitu merge-index`; run the N shards anywhere."),
    removals: Optional[bool] = typer.Option(
        None, "--removals/--no-removals",
        help="Whether items will be removed later; with --no-removals, auto may pick HNSW for large galleries."),
    append: bool = typer.Option(False, "--append", help="Only add images whose content is not indexed yet (no re-sync)."),
    remove: Optional[str] = typer.Option(None, "--remove", help="Remove items: a list file of paths, or a label name."),
    import_paddleclas: Optional[Path] = typer.Option(
        None, "--import-paddleclas", help="Import a PaddleClas index folder (vector.index + id_map.pkl); needs --trust-pickle."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow unpickling id_map.pkl (this runs code from the file)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per recognition batch."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for Paddle Inference and faiss."),
    mkldnn: bool = typer.Option(True, "--mkldnn/--no-mkldnn", help="Use oneDNN (3-5x faster on most CPUs)."),
    backend: str = typer.Option("auto", "--backend", help="paddle, onnxruntime, openvino, or auto: the fastest "
                                "backend measured on this CPU for this model (the first use times the backends that give "
                                "Paddle's outputs, a few seconds; `shitu benchmark-cpu` measures too), else paddle."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
) -> None:
    """Build or update a gallery index: re-running on a changed folder syncs it (added, removed, re-embedded)."""
    from shitu_cli.errors import BadInput
    from shitu_cli.models.registry import resolve_model_dir

    if backend in ("faiss", "milvus"):
        raise BadInput(f"--backend chooses the inference engine (paddle, onnxruntime, openvino, auto), not {backend!r}",
                       hint=f"pass --index-backend {backend}")
    if not 0 <= target_recall <= 1:
        raise BadInput(f"--target-recall {target_recall} is not between 0 and 1", hint="e.g. --target-recall 0.99")
    rec = resolve_model_dir(rec) if rec is not None else None
    det = resolve_model_dir(det) if det is not None else None
    if import_paddleclas is not None:
        from shitu_cli.index.paddleclas import import_paddleclas as run_import

        report = run_import(import_paddleclas, out, rec=rec, trust_pickle=trust_pickle, index_type=index_type,
                            removals_expected=removals)
    else:
        from shitu_cli.index import build_index

        from contextlib import nullcontext

        with render.progress("embedding", total=None) if gallery is not None else nullcontext() as bar:
            report = build_index(gallery, out, rec=rec, index_type=index_type, append=append, remove=remove,
                                 removals_expected=removals, batch_size=batch_size, threads=threads, mkldnn=mkldnn,
                                 progress=bar, det=det, det_thresh=det_thresh, predictor_backend=backend,
                                 index_backend=index_backend, uri=uri, token=token, collection=collection,
                                 target_recall=target_recall or None, shard=shard, notify=render.info,
                                 tune_queries=tune_queries)
    for note in report.notes:
        render.info(note)
    if json_output:
        render.print_json(report)
        return
    _show(report)


def show_report(report) -> None:
    """The tables of a build or merge report (merge-index shows the same)."""
    _show(report)


def _show(report) -> None:
    counts = [("added", report.added), ("changed", report.changed), ("removed", report.removed),
              ("unchanged", report.unchanged), ("duplicates skipped", len(report.duplicates)),
              ("bad files skipped", len(report.skipped)), ("in index", report.count)]
    render.show(render.table(f"index {report.action}: {report.index_dir}", ["items", "count"], counts))
    if report.index is not None:
        how = "auto" if report.index.chosen_by == "auto" else "chosen"
        params = ", ".join(f"{k}={v}" for k, v in report.index.params.items() if k != "tuned")
        render.show(f"index type: {report.index.type}{f' ({params})' if params else ''}, {how}: {report.index.reason}")
    if report.store and report.store.get("backend") == "milvus":
        render.show(f"vectors in Milvus at {report.store['uri']}, collection {report.store['collection']}")
    if report.images_per_s:
        render.show(f"embedded at {report.images_per_s:.1f} images/s")
    _show_skipped("bad files skipped", report.skipped)
    _show_skipped("duplicates skipped", report.duplicates)


def _show_skipped(title: str, rows) -> None:
    render.file_problems(f"{title} ({len(rows)})", [(s.path, s.reason) for s in rows])
