"""The built-in demo's data, made deterministically from the real photos in assets/demo/sources:
a gallery (one folder per object), query scenes with ground truth, and training sets for the
demo's own det and rec models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from shitu_cli.artifacts import atomic_write_text
from shitu_cli.data.images import iter_image_files, read_image
from shitu_cli.data.scenes import make_scene, write_coco
from shitu_cli.errors import BadInput

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_DIR = ASSETS / "demo"
SOURCES = DEMO_DIR / "sources"


@dataclass
class DemoSources:
    objects: dict[str, np.ndarray]  # label -> RGB photo of the object
    backgrounds: list[np.ndarray]


def load_sources(sources: Path = SOURCES) -> DemoSources:
    objects, backgrounds = {}, []
    for path in iter_image_files(sources):
        kind, _, name = path.stem.partition("_")
        if kind == "object":
            objects[name.replace("_", " ")] = read_image(path)
        elif kind == "background":
            backgrounds.append(read_image(path))
    if not objects or not backgrounds:
        raise BadInput("demo sources need object_*.jpg and background_*.jpg photos", path=sources)
    return DemoSources(objects, backgrounds)


def _save(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88])
    path.write_bytes(data.tobytes())


def _view(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another shot of the same object: a tighter random crop and a small lighting change."""
    h, w = rgb.shape[:2]
    keep = rng.uniform(0.8, 0.95)
    ch, cw = int(h * keep), int(w * keep)
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = rgb[top : top + ch, left : left + cw].astype(np.float32)
    return np.clip(crop * rng.uniform(0.85, 1.15) + rng.uniform(-12, 12), 0, 255).astype(np.uint8)


def write_gallery(sources: DemoSources, out: Path, views: int = 3, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for label, photo in sources.objects.items():
        _save(out / label / "0.jpg", photo)
        for i in range(1, views):
            _save(out / label / f"{i}.jpg", _view(photo, rng))


def write_scenes(sources: DemoSources, out: Path, count: int, seed: int, size=(320, 416)) -> list[tuple[str, int, int, list]]:
    """Scenes under out/images plus ground_truth.json and annotations.json (COCO)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        scene, placed = make_scene(sources.objects, sources.backgrounds, rng, size=size)
        name = f"images/scene_{i:03d}.jpg"
        _save(out / name, scene)
        records.append((name, size[0], size[1], placed))
    truth = {name: [{"label": p.label, "box": [round(v, 1) for v in p.box]} for p in placed] for name, _, _, placed in records}
    atomic_write_text(out / "ground_truth.json", json.dumps(truth, indent=1, ensure_ascii=False))
    write_coco(out / "annotations.json", records, sorted(sources.objects))
    return records


def distractor_objects(sources: DemoSources) -> dict[str, np.ndarray]:
    """Extra training classes cut from the background photos, so the recogniser learns to tell
    many things apart (and train-rec can hold whole classes out for evaluation)."""
    extra = {}
    for b, background in enumerate(sources.backgrounds):
        h, w = background.shape[:2]
        for r, c in ((0, 0), (0, 1), (1, 0), (1, 1)):
            extra[f"patch {b}-{r}{c}"] = background[r * h // 2 : (r + 1) * h // 2, c * w // 2 : (c + 1) * w // 2]
    return extra


def write_rec_training_set(sources: DemoSources, out: Path, per_class: int = 48, seed: int = 1) -> None:
    """Class folders of augmented object shots (crops of pasted scenes) for train-rec."""
    rng = np.random.default_rng(seed)
    for label, photo in {**sources.objects, **distractor_objects(sources)}.items():
        for i in range(per_class):
            scene, placed = make_scene({label: photo}, sources.backgrounds, rng, max_objects=1)
            if not placed:
                continue
            x1, y1, x2, y2 = (int(v) for v in placed[0].box)
            _save(out / label / f"{i:03d}.jpg", scene[y1:y2, x1:x2])


def build_demo_data(out: Path = DEMO_DIR, sources_dir: Path = SOURCES, query_count: int = 12) -> None:
    """gallery/ and queries/ (committed), deterministic for the committed sources."""
    sources = load_sources(sources_dir)
    write_gallery(sources, Path(out) / "gallery")
    write_scenes(sources, Path(out) / "queries", query_count, seed=2026)


@dataclass
class TrainingData:
    det_stages: list[Path]  # COCO scene dirs (annotations.json), trained on one after the other
    rec_objects: Path  # class folders for train-rec


def build_training_data(work: Path, sources_dir: Path = SOURCES) -> TrainingData:
    """Training sets for `shitu demo --rebuild`, never committed: 160 scenes for a first detector
    stage, 400 fresh ones to fine-tune it on, and object shots for the recogniser."""
    sources = load_sources(sources_dir)
    stages = [Path(work) / "det_scenes", Path(work) / "det_scenes2"]
    write_scenes(sources, stages[0], 160, seed=7)
    write_scenes(sources, stages[1], 400, seed=11)
    write_rec_training_set(sources, Path(work) / "rec_objects")
    return TrainingData(stages, Path(work) / "rec_objects")
