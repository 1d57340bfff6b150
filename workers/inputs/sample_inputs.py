"""One sample's model inputs, read in the worker that needs them: event images for the draft, video frames
for the target. Samples come from discovery (`samples.py`) as dicts of references. Never imports torch.
"""
from __future__ import annotations

from .errors import InputError
from .events import DSEC_SENSOR_SIZE, load_events
from .render import render_event_images
from .video import load_video


def load_sample_inputs(sample: dict, role: str, *, event_frames: int = 5, event_window_ms: float | None = None,
                       video_frames: int = 8) -> dict:
    """Model inputs for one sample. role "draft": event images; role "target": video frames. Raises InputError."""
    sample_id = sample.get("sample_id", "?")
    try:
        if role == "draft":
            sensor_size = sample.get("sensor_size", DSEC_SENSOR_SIZE)
            events = load_events(sample.get("events"), sensor_size=sensor_size)
            try:
                images = render_event_images(events, event_frames, event_window_ms)
            except InputError as exc:
                raise InputError(f"{sample['events'].get('path')}: {exc}") from None
            info = {"n_events": len(events), "events_duration_us": events.duration_us,
                    "event_image_shapes": [list(im.shape) for im in images]}
            return {"event_images": images, "n_events": len(events), "info": info}
        if role == "target":
            frames, info = load_video(sample.get("video"), video_frames)
            return {"video_frames": frames, "info": info}
    except InputError as exc:
        raise InputError(f"sample {sample_id}: {exc}") from None
    raise ValueError(f"role must be 'draft' or 'target', not {role!r}")
