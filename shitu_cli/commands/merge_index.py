"""`shitu merge-index`: join the shard indexes of `shitu build-index --shard i/N` into one index."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from shitu_cli import render


def command(
    shards: List[Path] = typer.Argument(..., help="Shard index folders written by `shitu build-index GALLERY --shard i/N -o DIR`."),
    out: Path = typer.Option(..., "--out", "-o", help="The new index folder."),
    index_type: str = typer.Option("auto", "--index-type", help="auto, flat, hnsw, ivf, ivfpq or opq-ivfpq for the merged index."),
    index_backend: Optional[str] = typer.Option(None, "--index-backend", help="faiss (default) or milvus."),
    uri: Optional[str] = typer.Option(None, "--uri", help="With --index-backend milvus: server URI or milvus-lite .db path."),
    token: Optional[str] = typer.Option(None, "--token", envvar="MILVUS_TOKEN", show_envvar=True,
                                        help="Milvus token; never written to the index."),
    collection: Optional[str] = typer.Option(None, "--collection", help="Milvus collection name stem."),
    target_recall: float = typer.Option(0.99, "--target-recall", help="IVF/HNSW: the cheapest nprobe/efSearch reaching this recall@1; 0 keeps the size rule."),
    tune_queries: Optional[Path] = typer.Option(None, "--tune-queries", help="Query photos (folder or list file) to measure "
                                                "--target-recall on instead of leave-one-out gallery images; embedded with the shards' model."),
    det: Optional[str] = typer.Option(None, "--det", help="With --tune-queries: the detector the shards were built with (--det), to crop the photos the same."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for embedding --tune-queries."),
    removals: Optional[bool] = typer.Option(None, "--removals/--no-removals", help="Whether items will be removed later."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
) -> None:
    """Merge shard indexes (same model and settings, refused otherwise) into one searchable index."""
    from shitu_cli.commands.build_index import show_report
    from shitu_cli.index.shards import merge_index
    from shitu_cli.models.registry import resolve_model_dir

    report = merge_index(shards, out, index_type=index_type, index_backend=index_backend, uri=uri, token=token,
                         collection=collection, target_recall=target_recall or None, removals_expected=removals,
                         notify=render.info, tune_queries=tune_queries,
                         det=resolve_model_dir(det) if det is not None else None, threads=threads)
    for note in report.notes:
        render.info(note)
    if json_output:
        render.print_json(report)
        return
    show_report(report)
