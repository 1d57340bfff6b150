"""Event rendering must match the official per-event loop pixel for pixel."""
import numpy as np
import pytest

from workers.inputs import Events, InputError, render_event_images

WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


def make_events(xyp, t=None):
    xyp = np.asarray(xyp)
    t = np.arange(len(xyp), dtype=np.int64) * 1000 if t is None else np.asarray(t, np.int64)
    return Events(xyp[:, 0].astype(np.int32), xyp[:, 1].astype(np.int32), t, xyp[:, 2].astype(np.uint8))


def official_loop(events, n_frames):
    """The official algorithm written as the plain loop it is: the oracle for the vectorised version."""
    n = len(events)
    chunk = n // n_frames
    images = []
    for i in range(n_frames):
        a, b = i * chunk, (n if i == n_frames - 1 else (i + 1) * chunk)
        x, y, p = events.x[a:b], events.y[a:b], events.p[a:b]
        image = np.full((y.max() + 1, x.max() + 1, 3), 255, np.uint8)
        for xi, yi, pi in zip(x, y, p):
            image[yi, xi] = (0, 0, 255) if pi == 0 else (255, 0, 0)
        images.append(image)
    return images


def test_hand_computed_two_frames():
    # chunk 0 = events 0-1, chunk 1 = events 2-4 (the last chunk takes the remainder)
    events = make_events([(0, 0, 1), (2, 1, 0), (1, 0, 0), (1, 0, 1), (0, 2, 0)])
    first, second = render_event_images(events, n_frames=2)

    expected_first = np.array([[RED, WHITE, WHITE],
                               [WHITE, WHITE, BLUE]], np.uint8)      # 2 rows (max y 1) x 3 cols (max x 2)
    expected_second = np.array([[WHITE, RED],                       # (1,0): blue then red -> red wins
                                [WHITE, WHITE],
                                [BLUE, WHITE]], np.uint8)            # 3 rows (max y 2) x 2 cols (max x 1)
    assert first.dtype == np.uint8 and second.dtype == np.uint8
    np.testing.assert_array_equal(first, expected_first)
    np.testing.assert_array_equal(second, expected_second)


def test_last_write_wins_for_many_repeats():
    # red, blue, red, blue at one pixel: the last (blue) must win however numpy orders its writes
    events = make_events([(3, 2, 1), (3, 2, 0), (3, 2, 1), (3, 2, 0)] * 50 + [(3, 2, 0)])
    (image,) = render_event_images(events, n_frames=1)
    assert image.shape == (3, 4, 3)
    assert tuple(image[2, 3]) == BLUE
    assert (image.reshape(-1, 3) == 255).all(axis=1).sum() == 11  # every other pixel stays white


def test_matches_official_loop_on_random_stream():
    rng = np.random.default_rng(1)
    n = 5003
    events = make_events(np.stack([rng.integers(0, 17, n), rng.integers(0, 11, n), rng.integers(0, 2, n)], 1))
    ours = render_event_images(events, n_frames=5)
    for got, want in zip(ours, official_loop(events, 5), strict=True):
        np.testing.assert_array_equal(got, want)
    assert len(ours) == 5


def test_window_keeps_only_last_milliseconds():
    # 10 events 1 ms apart; a 3.5 ms window keeps t >= 9 - 3.5 ms, i.e. the last 4 events
    events = make_events([(i, 0, i % 2) for i in range(10)])
    images = render_event_images(events, n_frames=2, window_ms=3.5)
    assert [im.shape[1] for im in images] == [8, 10]  # chunks (6,7) and (8,9)


def test_fewer_events_than_frames_is_a_clear_error():
    events = make_events([(0, 0, 1), (1, 1, 0), (2, 2, 1)])
    with pytest.raises(InputError, match="only 3 events.*5 event frames"):
        render_event_images(events, n_frames=5)
    with pytest.raises(InputError, match="last 0.5 ms"):
        render_event_images(events, n_frames=2, window_ms=0.5)


def test_coordinates_beyond_the_canvas_bound_are_refused_before_allocating(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT
    from workers.inputs.render import MAX_SIDE

    for xy in ([5, 1_000_000_000], [1_000_000_000, 5], [MAX_SIDE, 0]):
        events = make_events([[1, 1, 0], [*xy, 1], [2, 2, 1]])
        with pytest.raises(InputError, match=f"more than the {MAX_SIDE} px a side"):
            render_event_images(events, 1)
    assert render_event_images(make_events([[MAX_SIDE - 1, 0, 1]]), 1)[0].shape == (1, MAX_SIDE, 3)
    # through the CLI, with 2 GiB of address space: a refusal, not an allocation the kernel kills
    path = tmp_path / "ev.npy"
    arr = np.zeros(3, dtype=[("x", "<i4"), ("y", "<i4"), ("t", "<i8"), ("p", "<i1")])
    arr["y"] = [1, 1_000_000_000, 2]
    arr["t"] = [0, 1, 2]
    np.save(path, arr)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31)); "
            "from coordinator.cli import main; sys.argv = ['coordinator'] + sys.argv[1:]; main()")
    proc = subprocess.run([sys.executable, "-c", code, "render-events", str(path), "--frames", "1", "--out",
                           str(tmp_path / "img")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "y = 1000000000" in proc.stderr and f"{MAX_SIDE} px a side" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "img").exists()
