"""HNSW at 1M x 512-d on category-structured vectors: recall@1 and single-query latency against efSearch, for one
graph built with a given efConstruction. It is what showed faiss's default efConstruction 40 to be too small at 1M
(recall@1 levelled off at 0.92, index_bench.md) and led shitu's default to 128.

Run: nice .venv/bin/python benchmarks/hnsw_ef_construction.py [--n 1000000] [--categories 1000] --ef-construction 128
Data and queries are index_bench.py's (`--query-model new-photo`: 500 new photos of gallery products). Build on
2 threads, search one query at a time on 1 thread, k=1. Prints one line per setting; a measurement, not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def load_index_bench():
    spec = importlib.util.spec_from_file_location("index_bench", HERE / "index_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--categories", type=int, default=1000)
    parser.add_argument("--ef-construction", type=int, default=128)
    parser.add_argument("--queries", type=int, default=500)
    args = parser.parse_args()
    import faiss

    bench = load_index_bench()
    bench.CATEGORIES, bench.QUERY_MODEL = args.categories, "new-photo"
    vectors = bench.gallery_vectors(args.n)
    queries = bench.query_vectors(vectors, args.queries)
    best = bench.exact_best(vectors, queries)
    faiss.omp_set_num_threads(2)
    started = time.time()
    index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = args.ef_construction
    index.add(vectors)
    print(f"efc {args.ef_construction} build {time.time() - started:.0f}s", flush=True)
    faiss.omp_set_num_threads(1)
    for ef in (32, 64, 128, 256, 512):
        index.hnsw.efSearch = ef
        latencies, firsts = [], []
        for query in queries:
            tick = time.perf_counter()
            _, found = index.search(query[None], 1)
            latencies.append(time.perf_counter() - tick)
            firsts.append(found[0, 0])
        recall = (np.einsum("ij,ij->i", queries, vectors[np.array(firsts)]) >= best - 1e-5).mean()
        print(f"efc {args.ef_construction} ef {ef}: recall {recall:.3f} p50 {1000 * np.median(latencies):.3f} "
              f"p99 {1000 * np.percentile(latencies, 99):.3f}", flush=True)


if __name__ == "__main__":
    main()
