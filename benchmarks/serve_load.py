"""Load test of `shitu serve` on loopback: N concurrent clients, mixed recognise and gallery-add requests.

    .venv/bin/python benchmarks/serve_load.py --clients 8 --requests 240 --configs 1x1,1x2,2x1 [--det]

Starts the real server (one run per WORKERSxPOOL config: processes x model copies each) on a copy of the demo gallery, sends a bounded
number of requests, and checks: no failed request, every added image in the index afterwards
(gallery count == adds that succeeded), searches never failing while edits commit. Prints a
Markdown table (p50/p99 per request kind, requests/s) and writes JSON with --json-out.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from serve_helpers import demo_index, start_server  # noqa: E402

QUERIES = sorted((ROOT / "assets" / "demo" / "queries" / "images").glob("*.jpg"))
DET = ROOT / "assets" / "demo" / "models" / "det"
TOKEN = "load-test"
ADD_LABEL = "load"


@dataclass
class LoadResult:
    workers: int
    pool: int
    clients: int
    requests: int
    adds: int
    seconds: float
    requests_per_s: float
    failed: list[str] = field(default_factory=list)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> p50, p99, max
    gallery_adds_seen: int = 0
    lost_items: int = 0
    generations: int = 0


def unique_photo(seed: int) -> bytes:
    """A photo no other request sends (so an add is never a duplicate): noise blocks from the seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(blocks).resize((96, 96), Image.NEAREST).save(out, "PNG")
    return out.getvalue()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_load(workers: int, clients: int, requests: int, add_every: int, det: bool, max_seconds: float,
             work: Path, pool: int = 1) -> LoadResult:
    _, index = demo_index(work)
    args = ["--index", index, "--workers", str(workers), "--pool", str(pool), "--token", TOKEN, "--timeout", "120"]
    server = start_server(args + (["--det", DET] if det else []), work / "serve.log",
                          {"SHITU_HOME": str(work / "home"), "OMP_NUM_THREADS": "1"})
    photos = [q.read_bytes() for q in QUERIES]
    latencies: dict[str, list[float]] = {"recognise": [], "add": []}
    failed: list[str] = []
    generations: set[str] = set()
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def one(number: int) -> None:
        if time.monotonic() > deadline:
            return
        kind = "add" if add_every and number % add_every == add_every - 1 else "recognise"
        started = time.perf_counter()
        if kind == "add":
            answer = server.post_files("/gallery/add", [(f"load-{number}.png", unique_photo(number))], {"label": ADD_LABEL},
                                       token=TOKEN)
            ok = answer.status == 200 and len(answer.body.get("added", [])) == 1
        else:
            answer = server.post_files("/recognise", [(f"q{number}.jpg", photos[number % len(photos)])])
            ok = answer.status == 200 and answer.body.get("count") == 1
        elapsed = (time.perf_counter() - started) * 1000
        with lock:
            latencies[kind].append(elapsed)
            generations.add(answer.headers.get("x-shitu-generation", ""))
            if not ok:
                failed.append(f"{kind} #{number}: HTTP {answer.status} {json.dumps(answer.body)[:200]}")

    try:
        server.post_files("/recognise", [("warm.jpg", photos[0])])  # load the models before timing
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as senders:
            list(senders.map(one, range(requests)))
        seconds = time.perf_counter() - started
        gallery = server.get("/gallery").body
    finally:
        server.stop()
    done = sum(len(v) for v in latencies.values())
    adds_ok = len(latencies["add"]) - sum(1 for f in failed if f.startswith("add"))
    seen = gallery.get("labels", {}).get(ADD_LABEL, 0)
    return LoadResult(
        workers=workers, pool=pool, clients=clients, requests=done, adds=len(latencies["add"]), seconds=round(seconds, 2),
        requests_per_s=round(done / seconds, 2), failed=failed,
        latency_ms={kind: {"p50": round(percentile(v, 50), 1), "p99": round(percentile(v, 99), 1),
                           "mean": round(statistics.fmean(v), 1), "n": len(v)} for kind, v in latencies.items() if v},
        gallery_adds_seen=seen, lost_items=adds_ok - seen, generations=len(generations - {""}))


def markdown(results: list[LoadResult]) -> str:
    lines = ["| workers x pool | clients | requests (adds) | req/s | recognise p50 / p99 ms | add p50 / p99 ms | failed | lost items |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rec, add = r.latency_ms.get("recognise", {}), r.latency_ms.get("add", {})
        lines.append(f"| {r.workers} x {r.pool} | {r.clients} | {r.requests} ({r.adds}) | {r.requests_per_s} | "
                     f"{rec.get('p50')} / {rec.get('p99')} | {add.get('p50')} / {add.get('p99')} | {len(r.failed)} | {r.lost_items} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--add-every", type=int, default=10, help="every Nth request is a gallery add (0: none)")
    parser.add_argument("--configs", default="1x1,1x2,2x1", help="WORKERSxPOOL configs to compare, comma-separated")
    parser.add_argument("--det", action="store_true", help="serve with the demo detector (boxes), as a shop would")
    parser.add_argument("--max-seconds", type=float, default=300, help="stop sending after this long (bounded run)")
    parser.add_argument("--json-out", type=Path)
    options = parser.parse_args()
    results = []
    for config in options.configs.split(","):
        workers, pool = (int(v) for v in config.lower().split("x"))
        with tempfile.TemporaryDirectory(prefix="shitu-load-") as tmp:
            results.append(run_load(workers, options.clients, options.requests, options.add_every, options.det,
                                    options.max_seconds, Path(tmp), pool))
        print(markdown(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(markdown(results))
    for r in results:
        for failure in r.failed[:5]:
            print(f"workers {r.workers}: {failure}", file=sys.stderr)
    if options.json_out:
        options.json_out.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n", encoding="utf-8")
    sys.exit(1 if any(r.failed or r.lost_items for r in results) else 0)


if __name__ == "__main__":
    main()
