"""Event loading: the restricted unpickler, .npy/.h5/DSEC readers and validation errors."""
import os
import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from workers.inputs import InputError, load_events, load_events_file

REPO = Path(__file__).resolve().parents[1]


def save_dict_npy(path, d):
    np.save(path, np.array(d, dtype=object), allow_pickle=True)
    return path


def npy_ref(path, **extra):
    return {"kind": "npy", "path": str(path), "t0_us": None, "t1_us": None, **extra}


def small_dict(n=10, **over):
    d = {"x": np.arange(n, dtype=np.uint16), "y": np.arange(n, dtype=np.uint16) % 3,
         "t": np.arange(n, dtype=np.int64) * 100, "p": (np.arange(n) % 2).astype(np.uint8)}
    d.update(over)
    return d


class RunsACommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class EvalsCode:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


# ------------------------------------------------------------------------------------------ safe loading
@pytest.mark.parametrize("payload", ["system", "eval"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "MARKER"
    evil = (RunsACommand(f"touch {marker}") if payload == "system"
            else EvalsCode(f"open({str(marker)!r}, 'w').close()"))
    path = save_dict_npy(tmp_path / "evil.npy", small_dict(evil=evil))
    with pytest.raises(InputError) as info:
        load_events(npy_ref(path))
    assert str(path) in str(info.value)
    assert "refused" in str(info.value)
    assert not marker.exists()
    with pytest.raises(InputError):
        load_events_file(path)
    assert not marker.exists()


def test_official_style_npy_with_metadata_loads(tmp_path):
    d = small_dict(x=np.array([5, 1, 2], np.uint16), y=np.array([0, 4, 2], np.uint16),
                   t=np.array([10, 20, 30], np.uint16), p=np.array([1, 0, 1], np.uint8))
    d.update(meta_scale=np.float64(1.5), sequence="zurich_city_00_a", count=np.int64(3), shape=(480, 640))
    events = load_events(npy_ref(save_dict_npy(tmp_path / "a.npy", d)))
    assert len(events) == 3
    assert events.t.dtype == np.int64 and events.p.dtype == np.uint8
    np.testing.assert_array_equal(events.x, [5, 1, 2])


def test_structured_npy_loads(tmp_path):
    arr = np.zeros(4, dtype=[("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "i1")])
    arr["x"], arr["t"], arr["p"] = [1, 2, 3, 4], [1, 2, 3, 4], [-1, 1, -1, 1]
    np.save(tmp_path / "s.npy", arr)
    events = load_events_file(tmp_path / "s.npy")
    np.testing.assert_array_equal(events.p, [0, 1, 0, 1])  # {-1, 1} -> {0, 1}


def test_bool_polarity_and_bad_polarity(tmp_path):
    events = load_events(npy_ref(save_dict_npy(tmp_path / "b.npy", small_dict(p=np.arange(10) % 2 == 0))))
    assert set(events.p.tolist()) == {0, 1}
    path = save_dict_npy(tmp_path / "bad.npy", small_dict(p=np.full(10, 7)))
    with pytest.raises(InputError, match="polarity"):
        load_events(npy_ref(path))


# ------------------------------------------------------------------------------------------ validation
def test_missing_keys(tmp_path):
    d = small_dict()
    del d["p"]
    path = save_dict_npy(tmp_path / "nokey.npy", d)
    with pytest.raises(InputError, match=r"lacks the keys \['p'\]") as info:
        load_events(npy_ref(path))
    assert str(path) in str(info.value)


def test_empty_stream(tmp_path):
    path = save_dict_npy(tmp_path / "empty.npy", small_dict(0))
    with pytest.raises(InputError, match="empty") as info:
        load_events(npy_ref(path))
    assert str(path) in str(info.value)


def test_mismatched_lengths(tmp_path):
    path = save_dict_npy(tmp_path / "len.npy", small_dict(t=np.arange(9, dtype=np.int64)))
    with pytest.raises(InputError, match="different lengths"):
        load_events(npy_ref(path))


def test_out_of_sensor_coordinates(tmp_path):
    path = save_dict_npy(tmp_path / "big.npy", small_dict(x=np.array([0] * 9 + [640], np.uint16)))
    with pytest.raises(InputError, match="outside the 640x480 sensor"):
        load_events(npy_ref(path))
    assert len(load_events(npy_ref(path), sensor_size=(1280, 720))) == 10
    assert len(load_events(npy_ref(path), sensor_size=None)) == 10
    with pytest.raises(InputError, match="outside the 16x16 sensor"):
        load_events(npy_ref(save_dict_npy(tmp_path / "s.npy", small_dict(20))), sensor_size=(16, 16))


def test_unsorted_timestamps_warn_and_sort_stably(tmp_path):
    d = small_dict(4, t=np.array([30, 10, 20, 10], np.int64), x=np.array([0, 1, 2, 3], np.uint16))
    with pytest.warns(UserWarning, match="not sorted"):
        events = load_events(npy_ref(save_dict_npy(tmp_path / "u.npy", d)))
    np.testing.assert_array_equal(events.t, [10, 10, 20, 30])
    np.testing.assert_array_equal(events.x, [1, 3, 2, 0])  # equal times keep their file order


def test_not_an_npy_file(tmp_path):
    path = tmp_path / "junk.npy"
    path.write_bytes(b"this is not numpy")
    with pytest.raises(InputError, match="junk.npy"):
        load_events_file(path)
    with pytest.raises(InputError, match="not found"):
        load_events_file(tmp_path / "missing.npy")


# ------------------------------------------------------------------------------------------ h5 and DSEC
BLOSC_ZSTD = hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.SHUFFLE)


def write_dsec_h5(path, x, y, t_rel, p, t_offset):
    path.parent.mkdir(parents=True, exist_ok=True)
    t_rel = np.asarray(t_rel, np.uint32)
    ms_to_idx = np.searchsorted(t_rel, 1000 * np.arange(int(t_rel[-1]) // 1000 + 2), "left").astype(np.uint64)
    with h5py.File(path, "w") as f:
        for name, values in (("x", np.asarray(x, np.uint16)), ("y", np.asarray(y, np.uint16)), ("t", t_rel),
                             ("p", np.asarray(p, np.uint8))):
            f.create_dataset(f"events/{name}", data=values, chunks=True, **BLOSC_ZSTD)
        f.create_dataset("ms_to_idx", data=ms_to_idx, chunks=True, **BLOSC_ZSTD)
        f.create_dataset("t_offset", data=np.int64(t_offset))
    return path


def test_dsec_slice_is_exact_at_the_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    t_rel = np.sort(rng.integers(0, 5000, 4000))
    t_rel[100:103] = 2000  # events exactly at the window's start ...
    t_rel = np.sort(t_rel)
    n = len(t_rel)
    x, y, p = rng.integers(0, 640, n), rng.integers(0, 480, n), rng.integers(0, 2, n)
    path = write_dsec_h5(tmp_path / "events.h5", x, y, t_rel, p, t_offset=7_000_000)
    for t0, t1 in [(7_002_000, 7_003_500), (7_000_000, 7_000_001), (7_001_234, 7_004_999), (6_999_000, 7_010_000)]:
        events = load_events({"kind": "dsec", "path": str(path), "t0_us": t0, "t1_us": t1})
        keep = (t_rel + 7_000_000 >= t0) & (t_rel + 7_000_000 < t1)
        np.testing.assert_array_equal(events.t, t_rel[keep] + 7_000_000)
        np.testing.assert_array_equal(events.x, x[keep])
        np.testing.assert_array_equal(events.p, p[keep])


def test_dsec_out_of_sensor_and_empty_window(tmp_path):
    path = write_dsec_h5(tmp_path / "events.h5", [10, 700], [1, 2], [0, 10], [0, 1], t_offset=0)
    with pytest.raises(InputError, match="outside the 640x480"):
        load_events({"kind": "dsec", "path": str(path), "t0_us": 0, "t1_us": 100})
    with pytest.raises(InputError, match="empty"):
        load_events({"kind": "dsec", "path": str(path), "t0_us": 50_000, "t1_us": 60_000})


def test_single_clip_h5_both_layouts(tmp_path):
    with h5py.File(tmp_path / "grouped.h5", "w") as f:
        for k, v in small_dict().items():
            f.create_dataset(f"events/{k}", data=v, **BLOSC_ZSTD)
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        for k, v in small_dict().items():
            f.create_dataset(k, data=v)
    with h5py.File(tmp_path / "wrong.h5", "w") as f:
        f.create_dataset("xs", data=np.arange(3))
    for name in ("grouped.h5", "flat.h5"):
        assert len(load_events_file(tmp_path / name)) == 10
    with pytest.raises(InputError, match="missing event datasets"):
        load_events_file(tmp_path / "wrong.h5")


def test_missing_compression_filter_says_install_hdf5plugin(tmp_path):
    n = 20_000  # big and compressible: HDF5 stores chunks a filter cannot shrink unfiltered
    path = write_dsec_h5(tmp_path / "events.h5", np.zeros(n), np.zeros(n), np.arange(n), np.zeros(n), t_offset=0)
    script = (
        "import sys; sys.modules['hdf5plugin'] = None\n"  # simulate hdf5plugin not installed
        "from workers.inputs.events import load_events_file, InputError\n"
        f"try:\n    load_events_file({str(path)!r})\nexcept InputError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HDF5_PLUGIN_PATH": str(tmp_path / "nothing_here")}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert "ERR" in result.stdout, result.stderr
    assert "pip install hdf5plugin" in result.stdout and "blosc" in result.stdout.lower()
    assert str(path) in result.stdout
