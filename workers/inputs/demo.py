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
# every colour is brighter than the dark background, so every shape fires events (a red or green shape on
# a mid-grey background would be nearly invisible to the event camera)
_COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.25, 0.95),
            "yellow": (0.95, 0.9, 0.1), "white": (1.0, 1.0, 1.0)}
KINDS = ("square", "disc")
WINDOW = (0.0, 0.0, 0.0)
_ROWS = 3                     # the shape moves horizontally in one of three rows
_QUESTIONS = ("What are the key elements in this scene?", "What is this scene about?",
              "Describe the following scene.", "What do you see happening in this scene?")
# The two caption styles of the tiny models (workers/models/tiny_train.py): the video model names colours,
# the event model cannot see them and words some things differently.
STYLES = ("video", "events")
_STYLE_WORDS = {"video": {"small": "small", "large": "large", "moving": "moving", "over": "over"},
                "events": {"small": "little", "large": "big", "moving": "passing", "over": "on"}}
_ROW_WORDS = ("at the top", "in the middle", "at the bottom")


def _make_shapes(rng: np.random.Generator, size: tuple[int, int], duration_s: float) -> list[dict]:
    """One shape, small or large, of one of five colours, moving left or right in one of three rows inside the
    centred square that the models' image processors keep (they resize the short side and crop the centre).
    It has a front (a dark window on the side it heads to), as a vehicle has. One shape, and attributes that
    show in many image patches at once (colour, size, row), keep the scenes learnable by the demo's tiny
    models in minutes on a CPU."""
    width, height = size
    side = min(width, height)
    x_lo = (width - side) / 2
    row = int(rng.integers(0, _ROWS))
    colour = str(rng.choice(list(_COLOURS)))
    big = bool(rng.random() < 0.5)
    radius = float(rng.uniform(0.15, 0.18) if big else rng.uniform(0.07, 0.09)) * side
    speed = float(rng.uniform(0.25, 0.4) * side)  # pixels per second
    lo, hi = x_lo + radius, x_lo + side - 1 - radius
    travel = speed * duration_s
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if travel < hi - lo:       # start where the whole sequence fits without a bounce
        x0 = float(rng.uniform(lo, hi - travel)) if sign > 0 else float(rng.uniform(lo + travel, hi))
    else:
        x0 = float(rng.uniform(lo, hi))
    y0 = (row + 0.5) * height / _ROWS + float(rng.uniform(-0.02, 0.02) * side)
    return [{"kind": "square" if rng.random() < 0.5 else "disc", "colour": colour, "radius": radius, "row": row,
             "size": "large" if big else "small", "x0": x0, "y0": y0, "vx": sign * speed, "vy": 0.0,
             "x_range": (lo, hi)}]


def _bounce(start: float, velocity: float, t_s: float, lo: float, hi: float) -> float:
    span = hi - lo
    u = (start - lo + velocity * t_s) % (2 * span)
    return lo + (u if u <= span else 2 * span - u)


def _heading(shape: dict, t_s: float) -> str:
    """'left' or 'right': the shape's direction at t_s, bounces included."""
    lo, hi = shape["x_range"]
    u = (shape["x0"] - lo + shape["vx"] * t_s) % (2 * (hi - lo))
    forward = u <= hi - lo
    return "right" if (shape["vx"] > 0) == forward else "left"


def describe(shapes: list[dict], t_s: float, style: str = "video") -> str:
    """The scene in one of the two caption styles: size, colour (video only), row; the shape is moving."""
    words = _STYLE_WORDS[style]
    parts = []
    for s in sorted(shapes, key=lambda s: s["row"]):
        colour = f"{s['colour']} " if style == "video" else ""
        parts.append(f"a {words[s['size']]} {colour}shape {_ROW_WORDS[s['row']]} {words['moving']}")
    listed = parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
    return f"The scene shows {listed} {words['over']} a dark background."


def _render(shapes: list[dict], t_s: float, background: np.ndarray, grid: tuple[np.ndarray, np.ndarray]):
    """Float RGB image in [0, 1] of the scene at time t_s."""
    xs, ys = grid
    height = background.shape[0]
    image = background.copy()
    for shape in shapes:
        r = shape["radius"]
        cx = _bounce(shape["x0"], shape["vx"], t_s, *shape["x_range"])
        cy = _bounce(shape["y0"], shape["vy"], t_s, r, height - 1 - r)
        if shape["kind"] == "square":
            mask = (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
        else:
            mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
        image[mask] = _COLOURS[shape["colour"]]
        # like a vehicle, every shape has a front: a dark window on the side it is heading to
        front = cx + (0.55 if _heading(shape, t_s) == "right" else -0.55) * r
        image[mask & (np.abs(xs - front) <= 0.3 * r) & (np.abs(ys - cy) <= 0.45 * r)] = WINDOW
    return image


def _log_luminance(image: np.ndarray) -> np.ndarray:
    return np.log(image @ np.array([0.299, 0.587, 0.114], np.float32) + 0.02)


def simulate(rng: np.random.Generator, size: tuple[int, int], duration_us: int, fps: int):
    """(frames uint8 [n,H,W,3], frame times relative us, events dict x,y,t(relative us),p, shapes)."""
    width, height = size
    shapes = _make_shapes(rng, size, duration_us / 1e6)
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    ramp = (0.08 + 0.06 * xs / max(width - 1, 1))[..., None]
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


def sequence_splits(n_sequences: int) -> list[str]:
    """Split label of each demo sequence: about 60% train, 20% val, 20% test (one each at least) from three
    sequences on; two give train and test, one gives test."""
    if n_sequences >= 3:
        n_test = n_val = max(1, round(0.2 * n_sequences))
        return ["train"] * (n_sequences - n_test - n_val) + ["val"] * n_val + ["test"] * n_test
    return ["train", "test"][2 - n_sequences:]


def simulate_clips(rng: np.random.Generator, n_clips: int, *, size: tuple[int, int] = (160, 120), fps: int = 20,
                   clip_ms: int = 1000, clip_stride_ms: int = 500) -> dict:
    """One simulated sequence just long enough for n_clips clips of clip_ms cut every clip_stride_ms.

    Returns the sequence (frames, frame_times_us, events with relative t, shapes) and its clips: frames inside
    [t0, t1), events with absolute t (as in DSEC-derived clips) and the caption of the scene at the clip's
    middle in both styles.
    """
    duration_us = (clip_ms + (n_clips - 1) * clip_stride_ms) * 1000
    frames, frame_times, events, shapes = simulate(rng, size, duration_us, fps)
    clips = []
    for clip in range(n_clips):
        t0_us = clip * clip_stride_ms * 1000
        t1_us = t0_us + clip_ms * 1000
        keep = (events["t"] >= t0_us) & (events["t"] < t1_us)
        clip_events = {k: v[keep].astype(np.int64) for k, v in events.items()}
        clip_events["t"] = clip_events["t"] + T_OFFSET_US
        middle_s = (t0_us + t1_us) / 2e6
        objects = [{"row": sh["row"], "colour": sh["colour"], "kind": sh["kind"], "size": sh["size"],
                    "heading": _heading(sh, middle_s)} for sh in shapes]
        clips.append({"t0_us": t0_us, "events": clip_events, "objects": objects,
                      "frames": frames[(frame_times >= t0_us) & (frame_times < t1_us)],
                      "captions": {style: describe(shapes, middle_s, style) for style in STYLES}})
    return {"frames": frames, "frame_times_us": frame_times, "events": events, "shapes": shapes, "clips": clips}


def make_demo(out_dir, *, n_sequences: int = 10, n_clips: int | None = None, seed: int = 0,
              size: tuple[int, int] = (160, 120), fps: int = 20, clip_ms: int = 1000,
              clip_stride_ms: int = 500) -> dict:
    """Write demo data under out_dir/dataset (research layout) and out_dir/dsec (raw DSEC); return the paths.

    n_clips clips in total (default two per sequence) are spread over n_sequences sequences, split by
    sequence into train / val / test (`sequence_splits`); each sequence is just long enough for its clips of
    clip_ms cut every clip_stride_ms. The index's answer is the scene's caption in the video style.
    """
    n_clips = 2 * n_sequences if n_clips is None else n_clips
    if n_clips < 1 or n_sequences < 1:
        raise ValueError("make_demo needs n_clips >= 1 and n_sequences >= 1")
    out_dir = Path(out_dir)
    dataset_dir, dsec_dir = out_dir / "dataset", out_dir / "dsec"
    rng = np.random.default_rng(seed)
    n_sequences = min(n_sequences, n_clips)
    clips_per_sequence = [n_clips // n_sequences + (1 if i < n_clips % n_sequences else 0)
                          for i in range(n_sequences)]
    splits = sequence_splits(n_sequences)
    index, sequences, clip_ids, n_events_total = [], [], [], 0
    for seq_number, (n_seq_clips, split) in enumerate(zip(clips_per_sequence, splits)):
        sequence = f"demo_city_{seq_number:02d}_a"
        simulated = simulate_clips(rng, n_seq_clips, size=size, fps=fps, clip_ms=clip_ms,
                                   clip_stride_ms=clip_stride_ms)
        _write_dsec(dsec_dir / sequence, simulated["frames"], simulated["frame_times_us"], simulated["events"])
        sequences.append(sequence)
        for clip, clip_data in enumerate(simulated["clips"]):
            clip_events = dict(clip_data["events"], sequence=sequence,
                               t0_us=np.int64(T_OFFSET_US + clip_data["t0_us"]))
            name = f"{clip:06d}"
            npy = dataset_dir / "event_npy" / sequence / f"{name}.npy"
            npy.parent.mkdir(parents=True, exist_ok=True)
            np.save(npy, np.array(clip_events, dtype=object), allow_pickle=True)
            n_events_total += len(clip_events["t"])
            clip_frames = clip_data["frames"]
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
                                  {"from": "gpt", "value": clip_data["captions"]["video"]}],
                "sensor_size": list(size),
                "captions": clip_data["captions"],      # both styles (the tiny models' answers), for checks
            })
    (dataset_dir / "EventGPT_Instruction_Subset.json").write_text(json.dumps(index, indent=1))
    return {"dataset": str(dataset_dir), "dsec": str(dsec_dir),
            "index": str(dataset_dir / "EventGPT_Instruction_Subset.json"),
            "sequences": sequences, "splits": dict(zip(sequences, splits)), "clips": clip_ids,
            "n_events": n_events_total}
