"""`make-demo --profile dsec`: DSEC-size clips the real loaders read, at the sizes and rates promised."""
import json

import numpy as np

from tests.conftest import run_cli
from workers.inputs import discover_samples, load_sample_inputs
from workers.inputs.dsec_demo import RATE_RANGE, SENSOR_SIZE, clip_rates, make_dsec_demo


def test_dsec_demo_clips_load_at_their_sizes_and_rates(tmp_path):
    written = make_dsec_demo(tmp_path, n_clips=2, clip_ms=400, rate_range=(3e5, 6e5), video_size=(320, 240))
    samples, bad = discover_samples(written["dataset"])
    assert not bad and len(samples) == 2
    for sample, clip in zip(samples, written["clips"]):
        events = load_sample_inputs(sample, "draft")
        assert events["info"]["event_image_shapes"][0][:2] <= [480, 640]
        # the loader validated x < 640, y < 480; the rate is the clip's, over its 400 ms
        assert events["n_events"] == clip["events"] == round(clip["rate_per_s"] * 0.4)
        assert 3e5 <= clip["rate_per_s"] <= 6e5
        video = load_sample_inputs(sample, "target")
        assert video["info"]["source_frames"] == 8 and video["video_frames"].shape == (8, 240, 320, 3)
    raw = np.load(tmp_path / "dataset" / "event_npy" / samples[0]["sequence"] / "000000.npy",
                  allow_pickle=True).item()        # our own file: the research dataset's int64 dict format
    assert all(raw[k].dtype == np.int64 for k in "xytp")
    assert raw["x"].max() < SENSOR_SIZE[0] and raw["y"].max() < SENSOR_SIZE[1] and np.all(np.diff(raw["t"]) >= 0)
    assert set(np.unique(raw["p"])) == {0, 1}
    # deterministic for a seed
    again = make_dsec_demo(tmp_path / "again", n_clips=2, clip_ms=400, rate_range=(3e5, 6e5), video_size=(320, 240))
    raw2 = np.load(tmp_path / "again" / "dataset" / "event_npy" / samples[0]["sequence"] / "000000.npy",
                   allow_pickle=True).item()
    assert again["clips"] == written["clips"] and np.array_equal(raw["x"], raw2["x"])


def test_clip_rates_span_the_range():
    rates = clip_rates(4)
    assert rates[0] == RATE_RANGE[0] and abs(rates[-1] - RATE_RANGE[1]) < 1e-6
    assert rates == sorted(rates)
    assert RATE_RANGE[0] <= clip_rates(1)[0] <= RATE_RANGE[1]


def test_make_demo_profile_dsec_cli(tmp_path):
    proc = run_cli("make-demo", tmp_path / "d", "--profile", "dsec", "--clips", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr
    index = json.loads((tmp_path / "d" / "dataset" / "EventGPT_Instruction_Subset.json").read_text())
    assert len(index) == 1 and "(0.95 M/s)" in proc.stdout      # one clip: the range's geometric middle
    assert "20 frames 1440x1080" in proc.stdout
