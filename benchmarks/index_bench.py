"""Index benchmark: build throughput, single-query search latency and recall@1 against flat,
for each index type shitu builds, on 1k / 10k / 100k synthetic 512-d gallery vectors.

Run: .venv/bin/python benchmarks/index_bench.py [--sizes 1000,10000,100000] [--out benchmarks/index_bench.md]
It is a measurement, not a test: a few minutes on 2 cores. Every number in one table comes from one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from shitu_cli.index import backend

DIM = 512
QUERIES = 300
TYPES = ("flat", "ivf", "hnsw")


def gallery_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Clustered like a product gallery (several photos per product), not uniform noise:
    n/10 product centres, each photo a noisy copy of its centre."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 10), dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def query_vectors(gallery: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """New photos of gallery products: a gallery vector plus noise about half its length."""
    rng = np.random.default_rng(seed)
    picked = gallery[rng.integers(0, len(gallery), count)]
    queries = picked + 0.5 * rng.normal(size=picked.shape).astype(np.float32) / np.sqrt(gallery.shape[1])
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def measure(kind: str, vectors: np.ndarray, queries: np.ndarray, build_threads: int) -> dict:
    choice = backend.choose_index(kind, len(vectors))
    backend.set_threads(build_threads)
    started = time.perf_counter()
    index = backend.new_index(choice, vectors.shape[1], training=vectors if kind == "ivf" else None)
    backend.add(index, np.arange(len(vectors), dtype=np.int64), vectors)
    build_s = time.perf_counter() - started
    backend.set_threads(1)  # one query at a time, as `shitu predict` searches
    latencies, found = [], []
    for query in queries:
        tick = time.perf_counter()
        _, ids = index.search(query[None, :], 1)
        latencies.append(time.perf_counter() - tick)
        found.append(int(ids[0, 0]))
    params = ", ".join(f"{k} {v}" for k, v in choice.params.items())
    return {"type": kind, "params": params, "build_s": build_s, "build_per_s": len(vectors) / build_s,
            "p50_ms": 1000 * float(np.median(latencies)), "p90_ms": 1000 * float(np.percentile(latencies, 90)),
            "found": np.array(found)}


def machine() -> str:
    import faiss

    cores = os.cpu_count()
    from shitu_cli.bench.system import cpu_model

    return f"{cpu_model()}, {cores} cores, Linux {platform.release()}, Python {platform.python_version()}, faiss-cpu {faiss.__version__}"


def run(sizes: list[int], build_threads: int) -> str:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = ["# Gallery index benchmark", "",
             f"Machine: {machine()}. Load average when the run started: {load} (a shared machine: "
             "other jobs inflate the absolute times, most of all the p90 column; the same-run ratios are fairer).", "",
             f"Data: {DIM}-d L2-normalised vectors in clusters of ~10 (a product with several photos), "
             f"{QUERIES} queries that are gallery vectors plus noise. Build uses {build_threads} faiss thread(s) "
             "(IVF time includes k-means training); search is one query at a time on 1 thread, k=1. "
             "Recall@1 is agreement with the flat (exact) index's answer. Ratios compare with flat in the same run.", "",
             "| vectors | type | params | build s | built vectors/s | search p50 ms | search p90 ms | speed-up vs flat (p50) | recall@1 vs flat |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for n in sizes:
        vectors = gallery_vectors(n, DIM)
        queries = query_vectors(vectors, QUERIES)
        rows = [measure(kind, vectors, queries, build_threads) for kind in TYPES]
        flat = rows[0]
        for row in rows:
            recall = float((row["found"] == flat["found"]).mean())
            lines.append(f"| {n:,} | {row['type']} | {row['params'] or '-'} | {row['build_s']:.2f} | {row['build_per_s']:,.0f} | "
                         f"{row['p50_ms']:.3f} | {row['p90_ms']:.3f} | {flat['p50_ms'] / row['p50_ms']:.1f}x | {recall:.3f} |")
        print(lines[-3:], flush=True)
    lines += ["", f"`shitu build-index --index-type auto` picks flat below {backend.FLAT_BELOW:,} vectors, IVF above "
              "(HNSW above only with --no-removals)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("index_bench.md"))
    args = parser.parse_args()
    report = run([int(s) for s in args.sizes.split(",")], args.build_threads)
    args.out.write_text(report, encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
