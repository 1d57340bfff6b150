"""Discovery of the three layouts (+ the fake "folder" layout) and loading a sample for both roles."""
import json
import shutil
import warnings
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
from PIL import Image

from workers.inputs import (DEFAULT_QUESTION, TOP10_QUESTIONS, InputError, discover_samples, load_events,
                            load_sample_inputs, load_video_frames, make_demo, sample_frame_indices)
from workers.inputs.demo import T_OFFSET_US

SAMPLE_KEYS = {"sample_id", "sequence", "question", "events", "video", "path"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo"), n_clips=4, n_sequences=2, seed=3)


def check_loads(sample, n_video=8):
    draft = load_sample_inputs(sample, "draft")
    assert len(draft["event_images"]) == 5
    assert all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 for im in draft["event_images"])
    assert draft["n_events"] == draft["info"]["n_events"] > 1000
    target = load_sample_inputs(sample, "target")
    frames = target["video_frames"]
    assert frames.dtype == np.uint8 and frames.shape[0] == n_video and frames.shape[3] == 3
    return draft, target


# ------------------------------------------------------------------------------------------ dataset layout
def test_demo_dataset_layout(demo):
    samples, bad = discover_samples(demo["dataset"])
    assert bad == [] and len(samples) == 4
    assert [s["sample_id"] for s in samples] == demo["clips"]
    for sample in samples:
        assert SAMPLE_KEYS <= set(sample)
        assert sample["events"]["kind"] == "npy" and sample["video"]["kind"] == "mp4"
        assert "<event>" not in sample["question"] and sample["question"] == sample["question"].strip()
        json.dumps(sample)  # plain data only
    assert {s["sequence"] for s in samples} == set(demo["sequences"])
    assert samples[0]["question"] == "What are the key elements in this scene?"  # from the JSON
    assert samples[1]["question"] == "What is this scene about?"
    draft, target = check_loads(samples[0])
    assert target["video_frames"].shape == (8, 120, 160, 3)
    assert 1000 < draft["n_events"] < 100_000  # thousands per clip, not millions


def test_dataset_split_question_sets_and_limits(demo):
    train, _ = discover_samples(demo["dataset"], split="train")
    test, _ = discover_samples(demo["dataset"], split="test")
    assert len(train) + len(test) == 4 and train and test
    assert {s["sequence"] for s in train}.isdisjoint({s["sequence"] for s in test})
    with pytest.raises(InputError, match="no samples.*split 'val'"):
        discover_samples(demo["dataset"], split="val")
    top10, _ = discover_samples(demo["dataset"], question_set="top10")
    assert [s["question"] for s in top10] == list(TOP10_QUESTIONS[:4])
    fixed, _ = discover_samples(demo["dataset"], question="Is it raining?", question_set="top10", max_samples=2)
    assert [s["question"] for s in fixed] == ["Is it raining?"] * 2


def test_dataset_frames_fallback_missing_files_and_duplicate_ids(demo, tmp_path):
    root = tmp_path / "dataset"
    shutil.copytree(demo["dataset"], root)
    index_path = root / "EventGPT_Instruction_Subset.json"
    index = json.loads(index_path.read_text())
    shutil.rmtree(root / "mp4" / demo["sequences"][0])                   # -> PNG frame folders
    (root / "event_npy" / index[3]["event_data"]).unlink()                # -> bad
    index.append(dict(index[2], conversations=[{"from": "human", "value": "<event>\nWhat moves?"}]))
    index_path.write_text(json.dumps(index))

    samples, bad = discover_samples(root)
    assert [b["sample_id"] for b in bad] == [index[3]["id"]]
    assert index[3]["event_data"] in bad[0]["error"] and "missing" in bad[0]["error"]
    ids = [s["sample_id"] for s in samples]
    assert len(set(ids)) == len(ids) == 4
    assert f"{index[2]['id']}_q0" in ids and f"{index[2]['id']}_q1" in ids
    assert samples[-1]["question"] == "What moves?"
    from_frames = samples[0]
    assert from_frames["video"]["kind"] == "frames" and len(from_frames["video"]["frame_paths"]) == 20
    _, target = check_loads(from_frames)
    mp4_frames = load_sample_inputs(discover_samples(demo["dataset"])[0][0], "target")["video_frames"]
    # same clip through the PNG folder and through the (lossy) mp4
    assert np.abs(target["video_frames"].astype(int) - mp4_frames.astype(int)).mean() < 8


# ------------------------------------------------------------------------------------------ DSEC layout
def write_dsec_h5(path, x, y, t_rel, p, t_offset):
    path.parent.mkdir(parents=True, exist_ok=True)
    t_rel = np.asarray(t_rel, np.uint32)
    ms_to_idx = np.searchsorted(t_rel, 1000 * np.arange(int(t_rel[-1]) // 1000 + 2), "left").astype(np.uint64)
    zstd = hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.SHUFFLE)
    with h5py.File(path, "w") as f:
        for name, values in (("x", np.asarray(x, np.uint16)), ("y", np.asarray(y, np.uint16)), ("t", t_rel),
                             ("p", np.asarray(p, np.uint8))):
            f.create_dataset(f"events/{name}", data=values, chunks=True, **zstd)
        f.create_dataset("ms_to_idx", data=ms_to_idx, chunks=True, **zstd)
        f.create_dataset("t_offset", data=np.int64(t_offset))


def test_demo_dsec_layout_matches_dataset_clips(demo):
    samples, bad = discover_samples(demo["dsec"], clip_stride_ms=500)
    assert bad == []
    seq0 = demo["sequences"][0]
    assert [s["sample_id"] for s in samples if s["sequence"] == seq0] == [f"{seq0}_0", f"{seq0}_500"]
    first = samples[0]
    assert first["events"]["kind"] == "dsec" and first["events"]["t0_us"] == T_OFFSET_US
    assert first["events"]["t1_us"] - first["events"]["t0_us"] == 1_000_000
    assert len(first["video"]["frame_paths"]) == 20  # 20 fps images inside [t0, t1)
    check_loads(first)
    # the DSEC slice of a clip equals the dataset's .npy of the same clip
    from_dsec = load_events(samples[1]["events"])
    dataset_sample = [s for s in discover_samples(demo["dataset"])[0] if s["sample_id"] == f"{seq0}_000001"][0]
    from_npy = load_events(dataset_sample["events"])
    for name in "xytp":
        np.testing.assert_array_equal(getattr(from_dsec, name), getattr(from_npy, name))
    # default stride = clip length; one sequence folder on its own works too
    only_one, _ = discover_samples(Path(demo["dsec"]) / seq0)
    assert [s["sample_id"] for s in only_one] == [f"{seq0}_0"]


def test_hand_built_dsec_sequence(tmp_path):
    seq = tmp_path / "zurich_city_99_a"
    t_offset, first_image = 50_000_000, 50_010_000
    n = 3000
    t_rel = np.linspace(0, 400_000, n).astype(np.int64)
    write_dsec_h5(seq / "events" / "left" / "events.h5", np.arange(n) % 640, np.arange(n) % 480, t_rel,
                  np.arange(n) % 2, t_offset)
    rectified = seq / "images" / "left" / "rectified"
    rectified.mkdir(parents=True)
    stamps = [first_image + 50_000 * k for k in range(7)]
    for k in range(7):
        Image.fromarray(np.full((6, 8, 3), k * 30, np.uint8)).save(rectified / f"{k:06d}.png")
    (seq / "images" / "timestamps.txt").write_text("\n".join(map(str, stamps)) + "\n")

    samples, bad = discover_samples(tmp_path, clip_ms=100, clip_stride_ms=100)
    assert [s["sample_id"] for s in samples] == ["zurich_city_99_a_0", "zurich_city_99_a_100",
                                                 "zurich_city_99_a_200"]
    assert bad == []
    clip = samples[1]
    assert (clip["events"]["t0_us"], clip["events"]["t1_us"]) == (first_image + 100_000, first_image + 200_000)
    assert [Path(p).name for p in clip["video"]["frame_paths"]] == ["000002.png", "000003.png"]
    events = load_events(clip["events"])
    assert events.t.min() >= first_image + 100_000 and events.t.max() < first_image + 200_000
    with pytest.warns(UserWarning, match="only 2 video frames"):
        target = load_sample_inputs(clip, "target")
    assert [int(f[0, 0, 0]) for f in target["video_frames"]] == [60, 90, 90, 90, 90, 90, 90, 90]
    draft = load_sample_inputs(clip, "draft", event_frames=3)
    assert len(draft["event_images"]) == 3

    (seq / "images" / "timestamps.txt").write_text("\n".join(map(str, stamps[:5])) + "\n")
    with pytest.raises(InputError, match="5 timestamps but 7 images"):
        discover_samples(tmp_path, clip_ms=100)


# ------------------------------------------------------------------------------------------ clip folders
def test_clip_folders(demo, tmp_path):
    dataset = Path(demo["dataset"])
    seq = demo["sequences"][0]
    npy_clip, frames_clip = tmp_path / "clip_a", tmp_path / "clip_b"
    npy_clip.mkdir()
    shutil.copy(dataset / "event_npy" / seq / "000000.npy", npy_clip / "events.npy")
    shutil.copy(dataset / "mp4" / seq / "000000.mp4", npy_clip / "video.mp4")
    frames_clip.mkdir()
    shutil.copytree(dataset / "video" / seq / "000001", frames_clip / "frames")
    shutil.copy(dataset / "event_npy" / seq / "000001.npy", frames_clip / "events.npy")

    samples, bad = discover_samples(tmp_path)
    assert bad == [] and [s["sample_id"] for s in samples] == ["clip_a", "clip_b"]
    assert samples[0]["question"] == DEFAULT_QUESTION
    assert samples[1]["video"]["kind"] == "frames"
    for sample in samples:
        check_loads(sample)
    single, _ = discover_samples(npy_clip)
    assert [s["sample_id"] for s in single] == ["clip_a"]

    (frames_clip / "events.npy").unlink()
    samples, bad = discover_samples(tmp_path, input_format="clip")
    assert [s["sample_id"] for s in samples] == ["clip_a"]
    assert bad[0]["sample_id"] == "clip_b" and "events.npy" in bad[0]["error"]


# ------------------------------------------------------------------------------------------ folder / errors
def test_folder_layout_for_fake_backends(tmp_path):
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
    with pytest.raises(InputError, match="no known input layout"):
        discover_samples(tmp_path)
    samples, bad = discover_samples(tmp_path, fake=True)
    assert [s["sample_id"] for s in samples] == ["a", "b"] and bad == []
    assert samples[0]["events"] is None and samples[0]["video"] is None
    with pytest.raises(InputError, match="sample a: .*no event data"):
        load_sample_inputs(samples[0], "draft")
    with pytest.raises(InputError, match="no video"):
        load_sample_inputs(samples[0], "target")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "a" / "note.txt").write_text("x")
    itself, _ = discover_samples(tmp_path / "a", input_format="folder")
    assert [s["sample_id"] for s in itself] == ["a"]


def test_missing_empty_and_unknown_inputs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover_samples(tmp_path / "nope")
    with pytest.raises(InputError, match="empty"):
        discover_samples(tmp_path)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(InputError, match="no known input layout"):
        discover_samples(tmp_path)
    with pytest.raises(InputError, match="--input-format 'zip'"):
        discover_samples(tmp_path, input_format="zip")
    with pytest.raises(InputError, match="dataset index not found"):
        discover_samples(tmp_path, input_format="dataset")
    (tmp_path / "EventGPT_Instruction_Subset.json").write_text("[]")
    with pytest.raises(InputError, match="no samples"):
        discover_samples(tmp_path)


# ------------------------------------------------------------------------------------------ video
def test_frame_indices():
    assert sample_frame_indices(20, 8) == [0, 3, 5, 8, 11, 14, 16, 19]
    assert sample_frame_indices(8, 8) == list(range(8))
    assert sample_frame_indices(3, 8) == [0, 1, 2, 2, 2, 2, 2, 2]


def test_corrupt_and_missing_video(demo, tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    truncated = tmp_path / "truncated.mp4"
    real = (Path(demo["dataset"]) / "mp4" / demo["sequences"][0] / "000000.mp4").read_bytes()
    truncated.write_bytes(real[: len(real) // 3])
    for path in (junk, truncated):
        with pytest.raises(InputError, match="corrupt") as info:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_video_frames({"kind": "mp4", "path": str(path)})
        assert str(path) in str(info.value)
    with pytest.raises(InputError, match="video not found"):
        load_video_frames({"kind": "mp4", "path": str(tmp_path / "absent.mp4")})
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "000000.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read this frame"):
        load_video_frames({"kind": "frames", "path": str(tmp_path / "frames"), "frame_paths": None})
