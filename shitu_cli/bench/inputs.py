"""What a benchmark runs on: the models by task (with their int8 twins), the decoded-once images, the
index's own rec model, and the demo's models and images when nothing is given."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from shitu_cli.errors import BadInput, ImageReadError
from shitu_cli.models.manifest import ModelManifest, read_model_manifest

TASK_ORDER = ("det", "rec", "cls")


def load_models(paths: dict[str, Path | None], int8_paths: Sequence[Path] = ()) -> tuple[dict[str, ModelManifest], dict[str, Path], dict[str, Path]]:
    """Manifests of the given fp32 models by task, their dirs, and the int8 twins matched by task."""
    manifests, dirs = {}, {}
    for task in TASK_ORDER:
        path = paths.get(task)
        if path is None:
            continue
        manifest = read_model_manifest(Path(path), task=task)
        if manifest.precision == "int8":
            raise BadInput(
                f"--{task} is an int8 model; agreement needs its fp32 parent",
                hint=f"pass the fp32 model as --{task} and this one as --int8", path=path,
            )
        manifests[task], dirs[task] = manifest, Path(path)
    int8_dirs = {}
    for path in int8_paths:
        manifest = read_model_manifest(Path(path))
        if manifest.precision != "int8":
            raise BadInput(f"--int8 expects an int8 model, this one is {manifest.precision}", path=path)
        if manifest.task not in dirs:
            raise BadInput(f"--int8 gives a {manifest.task} model but no fp32 --{manifest.task}", path=path)
        int8_dirs[manifest.task] = Path(path)
    return manifests, dirs, int8_dirs


def load_images(source: Path) -> tuple[list[Path], list[str]]:
    """Decode every image once, untimed: it warms the file cache and drops files that cannot be read."""
    from shitu_cli.data.images import iter_image_files, read_image

    source = Path(source)
    if source.is_dir():
        files = list(iter_image_files(source))
    elif source.is_file():
        files = [source]
    else:
        raise BadInput("no such file or folder", path=source, hint="pass --images DIR with image files")
    paths, skipped = [], []
    for path in files:
        try:
            read_image(path)
            paths.append(path)
        except ImageReadError as exc:
            skipped.append(exc.one_line())
    if not paths:
        raise BadInput("no readable images here", path=source, hint="pass --images DIR with .jpg/.png files")
    return paths, skipped


def index_model(index_dir: Path, rec: Path | None) -> Path:
    """The rec model to search `index_dir` with: the given one if its features fit the index, else the index's own."""
    from shitu_cli.index.store import read_index_manifest
    from shitu_cli.infer.pipeline import check_model_fits_index

    manifest = read_index_manifest(index_dir)
    rec_dir = Path(rec) if rec is not None else Path(manifest.model.dir)
    check_model_fits_index(manifest.model, read_model_manifest(rec_dir, task="rec"), rec_dir)
    return rec_dir


def demo_root() -> Path:
    import shitu_cli

    return Path(shitu_cli.__file__).resolve().parent.parent / "assets" / "demo"


def default_setup() -> tuple[dict[str, Path | None], Path]:
    """The demo's det and rec models (official when cached, else built-in) and the demo gallery's
    index, built on first use, so a bare `shitu benchmark-cpu` works on a fresh install."""
    from shitu_cli import demo

    try:
        index, models, _ = demo.ensure_demo_index()
    except BadInput as exc:
        raise BadInput(exc.message, path=exc.path,
                       hint="run `shitu demo --rebuild`, or pass models: --rec DIR / --det DIR / --cls DIR and --images DIR") from None
    return {"det": models.det, "rec": models.rec, "cls": None}, index


def default_images() -> Path:
    for name in ("queries", "gallery"):
        if (demo_root() / name).is_dir():
            return demo_root() / name
    raise BadInput(f"no built-in demo images in {demo_root()}", hint="pass --images DIR")
