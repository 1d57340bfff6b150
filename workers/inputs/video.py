"""Video frames for Video-LLaVA: n frames sampled uniformly from a clip's mp4 (PyAV) or its PNG frames.

Owns "video" reference -> uint8 [n, H, W, 3] RGB. Resizing and normalisation belong to the target worker's
processor. Must never import torch.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError


def sample_frame_indices(n_source: int, n_frames: int = 8) -> list[int]:
    """`linspace(0, n_source-1, n_frames)` rounded; a shorter clip gives all its frames, then its last repeated."""
    if n_source >= n_frames:
        return [int(i) for i in np.round(np.linspace(0, n_source - 1, n_frames))]
    return list(range(n_source)) + [n_source - 1] * (n_frames - n_source)


def _decode_mp4(path: Path) -> list[np.ndarray]:
    if not path.is_file():
        raise InputError(f"{path}: video not found. Check the path (mp4/<video_data>.mp4 in the dataset layout).")
    try:
        import av  # only mp4 needs PyAV; frame folders do not
    except ImportError:
        raise InputError(f"{path}: reading mp4 needs PyAV (pip install av), which is not installed here; "
                         "install it or give the clip's PNG frames instead.") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path}: this file has no video stream. Re-encode the clip as an mp4 video.")
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except InputError:
        raise
    except Exception as exc:  # PyAV raises av.error.* (subclasses of OSError/ValueError) for broken files
        raise InputError(f"{path}: cannot decode this video ({type(exc).__name__}: {exc}); the file is corrupt "
                         "or not a video. Re-encode or re-copy it, or use the clip's PNG frames.") from None
    if not frames:
        raise InputError(f"{path}: the video has no decodable frames. Re-encode the clip.")
    return frames


def _frame_paths(ref: dict) -> list[Path]:
    if ref.get("frame_paths"):
        return [Path(p) for p in ref["frame_paths"]]
    folder = Path(ref.get("path", ""))
    if not folder.is_dir():
        raise InputError(f"{folder}: frame folder not found. Check the path.")
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise InputError(f"{folder}: no .png frames in this folder. Put the clip's frames there as NNNNNN.png.")
    return paths


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"{path}: video frame not found. Check the frame folder.") from None
    except Exception as exc:
        raise InputError(f"{path}: cannot read this frame ({type(exc).__name__}: {exc}). Re-export it as PNG.") \
            from None


def load_video(ref: dict | None, n_frames: int = 8) -> tuple[np.ndarray, dict]:
    """(frames [n_frames, H, W, 3] uint8, info) for a "video" reference; info says what was read."""
    if not ref:
        raise InputError("this sample has no video; the target model needs one. "
                         "Use a layout with mp4 files or frame folders (see `coordinator make-demo`).")
    kind, path = ref.get("kind"), Path(ref.get("path", ""))
    if kind == "mp4":
        decoded = _decode_mp4(path)
        n_source = len(decoded)
        frames = [decoded[i] for i in sample_frame_indices(n_source, n_frames)]
    elif kind == "frames":
        paths = _frame_paths(ref)
        n_source = len(paths)
        frames = [_read_png(paths[i]) for i in sample_frame_indices(n_source, n_frames)]
    else:
        raise InputError(f"{path}: unknown video reference kind {kind!r}; expected 'mp4' or 'frames'.")
    if n_source < n_frames:
        warnings.warn(f"{path}: only {n_source} video frames, fewer than {n_frames}; repeating the last frame.",
                      stacklevel=2)
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise InputError(f"{path}: the clip's frames have different sizes {sorted(shapes)}; "
                         "all frames of a clip must have one size.")
    video = np.stack(frames).astype(np.uint8, copy=False)
    return video, {"source_frames": n_source, "video_shape": list(video.shape)}


def load_video_frames(ref: dict, n_frames: int = 8) -> np.ndarray:
    """[n_frames, H, W, 3] uint8 RGB frames sampled uniformly from an "mp4" or "frames" reference."""
    return load_video(ref, n_frames)[0]
