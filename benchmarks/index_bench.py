"""Index benchmark: build time, memory, single-query latency (p50/p99) and recall@1 against exact search, for
each index type shitu builds (faiss flat / IVF / IVF-PQ / OPQ+IVF-PQ / HNSW, and milvus-lite), on synthetic
512-d gallery vectors.

Run: nice .venv/bin/python benchmarks/index_bench.py [--sizes 100000,1000000] [--types flat,ivf,...]
Each (size, type) is measured in its own child process (so its peak memory is its own) and appended to
benchmarks/index_bench.jsonl as it finishes; the markdown is rendered from every row of this run.
It is a measurement, not a test: tens of minutes at 1M on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from shitu_cli.index.tuning import exact_best  # the best score over the gallery, per query

DIM = 512
QUERIES = 300
TYPES = ("flat", "ivf", "ivfpq", "opq-ivfpq", "hnsw", "milvus-ivf", "milvus-hnsw")
HERE = Path(__file__).resolve().parent


CATEGORIES = 0  # --categories: 0 = product centres independent at random; K = products drawn around K category centres
TUNE_ON = "leave-one-out"  # --tune-on held-out: --target-recall measured on 500 other noisy queries (seed 2), as
# `build-index --tune-queries` measures on a user's own query photos; never the queries that are timed
TUNE_QUERIES = 500
QUERY_MODEL = "perturbed"  # --query-model: how held-out queries are drawn (query_vectors says)


def product_centres(n: int, dim: int = DIM, seed: int = 0) -> tuple[np.ndarray, np.random.Generator]:
    """The n/10 product centres of gallery_vectors(n), and its random generator where the photos' draws begin.
    With CATEGORIES, the centres cluster around that many category centres (as real embeddings do: shoes near
    shoes); without, any two products are equally unrelated."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 10), dim)).astype(np.float32)
    if CATEGORIES:
        categories = rng.normal(size=(CATEGORIES, dim)).astype(np.float32)
        centres = categories[rng.integers(0, CATEGORIES, len(centres))] + 0.7 * centres
    return centres, rng


def photos_of(centres: np.ndarray, products: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One photo of each listed product: its centre plus photo noise, L2-normalised."""
    chunk = centres[products] + 0.6 * rng.normal(size=(len(products), centres.shape[1])).astype(np.float32)
    return chunk / np.linalg.norm(chunk, axis=1, keepdims=True)


def gallery_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Clustered like a product gallery (several photos per product), not uniform noise: n/10 product centres,
    each photo a noisy copy of its centre. Built in chunks (1M x 512 is 2 GiB)."""
    centres, rng = product_centres(n, dim, seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        rows = min(100_000, n - start)
        out[start:start + rows] = photos_of(centres, rng.integers(0, len(centres), rows), rng)
    return out


def query_vectors(gallery: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """Held-out queries, not in the gallery. QUERY_MODEL "perturbed": a gallery vector plus noise about half
    its length (a near-copy of one gallery photo, whose own IVF list usually holds the answer); "new-photo": a
    fresh photo of a gallery product, drawn exactly as the gallery's photos were (its nearest gallery vectors
    are the product's other photos, as in leave-one-out)."""
    rng = np.random.default_rng(seed)
    if QUERY_MODEL == "new-photo":
        centres, _ = product_centres(len(gallery), gallery.shape[1])
        return photos_of(centres, rng.integers(0, len(centres), count), rng).astype(np.float32)
    picked = gallery[rng.integers(0, len(gallery), count)]
    queries = picked + 0.5 * rng.normal(size=picked.shape).astype(np.float32) / np.sqrt(gallery.shape[1])
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak measured after is the build's own."""
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
        handle.write("5")


def _build_faiss(kind: str, vectors: np.ndarray, target: float):
    from shitu_cli.index import backend

    choice = backend.choose_index(kind, len(vectors), dim=vectors.shape[1])
    index = backend.new_index(choice, vectors.shape[1], training=vectors if kind != "hnsw" else None)
    ids = np.arange(len(vectors), dtype=np.int64)
    backend.add(index, ids, vectors)
    return index, choice, ids


def _build_milvus(kind: str, vectors: np.ndarray, target: float, workdir: Path):
    from shitu_cli.index import backend
    from shitu_cli.index.milvus import MilvusVectors

    choice = backend.choose_index(kind.split("-", 1)[1], len(vectors), dim=vectors.shape[1])
    store = MilvusVectors.create(str(workdir / "bench.db"), None, "bench", 1, vectors.shape[1], choice)
    ids = np.arange(len(vectors), dtype=np.int64)
    store.add(ids, vectors)
    store.before_commit()  # flush, as a build does before its manifest names the vectors
    # milvus-lite builds segment indexes in the background: the build is done when none is pending
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        info = store.client.describe_index(store.collection, "vector")
        if int(info.get("pending_index_rows", 0)) == 0:
            break
        time.sleep(1)
    return store, choice, ids


def measure_one(kind: str, n: int, target: float, build_threads: int, workdir: Path,
                keep_dir: Path | None = None) -> dict:
    """Runs in a child process: build, tune, then time single queries on one thread."""
    from shitu_cli.index import backend
    from shitu_cli.index.sizing import estimate_memory

    vectors = gallery_vectors(n)
    queries = query_vectors(vectors, QUERIES)
    best = exact_best(vectors, queries)
    base_rss = rss_mib()
    load_start = os.getloadavg()[0]
    reset_peak_rss()
    backend.set_threads(build_threads)
    started = time.perf_counter()
    if kind.startswith("milvus"):
        index, choice, ids = _build_milvus(kind, vectors, target, workdir)
    else:
        index, choice, ids = _build_faiss(kind, vectors, target)
    build_s = time.perf_counter() - started
    tune_queries = query_vectors(vectors, TUNE_QUERIES, seed=2) if TUNE_ON == "held-out" else None
    tuned = backend.tune_search(index, choice, ids, vectors, target, queries=tune_queries) if kind != "flat" else None
    tune_s = time.perf_counter() - started - build_s
    peak = rss_mib("VmHWM")
    if keep_dir is not None and not kind.startswith("milvus"):
        save_built(index, choice, keep_dir / f"{kind}-{n}", build_s, tune_s, tuned)
    p50, p99, recall = time_queries(index, queries, vectors, best)
    sweep = sweep_settings(index, choice, tuned, queries, vectors, best) if tuned and not kind.startswith("milvus") else {}
    estimate = estimate_memory(choice.type, choice.params, n, vectors.shape[1]) if not kind.startswith("milvus") else None
    shown = {k: v for k, v in choice.params.items() if k not in ("tuned",)}
    return {"n": n, "type": kind, "categories": CATEGORIES, "tune_on": TUNE_ON, "queries": len(queries),
            "query_model": QUERY_MODEL, "params": shown, "build_s": build_s, "tune_s": tune_s,
            "tuned": tuned.as_text() if tuned else None, "tune_recall": tuned.recall if tuned else None,
            "p50_ms": p50, "p99_ms": p99,
            "recall_at_1": recall, "peak_over_data_mib": peak - base_rss, "base_rss_mib": base_rss,
            "estimate_mib": estimate.index_bytes / 2**20 if estimate else None,
            "load_start": load_start, "load_end": os.getloadavg()[0], "sweep": sweep}


def time_queries(index, queries: np.ndarray, vectors: np.ndarray, best: np.ndarray) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, recall@1) of single k=1 queries on one thread, as `shitu predict` searches."""
    from shitu_cli.index import backend

    backend.set_threads(1)
    latencies, firsts = [], []
    for query in queries:
        tick = time.perf_counter()
        _, found = backend.search(index, query[None, :], 1)
        latencies.append(time.perf_counter() - tick)
        firsts.append(int(found[0, 0]))
    true_scores = np.einsum("ij,ij->i", queries, vectors[np.array(firsts)])
    recall = float((true_scores >= best - 1e-5).mean())
    return 1000 * float(np.median(latencies)), 1000 * float(np.percentile(latencies, 99)), recall


def sweep_settings(index, choice, tuned, queries: np.ndarray, vectors: np.ndarray, best: np.ndarray) -> dict:
    """Held-out p50/p99/recall@1 at each setting the tuning tried and a few above it: where the held-out
    queries (new photos) reach the target, beside where the leave-one-out proxy did."""
    from shitu_cli.index import backend, tuning

    chosen = int(choice.params[tuned.param])
    values = [v for v in tuning.candidate_values(tuned.param, 10**9) if v <= 4 * chosen]
    out = {}
    for value in values:
        choice.params[tuned.param] = value
        backend.apply_search_params(index, choice)
        out[value] = time_queries(index, queries, vectors, best)
    choice.params[tuned.param] = chosen
    backend.apply_search_params(index, choice)
    return out


def save_built(index, choice, stem: Path, build_s: float, tune_s: float, tuned) -> None:
    """Keep a built faiss index (and its tuned params) so its search can be re-measured on a quieter machine."""
    import faiss

    stem.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(stem.with_suffix(".faiss")))
    stem.with_suffix(".json").write_text(json.dumps({"type": choice.type, "params": choice.params, "build_s": build_s,
                                                     "tune_s": tune_s, "tuned": tuned.as_text() if tuned else None,
                                                     "tune_recall": tuned.recall if tuned else None}), encoding="utf-8")


def remeasure(kind: str, n: int, keep_dir: Path, target: float) -> dict:
    """Search phase only, of an index save_built kept: same gallery, no rebuild; the search setting is chosen
    again as this run's --tune-on says (held-out: on tuning queries of this run's --query-model)."""
    import faiss

    from shitu_cli.index import backend

    vectors = gallery_vectors(n)
    queries = query_vectors(vectors, QUERIES)
    best = exact_best(vectors, queries)
    stem = keep_dir / f"{kind}-{n}"
    saved = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    index = faiss.read_index(str(stem.with_suffix(".faiss")))
    choice = backend.IndexChoice(saved["type"], saved["params"])
    backend.apply_search_params(index, choice)
    tuned, tune_s = None, saved["tune_s"]
    if saved["tune_recall"] is not None:  # tuned again, as this run's --tune-on says
        backend.set_threads(2)
        started = time.perf_counter()
        tune_queries = query_vectors(vectors, TUNE_QUERIES, seed=2) if TUNE_ON == "held-out" else None
        tuned = backend.tune_search(index, choice, np.arange(n, dtype=np.int64), vectors, target, queries=tune_queries)
        tune_s = time.perf_counter() - started
    load_start = os.getloadavg()[0]
    p50, p99, recall = time_queries(index, queries, vectors, best)
    sweep = sweep_settings(index, choice, tuned, queries, vectors, best) if tuned else {}
    shown = {k: v for k, v in choice.params.items() if k != "tuned"}
    return {"n": n, "type": kind, "categories": CATEGORIES, "tune_on": TUNE_ON, "queries": len(queries),
            "query_model": QUERY_MODEL, "params": shown, "build_s": saved["build_s"], "tune_s": tune_s,
            "tuned": tuned.as_text() if tuned else saved["tuned"],
            "tune_recall": tuned.recall if tuned else None, "p50_ms": p50, "p99_ms": p99,
            "recall_at_1": recall, "peak_over_data_mib": float("nan"), "base_rss_mib": float("nan"),
            "estimate_mib": None, "load_start": load_start, "load_end": os.getloadavg()[0], "sweep": sweep,
            "remeasured": True}


def machine() -> str:
    import faiss

    from shitu_cli.bench.system import cpu_model

    return (f"{cpu_model()}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
            f"faiss-cpu {faiss.__version__}")


def render(rows: list[dict], started_load: str, target: float) -> str:
    lines = ["# Gallery index benchmark", "",
             f"Machine: {machine()}. Load average when the run started: {started_load}; `load` = the 1-minute load "
             "average when each row's search timing started and ended. On a shared machine absolute times are inflated "
             "and noisy, the p99 column most of all; ratios within one size are fairer.", "",
             f"Data: synthetic {DIM}-d L2-normalised vectors in clusters of ~10 (a product with several photos)"
             + (f", the products drawn around {CATEGORIES} category centres" if CATEGORIES else ", products unrelated")
             + f"; {QUERIES} timed queries, not in the gallery: "
             + ("new photos of gallery products, drawn as the gallery's photos are. " if QUERY_MODEL == "new-photo"
                else "gallery vectors plus noise (near-copies of gallery photos). ")
             + "recall@1 = share of queries whose first result scores as high as the exact best (ties count). Build "
             "uses the thread budget below (IVF time includes k-means on a sample of 64 points a list); `tune s` is "
             f"the --target-recall {target} search for nprobe/efSearch on "
             + (f"{TUNE_QUERIES} other held-out queries (as `build-index --tune-queries`)" if TUNE_ON == "held-out"
                else "500 leave-one-out gallery vectors (as `build-index` without --tune-queries)")
             + ", and `tuned` the recall it measured there. Search: one query at a time, 1 thread, k=1. Peak = the "
             "child process's peak RSS above its RSS with the data loaded; estimate = shitu's pre-build memory "
             "estimate of the index.", "",
             "| vectors | type | params | build s | tune s | tuned | p50 ms | p99 ms | recall@1 | peak MiB | estimate MiB | load |",
             "|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['n']:,} | {row['type']} | failed: {row['error'][:120]} | | | | | | | | | |")
            continue
        params = ", ".join(f"{k} {v}" for k, v in row["params"].items()) or "-"
        estimate = f"{row['estimate_mib']:,.0f}" if row["estimate_mib"] is not None else "-"
        tuned = "-" if row["tune_recall"] is None else f"{row['tune_recall']:.3f}"
        kind = row["type"] + (f" ({row['categories']} categories)" if row.get("categories") else "")
        lines.append(f"| {row['n']:,} | {kind} | {params} | {row['build_s']:.1f} | {row['tune_s']:.1f} | {tuned} | "
                     f"{row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {row['recall_at_1']:.3f} | "
                     f"{row['peak_over_data_mib']:,.0f} | {estimate} | {_load(row)} |")
    return "\n".join(lines) + "\n"


def _load(row: dict) -> str:
    return f"{row['load_start']:.1f}-{row['load_end']:.1f}" if "load_end" in row else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--target-recall", type=float, default=0.99)
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "index_bench.md")
    parser.add_argument("--one", nargs=2, metavar=("TYPE", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--append", action="store_true", help="keep the rows already in the .jsonl (a second run)")
    parser.add_argument("--child-timeout-s", type=float, default=3600)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/shitu-index-bench"))
    parser.add_argument("--keep-dir", type=Path, default=None,
                        help="save each built faiss index here (a few GiB at 1M) for --remeasure")
    parser.add_argument("--remeasure", action="store_true",
                        help="time the search of indexes --keep-dir saved, without rebuilding them")
    parser.add_argument("--categories", type=int, default=0,
                        help="draw product centres around this many category centres (0: independent, the default)")
    parser.add_argument("--tune-on", choices=("leave-one-out", "held-out"), default="leave-one-out",
                        help="what --target-recall is measured on: gallery vectors (as build-index without "
                             "--tune-queries) or 500 other noisy queries (as with --tune-queries)")
    parser.add_argument("--queries", type=int, default=300, help="timed held-out queries")
    parser.add_argument("--query-model", choices=("perturbed", "new-photo"), default="perturbed",
                        help="held-out queries: a gallery vector plus noise, or a new photo of a gallery product")
    args = parser.parse_args()
    global CATEGORIES, TUNE_ON, QUERIES, QUERY_MODEL
    CATEGORIES, TUNE_ON, QUERIES, QUERY_MODEL = args.categories, args.tune_on, args.queries, args.query_model
    if args.one:
        args.workdir.mkdir(parents=True, exist_ok=True)
        if args.remeasure:
            row = remeasure(args.one[0], int(args.one[1]), args.keep_dir, args.target_recall)
        else:
            row = measure_one(args.one[0], int(args.one[1]), args.target_recall, args.build_threads, args.workdir,
                              args.keep_dir)
        print("ROW " + json.dumps(row), flush=True)
        return
    started_load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    jsonl = args.out.with_suffix(".jsonl")
    if not args.append:
        jsonl.write_text("", encoding="utf-8")
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()] if args.append else []
    for n in [int(s) for s in args.sizes.split(",")]:
        for kind in args.types.split(","):
            workdir = args.workdir / f"{kind}-{n}"
            subprocess.run(["rm", "-rf", str(workdir)], check=False)
            cmd = [sys.executable, __file__, "--one", kind, str(n), "--target-recall", str(args.target_recall),
                   "--build-threads", str(args.build_threads), "--workdir", str(workdir)]
            cmd += ["--keep-dir", str(args.keep_dir)] if args.keep_dir else []
            cmd += ["--remeasure"] if args.remeasure else []
            cmd += ["--categories", str(args.categories), "--tune-on", args.tune_on, "--queries", str(args.queries),
                    "--query-model", args.query_model]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout_s)
            except subprocess.TimeoutExpired:
                done = subprocess.CompletedProcess(cmd, -9, "", f"did not finish in {args.child_timeout_s:.0f} s")
            found = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
            row = json.loads(found[0]) if found else {"n": n, "type": kind, "error": done.stderr.strip().splitlines()[-1:]
                                                       and done.stderr.strip().splitlines()[-1]}
            subprocess.run(["rm", "-rf", str(workdir)], check=False)
            rows.append(row)
            with jsonl.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            args.out.write_text(render(rows, started_load, args.target_recall), encoding="utf-8")
    print(render(rows, started_load, args.target_recall))


if __name__ == "__main__":
    main()
