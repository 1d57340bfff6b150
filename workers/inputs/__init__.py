"""Input side of eventspec: discovering samples and loading events and video frames, without torch."""
from .errors import InputError
from .events import Events, load_events, load_events_file, validate_events
from .render import render_event_images
from .sample_inputs import load_sample_inputs
from .samples import (DEFAULT_QUESTION, INPUT_FORMATS, QUESTION_SETS, TOP10_QUESTIONS, detect_layout,
                      discover_samples)
from .video import load_video_frames, sample_frame_indices

__all__ = [
    "DEFAULT_QUESTION", "INPUT_FORMATS", "QUESTION_SETS", "TOP10_QUESTIONS", "Events", "InputError",
    "detect_layout", "discover_samples", "load_events", "load_events_file", "load_sample_inputs",
    "load_video_frames", "make_demo", "render_event_images", "sample_frame_indices", "validate_events",
]


def __getattr__(name):
    if name == "make_demo":           # PyAV and h5py only where demo data is written
        from .demo import make_demo
        return make_demo
    raise AttributeError(name)
