"""Event streams: the `Events` container, validating x/y/t/p arrays, and loading the events a sample refers to.

Owns everything between an "events" reference (see `samples.py`) and validated, sorted arrays; the file
formats are read by `events_npy.py` (safe .npy, never the normal unpickler) and `events_h5.py` (.h5 and raw
DSEC). Must never import torch: the coordinator imports this package for discovery.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .events_h5 import FIELDS as _FIELDS
from .events_h5 import dsec_time_range, read_dsec, read_h5
from .events_npy import read_npy

DSEC_SENSOR_SIZE = (640, 480)  # (width, height)


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
        arrays = read_npy(path)
    elif kind == "h5":
        arrays = read_h5(path)
    elif kind == "dsec":
        arrays = read_dsec(path, t0_us, t1_us)
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


__all__ = ["DSEC_SENSOR_SIZE", "Events", "dsec_time_range", "load_events", "load_events_file", "validate_events"]
