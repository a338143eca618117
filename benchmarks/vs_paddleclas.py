"""Write benchmarks/vs_paddleclas.md: shitu against PaddleClas's own deploy/python scripts (predict_system.py's
SystemPredictor and build_gallery.py), on the same det + rec models, images and threads, interleaved.

PaddleClas's scripts come from the paddleclas wheel in .venv. They need four small patches on Paddle 3.3.1
(STACK.md); this script applies them to a temporary copy, never to the venv. Every comparison alternates the
two tools (A B A B ...) and reports medians with the range of the per-round ratios.

Usage: .venv/bin/python benchmarks/vs_paddleclas.py [--rounds 5] [--threads 1,2] [--out benchmarks/vs_paddleclas.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable
HELD_OUT_SEED = 4242  # not a seed the demo data or its training scenes use (2026, 7, 11, 1, 0)

sys.path.insert(0, str(HERE))
from vs_paddleclas_setup import PaddleClasSetup, prepare_paddleclas  # noqa: E402


# ---- timing helpers


def interleaved(runs: dict[str, callable], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each named function, the names taking turns every round."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return times


def run_process(command: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one child process; its output is discarded. The peak comes from
    /usr/bin/time: wait4's ru_maxrss also counts the forked copy of this (large) parent before exec."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as peak_file:
        started = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", peak_file.name, *command], cwd=cwd, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{done.stderr[-2000:]}")
        peak_kib = float(Path(peak_file.name).read_text(encoding="utf-8").split()[-1])
    return wall, peak_kib / 1024


# ---- the comparisons


def in_process(setup: PaddleClasSetup, ours_index: Path, images: list[Path], threads: int, rounds: int) -> dict:
    """Per-image latency (decoded images) and folder throughput (files in, results out), one process."""
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.detector import Detector
    from shitu_cli.infer.pipeline import Pipeline
    from shitu_cli.infer.predictor import PredictorOptions

    options = PredictorOptions(backend="auto", threads=threads)
    ours = Pipeline(ours_index, detector=Detector(setup.det_dir_ours, options), predictor_options=options)
    theirs = setup.system_predictor(threads)
    decoded = [read_image(p) for p in images]
    quiet = contextlib.redirect_stdout(io.StringIO())  # their detector prints a line per call

    def their_image(rgb):
        with contextlib.redirect_stdout(io.StringIO()):
            return theirs.predict(rgb)

    def their_folder():
        import cv2

        with contextlib.redirect_stdout(io.StringIO()):
            for path in images:
                theirs.predict(cv2.imread(str(path))[:, :, ::-1])

    with quiet:
        for rgb in decoded[:3]:  # warm-up
            ours.recognise(rgb)
            their_image(rgb)
    per_image = {"shitu": [], "PaddleClas": []}
    for _ in range(rounds):
        for name, run in (("shitu", ours.recognise), ("PaddleClas", their_image)):
            started = time.perf_counter()
            for rgb in decoded:
                run(rgb)
            per_image[name].append((time.perf_counter() - started) / len(decoded))
    folder = interleaved({"shitu": lambda: ours.predict_files(images), "PaddleClas": their_folder}, rounds)
    backends = {"det": ours.detector.predictor.backend, "rec": ours.embedder.predictor.backend}
    return {"per_image": per_image, "folder": {k: [len(images) / v for v in vs] for k, vs in folder.items()},
            "folder_s": folder, "backends": backends}


def whole_process(setup: PaddleClasSetup, ours_index: Path, folder: Path, threads: int, rounds: int, env: dict) -> dict:
    ours = [PYTHON, "-m", "shitu_cli", "predict", str(folder), "--index", str(ours_index), "--det", str(setup.det_dir_ours),
            "--threads", str(threads), "--json"]
    theirs = setup.predict_command(folder, threads)
    for command, cwd in ((ours, ROOT), (theirs, setup.run_dir)):  # warm-up: file cache, auto's first measurement
        run_process(command, cwd, env)
    walls, peaks = {"shitu": [], "PaddleClas": []}, {"shitu": [], "PaddleClas": []}
    for _ in range(rounds):
        for name, command, cwd in (("shitu", ours, ROOT), ("PaddleClas", theirs, setup.run_dir)):
            wall, peak = run_process(command, cwd, env)
            walls[name].append(wall)
            peaks[name].append(peak)
    return {"wall": walls, "peak_mib": peaks}


def build_index(setup: PaddleClasSetup, gallery: Path, count: int, threads: int, rounds: int, env: dict, work: Path) -> dict:
    walls = {"shitu": [], "PaddleClas": []}
    for number in range(rounds + 1):  # round 0 warms up
        out = work / f"ours-index-{threads}-{number}"
        ours = [PYTHON, "-m", "shitu_cli", "build-index", str(gallery), "-o", str(out), "--rec", str(setup.rec_dir),
                "--threads", str(threads)]
        theirs = setup.build_command(work / f"their-index-{threads}-{number}", threads)
        for name, command, cwd in (("shitu", ours, ROOT), ("PaddleClas", theirs, setup.run_dir)):
            wall, _ = run_process(command, cwd, env)
            if number:
                walls[name].append(wall)
    return {"wall": walls, "img_s": {k: [count / v for v in vs] for k, vs in walls.items()}}


def precision(setup: PaddleClasSetup, ours_index: Path, scenes: Path) -> dict:
    """Objects found (right label, IoU >= 0.5) and boxes that cover no object, with each tool's defaults."""
    from shitu_cli import demo
    from shitu_cli.infer.detector import Detector
    from shitu_cli.infer.pipeline import Pipeline

    truth = json.loads((scenes / "ground_truth.json").read_text(encoding="utf-8"))
    paths = [scenes / name for name in sorted(truth)]
    ours = Pipeline(ours_index, detector=Detector(setup.det_dir_ours)).predict_files(paths)
    theirs = setup.system_predictor(1)
    their_results = []
    with contextlib.redirect_stdout(io.StringIO()):
        from shitu_cli.data.images import read_image

        for path in paths:
            found = theirs.predict(read_image(path))
            their_results.append(_as_results(path, found, setup))
    scores = {}
    for name, results in (("shitu", ours), ("PaddleClas", their_results)):
        scoring = demo.score(results, truth, root=scenes)
        scores[name] = {"found": sum(c.correct for c in scoring.checks), "objects": len(scoring.checks),
                        "extra": scoring.extra, "boxes": scoring.boxes, "right": scoring.right}
    return scores


def _as_results(path: Path, found: list[dict], setup: PaddleClasSetup):
    from types import SimpleNamespace

    recognitions = [SimpleNamespace(box=[float(v) for v in r["bbox"]], label=setup.label_back(r["rec_docs"]),
                                    score=float(r["rec_scores"])) for r in found]
    return SimpleNamespace(path=str(path), recognitions=recognitions)


# ---- inputs


def held_out_scenes(work: Path, count: int) -> Path:
    from shitu_cli.demo_data import load_sources, write_scenes

    out = work / "held_out_scenes"
    write_scenes(load_sources(), out, count, seed=HELD_OUT_SEED)
    return out


def big_gallery(work: Path, copies: int) -> tuple[Path, int]:
    """The demo gallery, each photo in `copies` lightly changed versions (brightness, flips): no two files
    alike, so neither tool can skip repeated content."""
    import cv2

    from shitu_cli import demo

    out, count = work / "big_gallery", 0
    for source in sorted(demo.GALLERY.rglob("*.jpg")):
        image = cv2.imread(str(source))
        for copy in range(copies):
            changed = cv2.convertScaleAbs(image, alpha=1.0 + 0.03 * copy, beta=copy % 7)
            changed = cv2.flip(changed, 1) if copy % 2 else changed
            target = out / source.parent.name / f"{source.stem}_{copy:02d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(target), changed)
            count += 1
    return out, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--process-rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--scenes", type=int, default=100, help="held-out scenes with ground truth for precision")
    parser.add_argument("--copies", type=int, default=10, help="versions of each gallery photo for build-index")
    parser.add_argument("--out", type=Path, default=HERE / "vs_paddleclas.md")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    from shitu_cli import demo
    from shitu_cli.index.build import build_index as build

    with tempfile.TemporaryDirectory(prefix="shitu-vs-paddleclas-") as scratch:
        work = Path(scratch)
        env = {**os.environ, "SHITU_HOME": str(work / "shitu_home"), "PYTHONWARNINGS": "ignore"}
        os.environ["SHITU_HOME"] = env["SHITU_HOME"]
        models = demo.pick_models()
        setup = prepare_paddleclas(work, models.det, models.rec, demo.GALLERY)
        env["PYTHONPATH"] = str(setup.root)  # their scripts import the patched copy; shitu does not import paddleclas
        ours_index = work / "ours_index"
        build(demo.GALLERY, ours_index, rec=models.rec)
        queries = sorted((demo.QUERIES / "images").glob("*.jpg"))
        results = {"models": {"det": str(models.det), "rec": str(models.rec), "source": models.source},
                   "images": len(queries), "threads": {}}
        for count in threads:
            say(f"{count} thread(s): in one process")
            measured = in_process(setup, ours_index, queries, count, args.rounds)
            say(f"{count} thread(s): whole process")
            measured["process"] = whole_process(setup, ours_index, demo.QUERIES / "images", count, args.process_rounds, env)
            say(f"{count} thread(s): build-index")
            gallery, gallery_count = big_gallery(work, args.copies)
            setup.write_gallery_list(gallery)
            measured["build"] = build_index(setup, gallery, gallery_count, count, args.process_rounds, env, work)
            measured["gallery_count"] = gallery_count
            results["threads"][count] = measured
        say("precision: demo queries and held-out scenes")
        results["precision"] = {"demo queries (12 scenes)": precision(setup, ours_index, demo.QUERIES),
                                f"held-out scenes ({args.scenes}, seed {HELD_OUT_SEED})":
                                    precision(setup, ours_index, held_out_scenes(work, args.scenes))}
        results["patches"] = setup.patches
    from vs_paddleclas_report import render_markdown

    args.out.write_text(render_markdown(results, args), encoding="utf-8")
    (args.out.with_suffix(".json")).write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    say(f"wrote {args.out}")


def say(text: str) -> None:
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
