"""shitu: PP-ShiTu image recognition on ordinary CPUs.

Importing this package only defines names; paddle, ppdet and faiss load lazily inside
the functions that need them, so `shitu --help` answers at once. The public Python API,
`from shitu_cli import Index, Pipeline, Detect`, is looked up on first use (PEP 562).
"""

__version__ = "0.1.0"

__all__ = ["Index", "Pipeline", "Detect", "__version__"]

_PUBLIC = {"Index": "shitu_cli.api", "Pipeline": "shitu_cli.api", "Detect": "shitu_cli.api"}


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'shitu_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
