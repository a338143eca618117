"""The header of every benchmark: which CPU, how many cores, which SIMD extensions, which library versions."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# What matters for CNN inference on CPU, in the names /proc/cpuinfo uses.
SIMD_FLAGS = {
    "avx2": ("avx2",),
    "avx512": ("avx512f",),
    "vnni": ("avx512_vnni", "avx_vnni"),
    "bf16": ("avx512_bf16", "amx_bf16"),
    "amx": ("amx_tile", "amx_int8", "amx_bf16"),
}
BACKEND_PACKAGES = ("onnxruntime", "openvino", "paddle2onnx")


@dataclass
class SystemInfo:
    cpu: str
    physical_cores: int
    logical_cpus: int
    usable_cpus: int  # what this process may run on (cgroups, taskset)
    simd: dict[str, bool]
    versions: dict[str, str] = field(default_factory=dict)

    def simd_text(self) -> str:
        return " ".join(f"{name}{'+' if present else '-'}" for name, present in self.simd.items())


@functools.lru_cache(maxsize=1)
def _cpuinfo_text() -> str:
    try:
        return CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _cpuinfo_field(name: str) -> list[str]:
    values = []
    for line in _cpuinfo_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            values.append(value.strip())
    return values


def cpu_model() -> str:
    names = _cpuinfo_field("model name")
    return names[0] if names else (platform.processor() or platform.machine() or "unknown CPU")


def physical_cores() -> int:
    pairs = set(zip(_cpuinfo_field("physical id"), _cpuinfo_field("core id")))
    return len(pairs) or os.cpu_count() or 1


def cpu_flags() -> set[str]:
    flags = _cpuinfo_field("flags")
    return set(flags[0].split()) if flags else set()


def simd_support() -> dict[str, bool]:
    flags = cpu_flags()
    return {name: any(f in flags for f in names) for name, names in SIMD_FLAGS.items()}


def library_versions() -> dict[str, str]:
    from shitu_cli.recipes import package_versions

    return package_versions(extra=BACKEND_PACKAGES)


def system_info() -> SystemInfo:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return SystemInfo(
        cpu=cpu_model(), physical_cores=physical_cores(), logical_cpus=os.cpu_count() or 1,
        usable_cpus=usable, simd=simd_support(), versions=library_versions(),
    )
