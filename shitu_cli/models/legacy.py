"""Reading .pdparams weights without running code: they are pickles, so only numpy's own globals are allowed.

`paddle.load` unpickles with no restriction; a downloaded weights file could run anything.
Legacy inference models (inference.pdmodel) need no shim: Paddle 3.3.1 Inference loads them
as they are (tests/test_legacy_model.py proves it on an official-style tar).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from shitu_cli.errors import BadInput

# What paddle.save (2.x and 3.x) writes for a state dict, and nothing that can call out.
ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),  # files written under numpy 2
    ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
    ("builtins", "tuple"),  # paddle 2.x pickled each tensor as tuple((name, ndarray))
}
NAME_TABLE_KEY = "StructuredToParameterName@@"  # paddle's structured-name -> param-name map, not a weight


class _WeightsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id")


def load_weights(path: Path | str) -> dict[str, np.ndarray]:
    """A .pdparams state dict as {name: ndarray}, for `layer.set_state_dict(...)`; code in the file is refused."""
    path = Path(path)
    return _arrays_of(_unpickle(path), path)


def load_state(path: Path | str) -> Any:
    """Any paddle.save file (optimiser state, ppdet's .pdopt) as plain containers, numbers and ndarrays.

    The same array-only unpickler as `load_weights`; paddle's (name, ndarray) tensor tuples become
    the ndarray, which `optimizer.set_state_dict` takes as it takes a tensor.
    """
    return _plain(_unpickle(Path(path)))


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as handle:
            return _WeightsUnpickler(handle).load()
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refused"):
            raise BadInput(f"weights file holds more than arrays ({exc}); refusing to load it", path=path,
                           hint="use weights from a source you trust, saved with paddle.save(state_dict)") from None
        raise BadInput(f"not a readable .pdparams file ({exc})", path=path) from None
    except FileNotFoundError:
        raise BadInput("weights file not found", path=path) from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError, MemoryError) as exc:
        raise BadInput(f"not a readable .pdparams file ({exc.__class__.__name__})", path=path,
                       hint="a truncated download? pull it again") from None
    except OSError as exc:
        raise BadInput(f"cannot read weights ({exc.strerror or exc})", path=path) from None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], np.ndarray):
        return value[1]
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    return value


def _arrays_of(state: Any, path: Path) -> dict[str, np.ndarray]:
    if not isinstance(state, dict):
        raise BadInput(f"expected a state dict, found {type(state).__name__}", path=path)
    arrays = {}
    for key, value in state.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray):
            value = value[1]
        if isinstance(value, np.ndarray) and key != NAME_TABLE_KEY:
            arrays[str(key)] = value
    if not arrays:
        raise BadInput("no weight arrays in this file", path=path)
    return arrays
