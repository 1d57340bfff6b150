"""Reading event .npy files safely: a dict of numpy arrays pickled in a 0-d object array, or a structured array.

Owns the restricted unpickler. Must never unpickle with the normal unpickler (event .npy files are pickles,
and a pickle can run any command) and must never import torch. Validation is `events.py`'s job.
"""
from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from .errors import InputError

# The only globals a pickled dict of numpy arrays and numpy scalars needs. numpy 1.x writes numpy.core.*,
# numpy 2.x numpy._core.*; both resolve to whichever this numpy has.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # protocol-2 pickles encode bytes as latin-1 text through this
}


def _numpy_core(submodule: str):
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:  # numpy < 2
        return importlib.import_module(f"numpy.core.{submodule}")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes, scalars and plain Python containers; refuses every other global."""

    def __init__(self, file, source: Path):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise InputError(
                f"{self._source}: refused to load: its pickle asks for '{module}.{name}', which an event file "
                "never needs (it could run code on this machine). Only dicts of numpy arrays are accepted; "
                "re-save the events with numpy, or check where this file came from.")
        if module == "numpy":
            return getattr(np, name)
        if module == "_codecs":
            import _codecs
            return _codecs.encode
        return getattr(_numpy_core(module.rsplit(".", 1)[1]), name)


def read_npy(path: Path) -> dict:
    """The arrays of an event .npy: a 0-d object array holding a dict, or a structured array with x, y, t, p."""
    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, _, dtype = npy_format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            if dtype.hasobject:
                payload = _NumpyOnlyUnpickler(io.BytesIO(f.read()), path).load()
            else:
                f.seek(0)
                payload = npy_format.read_array(f, allow_pickle=False)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: event file not found. Check the path (and the dataset's index).") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npy event file ({type(exc).__name__}: {exc}). "
                         "Re-export it with numpy.save.") from None

    if isinstance(payload, np.ndarray) and payload.dtype.hasobject and payload.size == 1:
        payload = payload.reshape(()).item()
    if isinstance(payload, np.ndarray) and payload.dtype.names:
        return {name: payload[name] for name in payload.dtype.names}
    if isinstance(payload, dict):
        return payload
    raise InputError(f"{path}: expected a dict with keys x, y, t, p (or a structured array with those fields), "
                     f"found {type(payload).__name__}"
                     f"{' of shape ' + str(payload.shape) if isinstance(payload, np.ndarray) else ''}. "
                     "Save the events as numpy.save(path, {'x': x, 'y': y, 't': t, 'p': p}).")
