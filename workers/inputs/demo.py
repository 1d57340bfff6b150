"""Small synthetic demo data in both real layouts: the research dataset and raw DSEC sequences.

A few coloured shapes move over a static background. Video frames are rendered at `fps`; events come from a
simple DVS model on sub-frames (a pixel fires when its log intensity moved by more than a contrast threshold
since its last event), with microsecond timestamps. Each sequence is simulated once and written twice: as a
raw DSEC sequence (Blosc/ZSTD events.h5 + rectified PNGs + timestamps.txt) and cut into overlapping clips for
the research dataset layout (event_npy/, mp4/, video/, event_image/, the JSON index). Kept small so tests and
CI stay fast. Must never import torch.
"""
from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import av
import h5py
import numpy as np
from PIL import Image

from .events import Events
from .render import render_event_images

T_OFFSET_US = 10_000_000      # DSEC stores event t relative to t_offset; images use absolute time
CONTRAST_THRESHOLD = 0.25     # log-intensity step that makes a pixel fire
SUBFRAMES_PER_FRAME = 2       # event simulation runs at fps * this
NOISE_EVENTS_PER_SUBFRAME = 2
_COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.25, 0.95),
            "yellow": (0.95, 0.9, 0.1), "white": (1.0, 1.0, 1.0)}
_QUESTIONS = ("What are the key elements in this scene?", "What is this scene about?",
              "Describe the following scene.", "What do you see happening in this scene?")


def _make_shapes(rng: np.random.Generator, size: tuple[int, int], n_shapes: int = 3) -> list[dict]:
    width, height = size
    scale = min(width, height)
    shapes = []
    for colour in rng.choice(list(_COLOURS), n_shapes, replace=False):
        radius = float(rng.uniform(0.07, 0.12) * scale)
        speed = rng.uniform(0.4, 0.8) * scale  # pixels per second
        angle = rng.uniform(0, 2 * math.pi)
        shapes.append({"kind": str(rng.choice(["square", "disc"])), "colour": str(colour), "radius": radius,
                       "x0": float(rng.uniform(radius, width - radius)),
                       "y0": float(rng.uniform(radius, height - radius)),
                       "vx": float(speed * math.cos(angle)), "vy": float(speed * math.sin(angle))})
    return shapes


def _bounce(start: float, velocity: float, t_s: float, lo: float, hi: float) -> float:
    span = hi - lo
    u = (start - lo + velocity * t_s) % (2 * span)
    return lo + (u if u <= span else 2 * span - u)


def _render(shapes: list[dict], t_s: float, background: np.ndarray, grid: tuple[np.ndarray, np.ndarray]):
    """Float RGB image in [0, 1] of the scene at time t_s."""
    xs, ys = grid
    height, width = background.shape[:2]
    image = background.copy()
    for shape in shapes:
        r = shape["radius"]
        cx = _bounce(shape["x0"], shape["vx"], t_s, r, width - 1 - r)
        cy = _bounce(shape["y0"], shape["vy"], t_s, r, height - 1 - r)
        if shape["kind"] == "square":
            mask = (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
        else:
            mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
        image[mask] = _COLOURS[shape["colour"]]
    return image


def _log_luminance(image: np.ndarray) -> np.ndarray:
    return np.log(image @ np.array([0.299, 0.587, 0.114], np.float32) + 0.02)


def _simulate(rng: np.random.Generator, size: tuple[int, int], duration_us: int, fps: int):
    """(frames uint8 [n,H,W,3], frame times relative us, events dict x,y,t(relative us),p, shapes)."""
    width, height = size
    shapes = _make_shapes(rng, size)
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    ramp = (0.35 + 0.2 * xs / max(width - 1, 1))[..., None]
    background = np.broadcast_to(ramp, (height, width, 3)).astype(np.float32) * np.array([1.0, 0.95, 0.9],
                                                                                         np.float32)
    frame_us = 1_000_000 // fps
    step_us = frame_us // SUBFRAMES_PER_FRAME
    n_steps = duration_us // step_us + 1
    frames, frame_times = [], []
    reference = None
    xs_out, ys_out, ts_out, ps_out = [], [], [], []
    for step in range(n_steps):
        t_us = step * step_us
        image = _render(shapes, t_us / 1e6, background, (xs, ys))
        if step % SUBFRAMES_PER_FRAME == 0:
            frames.append(np.round(image * 255).astype(np.uint8))
            frame_times.append(t_us)
        log_lum = _log_luminance(image)
        if reference is None:
            reference = log_lum
            continue
        change = log_lum - reference
        fy, fx = np.nonzero(np.abs(change) >= CONTRAST_THRESHOLD)
        polarity = (change[fy, fx] > 0).astype(np.uint8)
        reference[fy, fx] = log_lum[fy, fx]
        noise_x = rng.integers(0, width, NOISE_EVENTS_PER_SUBFRAME)
        noise_y = rng.integers(0, height, NOISE_EVENTS_PER_SUBFRAME)
        fx = np.concatenate([fx, noise_x])
        fy = np.concatenate([fy, noise_y])
        polarity = np.concatenate([polarity, rng.integers(0, 2, NOISE_EVENTS_PER_SUBFRAME).astype(np.uint8)])
        times = t_us - step_us + rng.integers(1, step_us + 1, len(fx))  # inside (previous step, this step]
        order = np.argsort(times, kind="stable")
        xs_out.append(fx[order])
        ys_out.append(fy[order])
        ts_out.append(times[order])
        ps_out.append(polarity[order])
    events = {"x": np.concatenate(xs_out).astype(np.uint16), "y": np.concatenate(ys_out).astype(np.uint16),
              "t": np.concatenate(ts_out).astype(np.int64), "p": np.concatenate(ps_out).astype(np.uint8)}
    return np.stack(frames), np.array(frame_times, np.int64), events, shapes


def _describe(shapes: list[dict]) -> str:
    parts = [f"a {s['colour']} {s['kind']} moving {'right' if s['vx'] > 0 else 'left'}" for s in shapes]
    return f"The scene shows {', '.join(parts[:-1])} and {parts[-1]} over a grey background."


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, compress_level=1)


def _write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def _write_dsec(seq_dir: Path, frames: np.ndarray, frame_times_us: np.ndarray, events: dict) -> Path:
    import hdf5plugin  # here, not at import time: the package must import (and explain) without it

    events_file = seq_dir / "events" / "left" / "events.h5"
    events_file.parent.mkdir(parents=True, exist_ok=True)
    t = events["t"].astype(np.uint32)
    ms_to_idx = np.searchsorted(t, 1000 * np.arange(int(t[-1]) // 1000 + 2), "left").astype(np.uint64)
    blosc_zstd = hdf5plugin.Blosc(cname="zstd", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)
    with h5py.File(events_file, "w") as f:
        for name, values in (("x", events["x"]), ("y", events["y"]), ("t", t), ("p", events["p"])):
            f.create_dataset(f"events/{name}", data=values, chunks=True, **blosc_zstd)
        f.create_dataset("ms_to_idx", data=ms_to_idx, chunks=True, **blosc_zstd)
        f.create_dataset("t_offset", data=np.int64(T_OFFSET_US))
    for n, image in enumerate(frames):
        _write_png(seq_dir / "images" / "left" / "rectified" / f"{n:06d}.png", image)
    (seq_dir / "images" / "timestamps.txt").write_text(
        "".join(f"{T_OFFSET_US + int(t_us)}\n" for t_us in frame_times_us))
    return events_file


def make_demo(out_dir, *, n_clips: int = 4, seed: int = 0, size: tuple[int, int] = (160, 120),
              n_sequences: int = 2, fps: int = 20, clip_ms: int = 1000, clip_stride_ms: int = 500) -> dict:
    """Write demo data under out_dir/dataset (research layout) and out_dir/dsec (raw DSEC); return the paths.

    n_clips clips in total are spread over n_sequences sequences (the first sequence is split "train", the
    others "test"); each sequence is just long enough for its clips of clip_ms cut every clip_stride_ms.
    """
    if n_clips < 1 or n_sequences < 1:
        raise ValueError("make_demo needs n_clips >= 1 and n_sequences >= 1")
    out_dir = Path(out_dir)
    dataset_dir, dsec_dir = out_dir / "dataset", out_dir / "dsec"
    rng = np.random.default_rng(seed)
    n_sequences = min(n_sequences, n_clips)
    clips_per_sequence = [n_clips // n_sequences + (1 if i < n_clips % n_sequences else 0)
                          for i in range(n_sequences)]
    index, sequences, clip_ids, n_events_total = [], [], [], 0
    for seq_number, n_seq_clips in enumerate(clips_per_sequence):
        sequence = f"demo_city_{seq_number:02d}_a"
        split = "train" if seq_number == 0 and n_sequences > 1 else "test"
        duration_us = (clip_ms + (n_seq_clips - 1) * clip_stride_ms) * 1000
        frames, frame_times, events, shapes = _simulate(rng, size, duration_us, fps)
        _write_dsec(dsec_dir / sequence, frames, frame_times, events)
        sequences.append(sequence)
        description = _describe(shapes)
        for clip in range(n_seq_clips):
            t0_us = clip * clip_stride_ms * 1000
            t1_us = t0_us + clip_ms * 1000
            keep = (events["t"] >= t0_us) & (events["t"] < t1_us)
            clip_events = {k: v[keep].astype(np.int64) for k, v in events.items()}
            clip_events["t"] = clip_events["t"] + T_OFFSET_US  # absolute time, as in DSEC-derived clips
            clip_events["sequence"] = sequence
            clip_events["t0_us"] = np.int64(T_OFFSET_US + t0_us)
            name = f"{clip:06d}"
            npy = dataset_dir / "event_npy" / sequence / f"{name}.npy"
            npy.parent.mkdir(parents=True, exist_ok=True)
            np.save(npy, np.array(clip_events, dtype=object), allow_pickle=True)
            n_events_total += int(keep.sum())
            clip_frames = frames[(frame_times >= t0_us) & (frame_times < t1_us)]
            _write_mp4(dataset_dir / "mp4" / sequence / f"{name}.mp4", clip_frames, fps)
            for n, image in enumerate(clip_frames):
                _write_png(dataset_dir / "video" / sequence / name / f"{n:06d}.png", image)
            rendered = render_event_images(Events(clip_events["x"], clip_events["y"], clip_events["t"],
                                                  clip_events["p"].astype(np.uint8)), 5)
            for n, image in enumerate(rendered):
                _write_png(dataset_dir / "event_image" / sequence / f"{name}_{n}.png", image)
            clip_id = f"{sequence}_{name}"
            clip_ids.append(clip_id)
            question = _QUESTIONS[len(index) % len(_QUESTIONS)]
            index.append({
                "id": clip_id, "split": split,
                "event_data": f"{sequence}/{name}.npy", "video_data": f"{sequence}/{name}",
                "event_image": [f"{sequence}/{name}_{n}.png" for n in range(5)],
                "event_image_1f": [f"{sequence}/{name}_4.png"],
                "conversations": [{"from": "human", "value": f"<event>\n{question}"},
                                  {"from": "gpt", "value": description}],
                "sensor_size": list(size),
            })
    (dataset_dir / "EventGPT_Instruction_Subset.json").write_text(json.dumps(index, indent=1))
    return {"dataset": str(dataset_dir), "dsec": str(dsec_dir),
            "index": str(dataset_dir / "EventGPT_Instruction_Subset.json"),
            "sequences": sequences, "clips": clip_ids, "n_events": n_events_total}
