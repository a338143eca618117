"""Recipes: what every artifact-writing command records so the run can be read and replayed.

A recipe names the core function that did the work and the resolved options it got;
`shitu reproduce` calls that function again and compares the sha256 of every output.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from shitu_cli import __version__
from shitu_cli.artifacts import FORMAT_VERSION, read_manifest, sha256_file, write_manifest
from shitu_cli.errors import BadInput, ManifestError

RECIPE_FILE = "recipe.yaml"
RECIPE_KIND = "shitu-recipe"
TRACKED_PACKAGES = ("paddlepaddle", "paddleclas", "paddledet", "paddleslim", "faiss-cpu", "numpy", "opencv-python-headless")


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions from package metadata: cheap, and never imports paddle."""
    versions = {"shitu": __version__, "python": platform.python_version()}
    for name in TRACKED_PACKAGES + tuple(extra):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class Recipe:
    command: str
    core: str  # "module:function" that `shitu reproduce` calls with `options`
    options: dict[str, Any]
    output_option: str = "out"  # the option naming the output folder, swapped on replay
    seed: int | None = None
    argv: list[str] = field(default_factory=lambda: list(sys.argv))
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # path relative to the recipe -> sha256
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=package_versions)
    format_version: int = FORMAT_VERSION


def write_recipe(out_dir: Path, recipe: Recipe, written: list[Path]) -> Path:
    """Hash every written file (relative to out_dir) into the recipe and save it beside them."""
    out_dir = Path(out_dir)
    # Resolved on both sides: a relative -o (runs/x) and the absolute paths a core collected must meet.
    root = out_dir.resolve()
    recipe.outputs = {Path(p).resolve().relative_to(root).as_posix(): sha256_file(p) for p in sorted(written)}
    fields = asdict(recipe)
    fields.pop("format_version")
    path = out_dir / RECIPE_FILE
    write_manifest(path, RECIPE_KIND, fields)
    return path


def read_recipe(path: Path) -> Recipe:
    path = Path(path)
    if path.is_dir():
        path = path / RECIPE_FILE
    data = read_manifest(path, RECIPE_KIND, hint="pass the recipe.yaml a shitu command wrote")
    data.pop("kind")
    try:
        return Recipe(**data)
    except TypeError as exc:
        raise ManifestError(f"recipe has unexpected fields ({exc})", path=path) from None


def recipe_hash(path: Path) -> str | None:
    path = Path(path)
    return sha256_file(path) if path.is_file() else None


@dataclass
class FileCheck:
    path: str
    status: str  # "identical", "differs", "missing", or "edited on disk"


@dataclass
class ReproduceReport:
    recipe: Path
    out_dir: Path
    files: list[FileCheck]

    @property
    def identical(self) -> bool:
        return all(f.status == "identical" for f in self.files)


def resolve_core(spec: str) -> Callable[..., Any]:
    module_name, _, func_name = spec.partition(":")
    if not module_name.startswith("shitu_cli."):
        # A recipe is data: it may only name our own entry points, never arbitrary code.
        raise BadInput(f"recipe names core {spec!r}, which is not a shitu function")
    try:
        return getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError):
        raise BadInput(f"recipe names core {spec!r}, which this shitu version does not have") from None


def reproduce(recipe_path: Path, out_dir: Path | None = None) -> ReproduceReport:
    """Re-run a recipe into `out_dir` (a temp dir by default) and compare every output's sha256."""
    recipe = read_recipe(recipe_path)
    core = resolve_core(recipe.core)
    target = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="shitu-reproduce-"))
    options = dict(recipe.options)
    options[recipe.output_option] = target
    core(**options)
    recipe_dir = Path(recipe_path) if Path(recipe_path).is_dir() else Path(recipe_path).parent
    checks = [_check_output(rel, digest, target / rel, recipe_dir / rel) for rel, digest in recipe.outputs.items()]
    return ReproduceReport(Path(recipe_path), target, checks)


def _check_output(rel: str, recorded: str, produced: Path, beside_recipe: Path) -> FileCheck:
    """The replay must match the recorded hash, and so must the file still sitting beside the recipe."""
    if not produced.is_file():
        return FileCheck(rel, "missing")
    if sha256_file(produced) != recorded:
        return FileCheck(rel, "differs")
    if beside_recipe.is_file() and beside_recipe.resolve() != produced.resolve() and sha256_file(beside_recipe) != recorded:
        return FileCheck(rel, "edited on disk")
    return FileCheck(rel, "identical")


def merge_settings(defaults: Mapping[str, Any], *layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """defaults < recipe < flags, highest on the right; unknown keys refused with the nearest name."""
    merged = dict(defaults)
    for layer in layers:
        for key, value in (layer or {}).items():
            if key not in defaults:
                close = difflib.get_close_matches(key, list(defaults), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(defaults))}"
                raise BadInput(f"unknown setting {key!r}", hint=hint)
            if value is not None:
                merged[key] = value
    return merged
