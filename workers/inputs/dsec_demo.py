"""DSEC-size demo data for benchmarks (`coordinator make-demo --profile dsec`): input loading that costs in
a worker what it costs users of the research dataset.

Clips in the research-dataset layout (`EventGPT_Instruction_Subset.json`, `event_npy/<seq>/<clip>.npy`,
`mp4/<seq>/<clip>.mp4`) at DSEC's sizes: events on the 640×480 sensor with int64 x/y/t/p (as in DSEC-derived
clips, t in absolute microseconds) at a few hundred thousand to a few million events a second (the clips'
rates are spaced geometrically over `rate_range`, so any set of clips spans it), and 20 fps video at DSEC's
1440×1080 image size, H.264 in an mp4 (8+ frames per clip from 400 ms on).

Events are sampled rather than simulated pixel by pixel, to stay fast at millions of events: the scene (a
textured road panning sideways, as under ego-motion, plus moving shapes) is rendered in log intensity every
`slice_us`; that slice's events fall on pixels in proportion to how much their log intensity changed, with
the sign of the change as polarity, at exactly the clip's rate. Deterministic for a seed. Never imports torch.
"""
from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

SENSOR_SIZE = (640, 480)            # DSEC event camera (width, height)
VIDEO_SIZE = (1440, 1080)           # DSEC rectified RGB images
RATE_RANGE = (3e5, 3e6)             # events per second
T_OFFSET_US = 50_000_000            # clips carry absolute time, as in DSEC-derived clips
_QUESTIONS = ("What are the key elements in this scene?", "What is the layout of the road in the scene?",
              "What type of vehicles are present in the scene and how are they positioned?",
              "Describe the following scene.")


class _Scene:
    """Log intensity and RGB of a panning textured road with a few moving rectangles, at sensor size."""

    def __init__(self, rng: np.random.Generator, size: tuple[int, int], duration_s: float):
        self.width, self.height = size
        self.pan_px_s = float(rng.uniform(120, 260)) * (1 if rng.random() < 0.5 else -1)
        # the road texture once, on a canvas wide enough for the whole pan; each instant is a window of it
        margin = int(abs(self.pan_px_s) * duration_s) + 2
        ys, us = np.mgrid[0:self.height, 0:self.width + margin].astype(np.float32)
        if self.pan_px_s < 0:
            us -= margin
        road = 0.25 * ys / self.height                # lighter towards the bottom, like a road
        for _ in range(6):
            fx, fy, phase, amp = rng.uniform(0.01, 0.08), rng.uniform(0.005, 0.05), rng.uniform(0, 6.3), rng.uniform(0.08, 0.25)
            road += np.float32(amp) * np.sin(np.float32(fx) * us + np.float32(fy) * ys + np.float32(phase))
        self.road, self.margin = road, margin
        self.cars = [{"x0": float(rng.uniform(0, self.width)), "y": float(rng.uniform(0.45, 0.85) * self.height),
                      "w": float(rng.uniform(50, 120)), "h": float(rng.uniform(30, 60)),
                      "vx": float(rng.uniform(-300, 300)), "level": float(rng.uniform(-0.9, 0.9)),
                      "colour": tuple(float(c) for c in rng.uniform(0.1, 0.95, 3))} for _ in range(3)]

    def _boxes(self, t_s: float):
        for car in self.cars:
            x = (car["x0"] + car["vx"] * t_s) % (self.width + car["w"]) - car["w"]
            yield car, (slice(max(0, int(car["y"] - car["h"] / 2)), min(self.height, int(car["y"] + car["h"] / 2))),
                        slice(max(0, int(x)), max(0, min(self.width, int(x + car["w"])))))

    def log_intensity(self, t_s: float) -> np.ndarray:
        shift = int(round(self.pan_px_s * t_s))
        start = shift if self.pan_px_s >= 0 else self.margin + shift
        start = min(max(0, start), self.margin)
        image = self.road[:, start:start + self.width].copy()
        for car, box in self._boxes(t_s):
            image[box] = car["level"]
        return image

    def rgb(self, t_s: float) -> np.ndarray:
        grey = np.clip(0.5 + 0.6 * self.log_intensity(t_s), 0, 1)
        image = np.repeat(grey[..., None], 3, axis=2)
        for car, box in self._boxes(t_s):
            image[box] = car["colour"]
        return (image * 255).astype(np.uint8)


def _events(scene: _Scene, rng: np.random.Generator, duration_us: int, rate_per_s: float, slice_us: int) -> dict:
    xs, ys, ts, ps = [], [], [], []
    previous = scene.log_intensity(0.0)
    n_total = int(round(rate_per_s * duration_us / 1e6))
    n_slices = max(1, duration_us // slice_us)
    for i in range(n_slices):
        t1 = (i + 1) * slice_us
        current = scene.log_intensity(t1 / 1e6)
        change = (current - previous).ravel()
        previous = current
        n = n_total * (i + 1) // n_slices - n_total * i // n_slices
        weight = np.abs(change) + 1e-4             # a little background noise everywhere
        cdf = np.cumsum(weight)
        draws = np.sort(rng.random(n, dtype=np.float32)) * cdf[-1]     # sorted: searchsorted walks the cdf once
        pixels = np.searchsorted(cdf, draws, side="right").clip(0, change.size - 1)
        xs.append(pixels % scene.width)
        ys.append(pixels // scene.width)
        ts.append(np.sort(rng.integers(t1 - slice_us, t1, n)))
        ps.append((change[pixels] > 0).astype(np.int64))
    return {"x": np.concatenate(xs).astype(np.int64), "y": np.concatenate(ys).astype(np.int64),
            "t": np.concatenate(ts).astype(np.int64), "p": np.concatenate(ps).astype(np.int64)}


def _write_mp4(path: Path, frames: list[np.ndarray], fps: int) -> None:
    import av   # PyAV only where mp4 files are written

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "20", "preset": "ultrafast"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def clip_rates(n_clips: int, rate_range: tuple[float, float] = RATE_RANGE) -> list[float]:
    """Event rates of the clips, spaced geometrically from the low to the high end of `rate_range`."""
    lo, hi = rate_range
    if not 0 < lo <= hi:
        raise ValueError(f"rate_range {rate_range}: need 0 < low <= high events per second")
    if n_clips == 1:
        return [math.sqrt(lo * hi)]
    return [lo * (hi / lo) ** (i / (n_clips - 1)) for i in range(n_clips)]


def make_dsec_demo(out_dir, *, n_clips: int = 4, seed: int = 0, clip_ms: int = 1000, fps: int = 20,
                   rate_range: tuple[float, float] = RATE_RANGE, video_size: tuple[int, int] = VIDEO_SIZE,
                   n_sequences: int = 2, slice_us: int = 10_000) -> dict:
    """Write DSEC-size clips under out_dir/dataset; return the paths, the clips and their event rates."""
    if n_clips < 1 or n_sequences < 1 or clip_ms < 1 or fps < 1:
        raise ValueError("make_dsec_demo needs n_clips, n_sequences, clip_ms and fps >= 1")
    root = Path(out_dir) / "dataset"
    rng = np.random.default_rng(seed)
    rates = clip_rates(n_clips, rate_range)
    duration_us = clip_ms * 1000
    n_frames = max(1, duration_us * fps // 1_000_000)
    index, clips, n_events = [], [], 0
    for i, rate in enumerate(rates):
        sequence = f"dsec_demo_{i % n_sequences:02d}_a"
        name = f"{i // n_sequences:06d}"
        scene = _Scene(rng, SENSOR_SIZE, duration_us / 1e6)
        events = _events(scene, rng, duration_us, rate, slice_us)
        t0_us = T_OFFSET_US + i * duration_us
        events["t"] += t0_us
        npy = root / "event_npy" / sequence / f"{name}.npy"
        npy.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(events, sequence=sequence, t0_us=np.int64(t0_us))
        np.save(npy, np.array(payload, dtype=object), allow_pickle=True)    # the research dataset's format
        frames = [np.asarray(Image.fromarray(scene.rgb(f / fps)).resize(video_size, Image.BILINEAR))
                  for f in range(n_frames)]
        _write_mp4(root / "mp4" / sequence / f"{name}.mp4", frames, fps)
        clip_id = f"{sequence}_{name}"
        clips.append({"id": clip_id, "events": int(len(events["t"])), "rate_per_s": rate, "frames": n_frames})
        n_events += len(events["t"])
        index.append({"id": clip_id, "split": "test", "event_data": f"{sequence}/{name}.npy",
                      "video_data": f"{sequence}/{name}",
                      "conversations": [{"from": "human", "value": f"<event>\n{_QUESTIONS[i % len(_QUESTIONS)]}"},
                                        {"from": "gpt", "value": "A road scene (synthetic DSEC-size demo)."}],
                      "sensor_size": list(SENSOR_SIZE)})
    (root / "EventGPT_Instruction_Subset.json").write_text(json.dumps(index, indent=1))
    return {"dataset": str(root), "index": str(root / "EventGPT_Instruction_Subset.json"), "clips": clips,
            "n_events": n_events, "video_size": list(video_size), "sensor_size": list(SENSOR_SIZE)}
