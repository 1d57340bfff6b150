"""Event streams: loading them safely from .npy, single-clip .h5 and raw DSEC events.h5, and validating them.

Owns the `Events` container and everything between an "events" reference (see `samples.py`) and validated
arrays. Must never unpickle with the normal unpickler (event .npy files are pickles, and a pickle can run any
command) and must never import torch: the coordinator imports this package for discovery.
"""
from __future__ import annotations

import importlib
import io
import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

_HDF5PLUGIN_MISSING: Exception | None = None
h5py = None


def _import_h5py():
    """h5py (and hdf5plugin, which registers Blosc/ZSTD/LZ4 and must come first) only when an h5 file is
    read: a worker reading .npy events needs neither."""
    global h5py, _HDF5PLUGIN_MISSING
    if h5py is None:
        try:
            import hdf5plugin  # noqa: F401
        except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
            _HDF5PLUGIN_MISSING = exc
        import h5py as _h5py
        h5py = _h5py
    return h5py

from .errors import InputError

DSEC_SENSOR_SIZE = (640, 480)  # (width, height)
_FIELDS = ("x", "y", "t", "p")


@dataclass
class Events:
    """One event stream. x, y: pixel columns/rows (int32); t: microseconds (int64, sorted); p: uint8 in {0, 1}."""

    x: np.ndarray
    y: np.ndarray
    t: np.ndarray
    p: np.ndarray

    def __len__(self) -> int:
        return int(self.t.shape[0])

    @property
    def duration_us(self) -> int:
        return int(self.t[-1] - self.t[0]) if len(self) else 0

    def __getitem__(self, index) -> "Events":
        return Events(self.x[index], self.y[index], self.t[index], self.p[index])


# ---------------------------------------------------------------------------------------------- safe .npy
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


def _read_npy(path: Path) -> dict:
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


# ---------------------------------------------------------------------------------------------- h5 files
def _missing_filters(path: Path) -> list[str]:
    """Names of the HDF5 filters this file's datasets use that this process cannot decode."""
    missing = []
    try:
        _import_h5py()
        with h5py.File(path, "r") as f:
            def visit(_, obj):
                if isinstance(obj, h5py.Dataset):
                    plist = obj.id.get_create_plist()
                    for i in range(plist.get_nfilters()):
                        code, _, _, name = plist.get_filter(i)
                        if not h5py.h5z.filter_avail(code):
                            missing.append(f"{name.decode(errors='replace') or 'filter'} (id {code})")
            f.visititems(visit)
    except Exception:  # only used to improve an error message
        pass
    return sorted(set(missing))


def _h5_error(path: Path, exc: Exception) -> InputError:
    text = str(exc)
    missing = _missing_filters(path)
    if missing or "filter" in text.lower():
        hint = (f"it is compressed with {', '.join(missing) or 'a filter'} that HDF5 cannot find here (DSEC "
                "uses Blosc/ZSTD). Install hdf5plugin (pip install hdf5plugin); eventspec imports it before "
                "opening event files")
        if _HDF5PLUGIN_MISSING is not None:
            hint += f" (importing it here failed: {_HDF5PLUGIN_MISSING})"
        return InputError(f"{path}: cannot read events: {hint}. HDF5 said: {text}")
    return InputError(f"{path}: cannot read this HDF5 event file ({type(exc).__name__}: {text}). "
                      "Check that it is complete (re-download or re-copy it).")


def _open_h5(path: Path) -> h5py.File:
    _import_h5py()
    if not path.is_file():
        raise InputError(f"{path}: event file not found. Check the path.")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise _h5_error(path, exc) from None


def _h5_group(f: h5py.File, path: Path):
    if "events" in f and isinstance(f["events"], h5py.Group):
        group = f["events"]
    else:
        group = f
    missing = [k for k in _FIELDS if k not in group]
    if missing:
        raise InputError(f"{path}: missing event datasets {missing}; expected events/{{x,y,t,p}} "
                         "(or top-level x, y, t, p). Re-export the events with those names.")
    return group


def _t_offset(f: h5py.File) -> int:
    return int(np.asarray(f["t_offset"][()]).reshape(-1)[0]) if "t_offset" in f else 0


def _read_h5(path: Path) -> dict:
    with _open_h5(path) as f:
        try:
            group = _h5_group(f, path)
            arrays = {k: group[k][()] for k in _FIELDS}
            offset = _t_offset(f)
        except OSError as exc:
            raise _h5_error(path, exc) from None
    if offset:
        arrays["t"] = arrays["t"].astype(np.int64) + offset
    return arrays


def dsec_time_range(path) -> tuple[int, int]:
    """(first, last) absolute event time in microseconds of a raw DSEC events.h5; used by discovery."""
    path = Path(path)
    with _open_h5(path) as f:
        try:
            t = _h5_group(f, path)["t"]
            if t.shape[0] == 0:
                raise InputError(f"{path}: the event stream is empty. Use a DSEC sequence that has events.")
            offset = _t_offset(f)
            return int(t[0]) + offset, int(t[-1]) + offset
        except OSError as exc:
            raise _h5_error(path, exc) from None


def _read_dsec(path: Path, t0_us: int | None, t1_us: int | None) -> dict:
    """Events with absolute time in [t0_us, t1_us), located with ms_to_idx so only the clip is decompressed."""
    with _open_h5(path) as f:
        try:
            group = _h5_group(f, path)
            offset = _t_offset(f)
            n_events = group["t"].shape[0]
            lo, hi = 0, n_events
            if "ms_to_idx" in f and t0_us is not None and t1_us is not None:
                ms_to_idx = f["ms_to_idx"]

                def first_event_at_ms(ms: int) -> int:  # ms_to_idx[m] = first event with t >= 1000*m
                    if ms <= 0:
                        return 0
                    if ms >= ms_to_idx.shape[0]:
                        return n_events
                    return int(ms_to_idx[ms])

                lo = first_event_at_ms(math.floor((t0_us - offset) / 1000))
                hi = max(lo, first_event_at_ms(math.ceil((t1_us - offset) / 1000)))
            t = group["t"][lo:hi].astype(np.int64) + offset
            a = int(np.searchsorted(t, t0_us, "left")) if t0_us is not None else 0
            b = int(np.searchsorted(t, t1_us, "left")) if t1_us is not None else len(t)
            arrays = {k: group[k][lo + a:lo + b] for k in ("x", "y", "p")}
            arrays["t"] = t[a:b]
        except OSError as exc:
            raise _h5_error(path, exc) from None
    return arrays


# ---------------------------------------------------------------------------------------------- validation
def _as_int(values: np.ndarray, name: str, path, dtype) -> np.ndarray:
    values = np.asarray(values).reshape(-1)
    if values.dtype.kind in "iu":
        return values.astype(dtype, copy=False)
    if values.dtype.kind == "f" and np.all(np.isfinite(values)):
        return np.rint(values).astype(dtype)
    raise InputError(f"{path}: event field '{name}' has dtype {values.dtype}; expected integers. "
                     "Re-export the events with integer x, y, t (microseconds) and p.")


def _polarity(p: np.ndarray, path) -> np.ndarray:
    p = np.asarray(p).reshape(-1)
    if p.dtype == bool:
        return p.astype(np.uint8)
    if p.dtype.kind not in "iuf":
        raise InputError(f"{path}: polarity 'p' has dtype {p.dtype}; expected 0/1, -1/1 or bool.")
    if len(p) == 0:
        return p.astype(np.uint8)
    lo, hi = p.min(), p.max()
    if lo >= 0 and hi <= 1 and np.all((p == 0) | (p == 1)):
        return p.astype(np.uint8)
    if lo == -1 and hi <= 1 and np.all((p == -1) | (p == 1)):
        return (p > 0).astype(np.uint8)
    raise InputError(f"{path}: polarity 'p' holds values other than {{0,1}} or {{-1,1}} (range {lo}..{hi}). "
                     "Convert polarity to 0 (negative) / 1 (positive).")


def validate_events(arrays: dict, path, sensor_size=DSEC_SENSOR_SIZE) -> Events:
    """Check a dict of x, y, t, p and return sorted `Events`. sensor_size: (width, height) or None (no check)."""
    missing = [k for k in _FIELDS if k not in arrays]
    if missing:
        raise InputError(f"{path}: event data lacks the keys {missing} (has {sorted(map(str, arrays))}); "
                         "an event file must hold x, y, t and p.")
    lengths = {k: int(np.asarray(arrays[k]).size) for k in _FIELDS}
    if len(set(lengths.values())) != 1:
        raise InputError(f"{path}: x, y, t, p have different lengths {lengths}; the file is truncated or "
                         "was written wrongly. Re-export it.")
    if lengths["t"] == 0:
        raise InputError(f"{path}: the event stream is empty (0 events). Choose a clip (or time window) "
                         "that has events.")
    x = _as_int(arrays["x"], "x", path, np.int32)
    y = _as_int(arrays["y"], "y", path, np.int32)
    t = _as_int(arrays["t"], "t", path, np.int64)
    p = _polarity(arrays["p"], path)
    if x.min() < 0 or y.min() < 0:
        raise InputError(f"{path}: negative pixel coordinates (min x {x.min()}, min y {y.min()}). "
                         "Event coordinates must be pixel indices >= 0.")
    if sensor_size is not None:
        width, height = int(sensor_size[0]), int(sensor_size[1])
        if x.max() >= width or y.max() >= height:
            raise InputError(f"{path}: coordinates outside the {width}x{height} sensor (max x {x.max()}, "
                             f"max y {y.max()}). Use events of a {width}x{height} camera, or give the sample "
                             "its own sensor_size.")
    if len(t) > 1 and np.any(t[1:] < t[:-1]):
        warnings.warn(f"{path}: event timestamps are not sorted; sorting them (stable).", stacklevel=3)
        order = np.argsort(t, kind="stable")
        x, y, t, p = x[order], y[order], t[order], p[order]
    return Events(x=x, y=y, t=t, p=p)


# ---------------------------------------------------------------------------------------------- public
def load_events(ref: dict, *, sensor_size=DSEC_SENSOR_SIZE) -> Events:
    """Load the events a sample's "events" reference points at (kinds "npy", "h5", "dsec"), validated and sorted.

    t0_us / t1_us, when given, keep the events with t0_us <= t < t1_us (absolute time for "dsec",
    i.e. t + t_offset). Raises InputError.
    """
    if not ref:
        raise InputError("this sample has no event data; the draft model needs events. "
                         "Use a layout with event files (see `coordinator make-demo`).")
    kind, path = ref.get("kind"), Path(ref.get("path", ""))
    t0_us, t1_us = ref.get("t0_us"), ref.get("t1_us")
    if kind == "npy":
        arrays = _read_npy(path)
    elif kind == "h5":
        arrays = _read_h5(path)
    elif kind == "dsec":
        arrays = _read_dsec(path, t0_us, t1_us)
    else:
        raise InputError(f"{path}: unknown event reference kind {kind!r}; expected 'npy', 'h5' or 'dsec'.")
    if kind != "dsec" and (t0_us is not None or t1_us is not None) and all(k in arrays for k in _FIELDS):
        t = np.asarray(arrays["t"]).reshape(-1)
        if all(np.asarray(arrays[k]).size == t.size for k in _FIELDS):
            keep = np.ones(t.size, bool)
            if t0_us is not None:
                keep &= t >= t0_us
            if t1_us is not None:
                keep &= t < t1_us
            arrays = {k: np.asarray(arrays[k]).reshape(-1)[keep] for k in _FIELDS}
    return validate_events(arrays, path, sensor_size)


def load_events_file(path, *, sensor_size=None) -> Events:
    """Load a whole .npy or .h5 event file (chosen by suffix). No sensor bound unless sensor_size is given."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        kind = "npy"
    elif suffix in (".h5", ".hdf5"):
        kind = "h5"
    else:
        raise InputError(f"{path}: unknown event file type '{suffix}'; expected .npy or .h5.")
    return load_events({"kind": kind, "path": str(path), "t0_us": None, "t1_us": None}, sensor_size=sensor_size)
