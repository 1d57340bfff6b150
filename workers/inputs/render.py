"""Event images exactly as the official EventGPT code draws them, vectorised with numpy.

Owns the events -> list of RGB uint8 images step (before the CLIP image processor, which the draft worker
applies). Must stay pixel-identical to the official per-event loop and must never import torch.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError
from .events import Events

MAX_SIDE = 8192                          # pixels: larger coordinates are not a camera's, and would allocate GBs
BLUE = np.array([0, 0, 255], np.uint8)  # polarity 0
RED = np.array([255, 0, 0], np.uint8)   # any other polarity


def _paint(x: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """White canvas of (max y + 1, max x + 1); each event painted in order, the last one at a pixel wins."""
    height, width = int(y.max()) + 1, int(x.max()) + 1
    canvas = np.full((height, width, 3), 255, np.uint8)
    pixel = y.astype(np.int64) * width + x.astype(np.int64)
    # numpy does not promise which of several writes to one index lands, so keep each pixel's last event
    # explicitly: the first occurrence in the reversed stream is the last one in time order.
    _, first_in_reversed = np.unique(pixel[::-1], return_index=True)
    last = len(pixel) - 1 - first_in_reversed
    canvas.reshape(-1, 3)[pixel[last]] = np.where((p[last] == 0)[:, None], BLUE, RED)
    return canvas


def render_event_images(events: Events, n_frames: int = 5, window_ms: float | None = None) -> list[np.ndarray]:
    """Split the stream into n_frames chunks of equal event count (the last takes the remainder) and paint each.

    window_ms keeps only the events of the last window_ms milliseconds of the stream first. Each image is
    uint8 H x W x 3 RGB, its size set by that chunk's largest coordinates. Raises InputError when there are
    fewer events than frames or a coordinate would make an image over MAX_SIDE pixels a side (checked before
    anything is allocated).
    """
    if n_frames < 1:
        raise InputError(f"--event-frames must be at least 1 (got {n_frames}).")
    if window_ms is not None:
        if window_ms <= 0:
            raise InputError(f"--event-window-ms must be positive (got {window_ms}).")
        if len(events):
            start_us = events.t[-1] - window_ms * 1000.0
            events = events[int(np.searchsorted(events.t, start_us, "left")):]
    n_events = len(events)
    if n_events < n_frames:
        window = f" in the last {window_ms} ms" if window_ms is not None else ""
        raise InputError(f"only {n_events} events{window}, fewer than the {n_frames} event frames asked for; "
                         "use a longer clip or window, or fewer event frames.")
    width, height = int(events.x.max()) + 1, int(events.y.max()) + 1
    if width > MAX_SIDE or height > MAX_SIDE:
        raise InputError(f"event coordinates reach x = {width - 1}, y = {height - 1}: the image would be "
                         f"{width}x{height} pixels, more than the {MAX_SIDE} px a side this renderer draws. These are "
                         "not pixel coordinates of an event camera; check the file's x and y columns.")
    chunk = n_events // n_frames
    bounds = [i * chunk for i in range(n_frames)] + [n_events]
    return [_paint(events.x[a:b], events.y[a:b], events.p[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
