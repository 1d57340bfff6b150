"""Finding samples in an input folder (coordinator side); `sample_inputs.py` loads one sample's model inputs
(worker side).

Discovery knows the three layouts — the research dataset (`EventGPT_Instruction_Subset.json` + `event_npy/`
+ `mp4/` / `video/`), a single clip folder (`events.npy|h5` + `video.mp4|frames/`), raw DSEC sequences
(`events/left/events.h5` + `images/`) — plus a bare "folder" layout for fake backends. A sample is a plain,
msgpack-able dict of references; nothing heavy is read at discovery. Must never import torch: the coordinator
imports this module.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from .errors import InputError
from .events import DSEC_SENSOR_SIZE, dsec_time_range

DATASET_INDEX = "EventGPT_Instruction_Subset.json"
DEFAULT_QUESTION = "What are the key elements in this scene?"
TOP10_QUESTIONS = (
    "What are the key elements in this scene?",
    "Can you elaborate on the elements of the scene provided?",
    "What is this scene about?",
    "What is the layout of the road in the scene?",
    "What type of vehicles are present in the scene and how are they positioned?",
    "What do you think is going on in this scene?",
    "What elements are present in the scene?",
    "What do you see happening in this scene?",
    "Describe the following scene.",
    "What types of vehicles are present in the scene and how are they positioned?",
)
INPUT_FORMATS = ("auto", "dataset", "clip", "dsec", "folder")
QUESTION_SETS = ("dataset", "top10")


# ---------------------------------------------------------------------------------------------- layouts
def _subdirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _is_dsec_sequence(folder: Path) -> bool:
    return (folder / "events" / "left" / "events.h5").is_file()


def _is_clip(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("events.npy", "events.h5", "video.mp4", "frames"))


def detect_layout(root: Path) -> str | None:
    """'dataset', 'dsec' or 'clip' for a folder in (or holding folders in) that layout; None if none fits."""
    if (root / DATASET_INDEX).is_file():
        return "dataset"
    subdirs = _subdirs(root)
    if _is_dsec_sequence(root) or any(_is_dsec_sequence(d) for d in subdirs):
        return "dsec"
    if _is_clip(root) or any(_is_clip(d) for d in subdirs):
        return "clip"
    return None


def _sample(sample_id, sequence, question, events, video, path, sensor_size) -> dict:
    return {"sample_id": str(sample_id), "sequence": str(sequence), "question": question, "events": events,
            "video": video, "path": str(path), "sensor_size": list(sensor_size) if sensor_size else None}


def _first_human_turn(entry: dict) -> str | None:
    for turn in entry.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") in ("human", "user"):
            text = str(turn.get("value", "")).replace("<event>", "").strip()
            return text or None
    return None


def _dataset_video_ref(root: Path, video_data: str) -> dict:
    stem = video_data[:-4] if video_data.endswith(".mp4") else video_data
    mp4 = root / "mp4" / f"{stem}.mp4"
    if mp4.is_file():
        return {"kind": "mp4", "path": str(mp4), "frame_paths": None}
    folder = root / "video" / stem
    frames = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if frames:
        return {"kind": "frames", "path": str(folder), "frame_paths": [str(p) for p in frames]}
    raise InputError(f"{mp4}: video missing (and no PNG frames in {folder}). Copy the dataset's mp4/ or video/ "
                     "folder next to the index, or fix video_data.")


def _discover_dataset(root: Path, split: str | None) -> tuple[list[dict], list[dict]]:
    index = root / DATASET_INDEX
    try:
        entries = json.loads(index.read_text())
    except FileNotFoundError:
        raise InputError(f"{index}: dataset index not found; the dataset layout needs {DATASET_INDEX} at its "
                         "root (or pick another --input-format).") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{index}: cannot parse the dataset index ({exc}). Re-copy the file.") from None
    if not isinstance(entries, list):
        raise InputError(f"{index}: expected a JSON list of samples, found {type(entries).__name__}.")
    if split is not None:
        entries = [e for e in entries if isinstance(e, dict) and e.get("split") == split]
    raw_ids = [str(e.get("id", n)) if isinstance(e, dict) else str(n) for n, e in enumerate(entries)]
    seen: dict[str, int] = {}
    repeated = {i for i in raw_ids if raw_ids.count(i) > 1}
    samples, bad = [], []
    for entry, raw_id in zip(entries, raw_ids):
        sample_id = raw_id
        if raw_id in repeated:  # one clip asked several questions: keep ids unique
            sample_id = f"{raw_id}_q{seen.get(raw_id, 0)}"
            seen[raw_id] = seen.get(raw_id, 0) + 1
        if not isinstance(entry, dict):
            bad.append({"sample_id": sample_id, "error": f"{index}: entry {sample_id} is not an object."})
            continue
        try:
            event_data, video_data = entry.get("event_data"), entry.get("video_data")
            if not event_data:
                raise InputError(f"{index}: entry {raw_id} has no event_data; add it or drop the entry.")
            events_path = root / "event_npy" / event_data
            if not events_path.is_file():
                raise InputError(f"{events_path}: event file missing. Copy the dataset's event_npy/ folder "
                                 "next to the index, or fix event_data.")
            if not video_data:
                raise InputError(f"{index}: entry {raw_id} has no video_data; add it or drop the entry.")
            video = _dataset_video_ref(root, str(video_data))
        except InputError as exc:
            bad.append({"sample_id": sample_id, "error": str(exc)})
            continue
        sequence = Path(str(event_data)).parts[0] if len(Path(str(event_data)).parts) > 1 else ""
        sample = _sample(
            sample_id, sequence, _first_human_turn(entry) or DEFAULT_QUESTION,
            {"kind": "npy", "path": str(events_path), "t0_us": None, "t1_us": None}, video, events_path,
            entry.get("sensor_size") or DSEC_SENSOR_SIZE)
        if isinstance(entry.get("split"), str):
            sample["split"] = entry["split"]      # the index's own split label (adapter collect --split-by dataset)
        samples.append(sample)
    return samples, bad


def _discover_clips(root: Path) -> tuple[list[dict], list[dict]]:
    folders = [root] if _is_clip(root) else [d for d in _subdirs(root) if _is_clip(d)]
    samples, bad = [], []
    for folder in folders:
        if (folder / "events.npy").is_file():
            events = {"kind": "npy", "path": str(folder / "events.npy"), "t0_us": None, "t1_us": None}
        elif (folder / "events.h5").is_file():
            events = {"kind": "h5", "path": str(folder / "events.h5"), "t0_us": None, "t1_us": None}
        else:
            bad.append({"sample_id": folder.name, "error": f"{folder}: no events.npy or events.h5 in this clip "
                        "folder. Put the clip's events there."})
            continue
        frames = sorted((folder / "frames").glob("*.png"))
        if (folder / "video.mp4").is_file():
            video = {"kind": "mp4", "path": str(folder / "video.mp4"), "frame_paths": None}
        elif frames:
            video = {"kind": "frames", "path": str(folder / "frames"), "frame_paths": [str(p) for p in frames]}
        else:
            bad.append({"sample_id": folder.name, "error": f"{folder}: no video.mp4 and no frames/*.png in this "
                        "clip folder. Put the clip's video there."})
            continue
        samples.append(_sample(folder.name, folder.name, DEFAULT_QUESTION, events, video, folder,
                               DSEC_SENSOR_SIZE))
    return samples, bad


def _read_image_clock(sequence: Path) -> tuple[np.ndarray, list[Path]]:
    stamps_file = sequence / "images" / "timestamps.txt"
    frames_dir = sequence / "images" / "left" / "rectified"
    try:
        stamps = np.atleast_1d(np.loadtxt(stamps_file, dtype=np.int64, comments="#", ndmin=1))
    except FileNotFoundError:
        raise InputError(f"{stamps_file}: image timestamps missing; a DSEC sequence needs images/timestamps.txt "
                         "(one microsecond timestamp per frame).") from None
    except ValueError as exc:
        raise InputError(f"{stamps_file}: cannot parse the image timestamps ({exc}); expected one integer "
                         "(microseconds) per line.") from None
    frames = sorted(frames_dir.glob("*.png")) if frames_dir.is_dir() else []
    if len(stamps) == 0 or not frames:
        raise InputError(f"{frames_dir}: no images (or no timestamps); a DSEC sequence needs "
                         "images/left/rectified/NNNNNN.png and images/timestamps.txt.")
    if len(frames) != len(stamps):
        raise InputError(f"{stamps_file}: {len(stamps)} timestamps but {len(frames)} images in {frames_dir}; "
                         "they must match one to one. Re-copy the sequence's images.")
    if np.any(np.diff(stamps) <= 0):
        raise InputError(f"{stamps_file}: image timestamps are not strictly increasing. Re-copy the file.")
    return stamps, frames


def _discover_dsec(root: Path, clip_ms: float, clip_stride_ms: float | None) -> tuple[list[dict], list[dict]]:
    if clip_ms <= 0 or (clip_stride_ms is not None and clip_stride_ms <= 0):
        raise InputError(f"--clip-ms and --clip-stride-ms must be positive (got {clip_ms}, {clip_stride_ms}).")
    stride_ms = clip_stride_ms or clip_ms
    sequences = [root] if _is_dsec_sequence(root) else [d for d in _subdirs(root) if _is_dsec_sequence(d)]
    samples, bad = [], []
    for sequence in sequences:
        events_file = sequence / "events" / "left" / "events.h5"
        try:
            stamps, frames = _read_image_clock(sequence)
            first_event_us, last_event_us = dsec_time_range(events_file)
        except InputError as exc:
            bad.append({"sample_id": sequence.name, "error": str(exc)})
            continue
        frame_period_us = int(np.median(np.diff(stamps))) if len(stamps) > 1 else 0
        n_clips = 0
        k = 0
        while True:  # clips aligned to the image clock: start = first image + k * stride
            t0_us = int(stamps[0] + round(k * stride_ms * 1000))
            t1_us = int(t0_us + round(clip_ms * 1000))
            if t1_us > stamps[-1] + frame_period_us:
                break
            offset_ms = k * stride_ms
            sample_id = f"{sequence.name}_{int(offset_ms) if float(offset_ms).is_integer() else offset_ms}"
            k += 1
            in_clip = (stamps >= t0_us) & (stamps < t1_us)
            if t1_us <= first_event_us or t0_us > last_event_us:
                bad.append({"sample_id": sample_id, "error": f"{events_file}: no events between {t0_us} and "
                            f"{t1_us} us (events cover {first_event_us}..{last_event_us})."})
                continue
            n_clips += 1
            samples.append(_sample(
                sample_id, sequence.name, DEFAULT_QUESTION,
                {"kind": "dsec", "path": str(events_file), "t0_us": t0_us, "t1_us": t1_us},
                {"kind": "frames", "path": str(sequence / "images" / "left" / "rectified"),
                 "frame_paths": [str(p) for p, keep in zip(frames, in_clip) if keep]},
                sequence, DSEC_SENSOR_SIZE))
        if k == 0:
            bad.append({"sample_id": sequence.name, "error": f"{sequence}: the images span "
                        f"{(stamps[-1] - stamps[0] + frame_period_us) / 1000:.0f} ms, shorter than one "
                        f"{clip_ms} ms clip. Lower --clip-ms."})
    return samples, bad


def _discover_folder(root: Path) -> tuple[list[dict], list[dict]]:
    folders = _subdirs(root) or [root]
    return [_sample(d.name, d.name, DEFAULT_QUESTION, None, None, d, None) for d in folders], []


# ---------------------------------------------------------------------------------------------- public
def discover_samples(input_dir, *, input_format: str = "auto", split: str | None = None,
                     max_samples: int | None = None, question: str | None = None, question_set: str = "dataset",
                     clip_ms: float = 1000, clip_stride_ms: float | None = None,
                     fake: bool = False) -> tuple[list[dict], list[dict]]:
    """(samples, bad) found in input_dir; see the module docstring for the layouts.

    Raises InputError for a missing or empty folder, an unknown layout, or when no usable sample is found.
    """
    root = Path(input_dir)
    if input_format not in INPUT_FORMATS:
        raise InputError(f"--input-format {input_format!r} is unknown; choose one of {', '.join(INPUT_FORMATS)}.")
    if question_set not in QUESTION_SETS:
        raise InputError(f"--question-set {question_set!r} is unknown; choose one of {', '.join(QUESTION_SETS)}.")
    if not root.exists():
        raise InputError(f"{root}: input folder does not exist. Check --input "
                         "(or create demo data with `coordinator make-demo DIR`).")
    if not root.is_dir():
        raise InputError(f"{root}: --input must be a folder, not a file.")
    if not any(root.iterdir()):
        raise InputError(f"{root}: input folder is empty. Put a dataset, clip folders or DSEC sequences there "
                         "(or create demo data with `coordinator make-demo DIR`).")

    layout = input_format
    if layout == "auto":
        layout = detect_layout(root) or ("folder" if fake else None)
        if layout is None:
            raise InputError(
                f"{root}: no known input layout here. Expected {DATASET_INDEX} (research dataset), "
                "events/left/events.h5 (DSEC sequence, or subfolders holding them) or events.npy|h5 + "
                "video.mp4|frames/ (clip folder, or subfolders holding them). Pass --input-format to force one.")
    if split is not None and layout != "dataset":
        warnings.warn(f"--split {split!r} only filters the dataset layout; {root} is a '{layout}' layout, "
                      "so it is ignored.", stacklevel=2)

    if layout == "dataset":
        samples, bad = _discover_dataset(root, split)
    elif layout == "clip":
        samples, bad = _discover_clips(root)
    elif layout == "dsec":
        samples, bad = _discover_dsec(root, clip_ms, clip_stride_ms)
    else:
        samples, bad = _discover_folder(root)

    for n, sample in enumerate(samples):
        if question is not None:
            sample["question"] = question
        elif question_set == "top10":
            sample["question"] = TOP10_QUESTIONS[n % len(TOP10_QUESTIONS)]
    if max_samples is not None:
        samples = samples[:max(0, int(max_samples))]
    if not samples:
        why = f" {len(bad)} found but unusable, e.g. {bad[0]['error']}" if bad else ""
        where = f" with split {split!r}" if split is not None and layout == "dataset" else ""
        raise InputError(f"{root}: no samples in this '{layout}' layout{where}.{why}")
    return samples, bad
