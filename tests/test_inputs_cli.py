"""The render-events and make-demo commands, through click's CliRunner."""
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from coordinator.input_commands import make_demo_command, render_events_command
from workers.inputs import discover_samples, load_events_file, render_event_images


def test_make_demo_then_render_events(tmp_path):
    runner = CliRunner()
    result = runner.invoke(make_demo_command, [str(tmp_path / "demo"), "--clips", "2", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert "research dataset" in result.output and "raw DSEC" in result.output
    samples, bad = discover_samples(tmp_path / "demo" / "dataset")
    assert len(samples) == 2 and bad == []
    assert len(discover_samples(tmp_path / "demo" / "dsec")[0]) == 2

    events_file = samples[0]["events"]["path"]
    out = tmp_path / "rendered"
    result = runner.invoke(render_events_command, [events_file, "--frames", "3", "--window-ms", "200",
                                                   "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = sorted(out.glob("*.png"))
    assert [p.name for p in written] == ["frame_0.png", "frame_1.png", "frame_2.png"]
    assert all(str(p) in result.output for p in written)
    expected = render_event_images(load_events_file(events_file), 3, window_ms=200)
    for path, want in zip(written, expected):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), want)


def test_render_events_reports_bad_file(tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array({"x": np.arange(3), "y": np.arange(3), "t": np.arange(3)}, dtype=object),
            allow_pickle=True)
    result = CliRunner().invoke(render_events_command, [str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert str(bad) in result.output and "'p'" in result.output
    assert not Path(tmp_path / "o").exists()
