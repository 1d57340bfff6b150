"""Reading event HDF5 files: single-clip .h5 (events/{x,y,t,p} or top-level x, y, t, p) and raw DSEC
events.h5 (a time window located through ms_to_idx, so only the clip is decompressed).

Owns the lazy h5py/hdf5plugin import and the error that says which compression filter is missing. Never
imports torch. Validation is `events.py`'s job.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import InputError

FIELDS = ("x", "y", "t", "p")  # the four arrays of every event stream

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
    missing = [k for k in FIELDS if k not in group]
    if missing:
        raise InputError(f"{path}: missing event datasets {missing}; expected events/{{x,y,t,p}} "
                         "(or top-level x, y, t, p). Re-export the events with those names.")
    return group


def _t_offset(f: h5py.File) -> int:
    return int(np.asarray(f["t_offset"][()]).reshape(-1)[0]) if "t_offset" in f else 0


def read_h5(path: Path) -> dict:
    with _open_h5(path) as f:
        try:
            group = _h5_group(f, path)
            arrays = {k: group[k][()] for k in FIELDS}
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


def read_dsec(path: Path, t0_us: int | None, t1_us: int | None) -> dict:
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
