"""What `shitu serve` does, without HTTP: recognise image bytes, and edit the gallery live.

Each predictor recognises one image at a time (a Paddle predictor is not safe to call from two
threads at once); `pool` predictors in one process serve that many searches at once. Each search runs on the core pipeline of the generation committed when it started, so an
edit committing meanwhile never changes a search half-way. Edits go through `shitu_cli.api.Index`,
hence build_index's crash-safe writer and its file lock, and are served from the next request on.
"""

from __future__ import annotations

import queue
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from shitu_cli.errors import BadInput


@dataclass
class Limits:
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    request_timeout_s: float = 60.0
    url_timeout_s: float = 10.0
    max_files_per_add: int = 64


@dataclass
class ServeSettings:
    """Everything a server process needs to start; JSON-able, so worker processes can be handed it."""

    index: str
    det: str | None = None
    rec: str | None = None
    backend: str = "auto"
    threads: int = 1
    mkldnn: bool = True
    pool: int = 1  # pipelines (model copies) in this process: searches that can run at once
    token: str | None = None
    read_token: bool = False  # also ask the token for recognising, not only for edits
    allow_urls: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # PipelineOptions fields
    limits: Limits = field(default_factory=Limits)

    def to_json(self) -> str:
        import json

        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeSettings":
        import json

        data = json.loads(text)
        data["limits"] = Limits(**data.get("limits", {}))
        return cls(**data)


class Service:
    def __init__(self, settings: ServeSettings):
        from shitu_cli.api import Index, Pipeline

        self.settings = settings
        self.index = Index(settings.index)
        if settings.pool < 1:
            raise BadInput(f"--pool must be at least 1, got {settings.pool}")
        pipelines = [Pipeline(self.index, det=settings.det, rec=settings.rec, backend=settings.backend,
                              threads=settings.threads, mkldnn=settings.mkldnn, **settings.options) for _ in range(settings.pool)]
        self.pipeline = pipelines[0]  # health, gallery and edits read the generation through this one
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for pipeline in pipelines:
            self._free.put(pipeline)

    # ---- reading

    def recognise(self, rgb: np.ndarray, name: str) -> tuple[dict[str, Any], int]:
        """predict --json's document for one image, and the index generation it was searched in."""
        from shitu_cli.infer.pipeline import ImageResult

        pipeline = self._free.get()  # blocks while every predictor is busy
        try:
            core = pipeline.current()  # this search's generation, whatever commits meanwhile
            recognitions = core.recognise(rgb)
        finally:
            self._free.put(pipeline)
        result = ImageResult(name, recognitions, core.options.whole_image, (rgb.shape[1], rgb.shape[0]))
        document = {"index": self.index.path.resolve(), "models": self.models(), "images": [result], "count": 1, "failed": 0}
        return document, core.index.manifest.generation

    def models(self) -> dict[str, Any]:
        return {"rec": self.pipeline.current().embedder.model_dir, "det": self.pipeline.det_dir}

    def health(self) -> dict[str, Any]:
        core = self.pipeline.current()
        manifest = core.index.manifest
        return {"status": "ok", "generation": manifest.generation, "count": manifest.count,
                "labels": len({item.label for item in core.index.items.values()}), "index": self.index.path.resolve()}

    def gallery(self) -> dict[str, Any]:
        core = self.pipeline.current()
        counts: dict[str, int] = {}
        for item in core.index.items.values():
            counts[item.label] = counts.get(item.label, 0) + 1
        return {"generation": core.index.manifest.generation, "count": core.index.manifest.count,
                "gallery": core.index.manifest.gallery, "labels": dict(sorted(counts.items()))}

    # ---- editing

    def add(self, uploads: Sequence[tuple[str, bytes]], label: str, box: Sequence[float] | None) -> dict[str, Any]:
        """Add uploaded images (or, with `box`, that crop of each) to the gallery under `label`."""
        import tempfile

        from shitu_cli.api import check_label
        from shitu_cli.data.sources import decode_image_bytes, image_suffix

        label = check_label(label)
        if not uploads:
            raise BadInput("no image to add", hint="send one or more `file` parts")
        if len(uploads) > self.settings.limits.max_files_per_add:
            raise BadInput(f"{len(uploads)} images in one request, over {self.settings.limits.max_files_per_add}")
        decoded = [decode_image_bytes(data, name, self.settings.limits.max_pixels) for name, data in uploads]
        names = [Path(name).stem or "upload" for name, _ in uploads]
        if box is not None:
            report = self.index.add([_crop(rgb, box, name) for rgb, (name, _) in zip(decoded, uploads)], label, names=names)
        else:
            with tempfile.TemporaryDirectory(prefix="shitu-add-") as tmp:
                files = []
                for position, (_, data) in enumerate(uploads):  # the uploaded bytes as sent: no re-encoding
                    files.append(Path(tmp) / f"{position}{image_suffix(data)}")
                    files[-1].write_bytes(data)
                report = self.index.add(files, label, names=names)
        return {"label": label, "added": [{"id": i, "path": p} for i, p in report.added_items],
                "duplicates": [{"name": Path(d.path).name, "reason": d.reason} for d in report.duplicates],
                **self._after_edit(report)}

    def remove(self, label: str | None, ids: Sequence[int] | None, paths: Sequence[str] | None) -> dict[str, Any]:
        report = self.index.remove(label=label, ids=ids, paths=paths)
        return {"removed": report.removed, "paths": report.removed_paths, **self._after_edit(report)}

    def sync(self) -> dict[str, Any]:
        report = self.index.sync()
        return {"added": report.added, "changed": report.changed, "removed": report.removed,
                "unchanged": report.unchanged, "skipped": [asdict(s) for s in report.skipped], **self._after_edit(report)}

    def _after_edit(self, report) -> dict[str, Any]:
        core = self.pipeline.current()  # loads the generation the edit committed, for the next search
        return {"generation": core.index.manifest.generation, "count": report.count, "notes": report.notes}


def _crop(rgb: np.ndarray, box: Sequence[float], name: str) -> np.ndarray:
    from shitu_cli.infer.pipeline import clip_box, crop

    if len(box) != 4:
        raise BadInput(f"{name}: a box is 4 numbers x1,y1,x2,y2, got {len(box)}")
    clipped = clip_box(box, rgb.shape[1], rgb.shape[0])
    if clipped[2] - clipped[0] < 2 or clipped[3] - clipped[1] < 2:
        raise BadInput(f"{name}: box {list(box)} leaves no pixels of the {rgb.shape[1]}x{rgb.shape[0]} image")
    return np.ascontiguousarray(crop(rgb, clipped))

