"""`coordinator run --ray` end to end with fake backends on the CPU: real Ray, real actors, real workers.

One Ray (2 CPUs, no dashboard) is started for the module and joined by address; only the SIGTERM test starts
its own `--ray local` (it checks that the local cluster is shut down too). Nothing here asserts a timing.
"""
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.conftest import ROOT, coordinator_cmd, load_results, run_cli, wait_gone

ray = pytest.importorskip("ray", reason="the cluster extra is not installed (pip install -e '.[cluster]')")

FAKE = ["--draft-backend", "fake", "--target-backend", "fake", "--mps", "off"]
# about 0.15 s per mode per sample: long enough that both pipelines are busy when one is killed
SLOW = ["--target-option", "length=16", "--target-option", "step_ms=8", "--draft-option", "step_ms=8",
        "--draft-option", "quality=alpha:0.6"]
SAME = ("sample_id", "mode", "status", "output_ids", "text", "matches_baseline", "committed_ids", "sequence",
        "target_inputs")


@pytest.fixture(scope="module")
def ray_address():
    temp = tempfile.mkdtemp(prefix="es-rayt-", dir="/tmp")
    ctx = ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
                   logging_level="ERROR")
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()
        import shutil
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def six_samples(tmp_path):
    root = tmp_path / "seq"
    for i in range(6):
        (root / f"s{i}").mkdir(parents=True)
        (root / f"s{i}" / "frame.txt").write_text(str(i))
    return root


def _spawn(*args, env=None):
    """The CLI in the background; its stderr lines are collected as they come."""
    proc = subprocess.Popen(coordinator_cmd(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    proc.err_lines = []

    def read():
        for line in proc.stderr:
            proc.err_lines.append(line)
    proc.reader = threading.Thread(target=read, daemon=True)
    proc.reader.start()
    return proc


def _finish(proc) -> str:
    """Kill a CLI still running (a test that failed midway), then its whole stderr."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    proc.reader.join(timeout=5)
    return "".join(proc.err_lines)


def _wait_for(predicate, what, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _jsonl(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _exactly_once(records, n_samples, modes=("baseline", "parallel", "speculative")):
    counts = Counter((r["sample_id"], r["mode"]) for r in records)
    assert set(counts) == {(f"s{i}", m) for i in range(n_samples) for m in modes}
    assert set(counts.values()) == {1}, [k for k, v in counts.items() if v > 1]


def test_two_pipelines_give_the_same_outputs_as_one(six_samples, tmp_path, ray_address):
    one, two = tmp_path / "one", tmp_path / "two"
    rel = lambda path: os.path.relpath(path, ROOT)       # noqa: E731 (relative paths mean the driver's folder)
    run_cli("run", "--input", rel(six_samples), *FAKE, *SLOW, "--samples", 4, "--output-dir", rel(one), "--quiet",
            check=True)
    proc = run_cli("run", "--input", rel(six_samples), *FAKE, *SLOW, "--samples", 4, "--output-dir", rel(two),
                   "--ray", ray_address, "--pipelines", "2", check=True, timeout=180)
    a, b = load_results(one), load_results(two)
    assert [{k: r.get(k) for k in SAME} for r in a["records"]] == [{k: r.get(k) for k in SAME} for r in b["records"]]
    assert all(r["status"] == "ok" and r["node"] for r in b["records"])
    assert all(r["target_inputs"] == {"files": 1} for r in b["records"])     # the workers found the inputs
    ran = {r["pipeline"] for r in b["records"]}
    assert all((two / "logs" / f"pipeline-{p}" / "target.log").is_file() for p in ran)
    assert {r["pipeline"] for r in b["records"]} <= {0, 1}
    by_sample = {}
    for r in b["records"]:                        # every mode of a sample ran on one pipeline
        by_sample.setdefault(r["sample_id"], set()).add(r["pipeline"])
    assert all(len(p) == 1 for p in by_sample.values())
    ray_info = b["run_info"]["ray"]
    assert ray_info["pipelines"] == 2 and sum(ray_info["samples_per_pipeline"].values()) == 4
    assert set(b["aggregate"]) == set(a["aggregate"])
    assert b["aggregate"]["speculative"]["matches_baseline"] == {"matched": 4, "compared": 4}
    for name in ("summary.md", "events.jsonl", "trace.json", "timeline.png"):
        assert (two / name).stat().st_size > 0, name
    # records were written as they arrived, and match the final file
    assert Counter(r["request_id"] for r in _jsonl(two / "records.jsonl")) == \
        Counter(r["request_id"] for r in b["records"])
    trace = json.loads((two / "trace.json").read_text())
    procs = {e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "process_name"}
    ran = {f"p{p}" for p in ran}
    assert {f"{p} {role}" for p in ran for role in ("coordinator", "draft", "target")} <= procs
    events = _jsonl(two / "events.jsonl")
    spans = [e for e in events if e["kind"] == "span"]
    assert spans and all("pipeline" in e and "node" in e for e in spans)
    assert "samples/s" in proc.stdout and "4/4 samples" in proc.stderr


def test_a_pipeline_killed_mid_run_loses_and_duplicates_nothing(six_samples, tmp_path, ray_address):
    out = tmp_path / "out"
    proc = _spawn("run", "--input", six_samples, *FAKE, *SLOW, "--output-dir", out, "--ray", ray_address,
                  "--pipelines", "2")
    try:
        ready = _wait_for(lambda: [ln for ln in proc.err_lines if re.match(r"pipeline 0 ready .*\(pid \d+", ln)],
                          "pipeline 0 to start")
        actor_pid = int(re.search(r"\(pid (\d+)", ready[0]).group(1))
        _wait_for(lambda: any(r["pipeline"] == 0 for r in _jsonl(out / "records.jsonl")),
                  "a first result from pipeline 0")
        workers = [c.pid for c in psutil.Process(actor_pid).children() if "--role" in c.cmdline()]
        assert len(workers) == 2
        psutil.Process(actor_pid).send_signal(signal.SIGKILL)      # the actor, mid-sample
        proc.wait(timeout=180)
    finally:
        err = _finish(proc)
    assert proc.returncode == 0, err
    assert "pipeline 0 lost" in err
    res = load_results(out)
    _exactly_once(res["records"], 6)
    assert all(r["status"] == "ok" and r["matches_baseline"] in (True, None) for r in res["records"])
    _exactly_once(_jsonl(out / "records.jsonl"), 6)          # nothing written twice as it arrived either
    assert wait_gone(workers) == []                            # they died with their actor


def test_sigterm_leaves_nothing_and_resume_skips_finished_samples(six_samples, tmp_path, ray_address):
    from tests.test_mps import make_stubs

    out, mps_log = tmp_path / "out", tmp_path / "mps.log"
    env = make_stubs(tmp_path / "bin", mps_log)            # a stub MPS control: each pipeline starts its own
    proc = _spawn("run", "--input", six_samples, *FAKE[:-2], "--mps", "on", *SLOW, "--output-dir", out,
                  "--ray", "local", "--pipelines", "2", env=env)
    try:
        _wait_for(lambda: len({r["sample_id"] for r in _jsonl(out / "records.jsonl")}) >= 2, "two finished samples")
        family = psutil.Process(proc.pid).children(recursive=True)
        connects = [c.cmdline() for c in family if "--role" in c.cmdline()]
        ipc_dirs = {Path(cmd[cmd.index("--connect") + 1].removeprefix("ipc://")).parent for cmd in connects}
        ray_dirs = {m.group(1) for c in family for m in [re.search(r"(/tmp/es-ray-[^/\s]+)", " ".join(c.cmdline()))]
                    if m}
        assert len(connects) == 4 and len(ipc_dirs) == 2 and len(ray_dirs) == 1
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
    finally:
        err = _finish(proc)
    assert proc.returncode == 143, err
    assert "interrupted" in err
    assert wait_gone([p.pid for p in family], timeout=20) == []   # workers, actors, raylet, GCS: all gone
    assert not any(d.exists() for d in ipc_dirs) and not any(Path(d).exists() for d in ray_dirs)
    started = [ln.split()[1] for ln in mps_log.read_text().splitlines() if ln.startswith("start")]
    stopped = [ln.split()[1] for ln in mps_log.read_text().splitlines() if ln.startswith("quit")]
    assert len(set(started)) == 2 and sorted(started) == sorted(stopped)      # both daemons stopped
    assert not any(Path(p.split("=", 1)[1]).parent.exists() for p in started)
    before = load_results(out)["records"]
    finished = {r["sample_id"] for r in before if r["status"] == "ok"}
    kept = {r["request_id"] for r in before}
    assert 2 <= len(finished) < 6 and len(before) == 3 * len(finished)   # only whole samples were kept

    proc = run_cli("run", "--input", six_samples, *FAKE, *SLOW, "--resume", out, "--ray", ray_address,
                   "--pipelines", "2", check=True, timeout=180)
    assert f"{len(finished)} sample(s) finished before, skipped" in proc.stderr
    after = load_results(out)
    _exactly_once(after["records"], 6)
    assert kept <= {r["request_id"] for r in after["records"]}          # finished samples were not re-run
    assert sum(after["run_info"]["ray"]["samples_per_pipeline"].values()) == 6 - len(finished)
    _exactly_once(_jsonl(out / "records.jsonl"), 6)


def test_without_ray_the_flag_says_how_to_install(tmp_path, fake_input):
    hide = tmp_path / "noray"
    (hide / "ray").mkdir(parents=True)
    (hide / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(hide), str(ROOT)])}
    proc = run_cli("run", "--input", fake_input, *FAKE, "--output-dir", tmp_path / "out", "--ray", "local", env=env)
    assert proc.returncode != 0
    assert "pip install 'eventspec[cluster]'" in proc.stderr and "Traceback" not in proc.stderr


def test_cluster_flags_need_ray(fake_input, tmp_path):
    proc = run_cli("run", "--input", fake_input, *FAKE, "--pipelines", "2")
    assert proc.returncode != 0 and "--pipelines needs --ray" in proc.stderr


def test_collect_on_two_pipelines_writes_the_dataset_one_pipeline_writes(tmp_path, ray_address):
    torch = pytest.importorskip("torch")
    from click.testing import CliRunner

    from coordinator.adapter_commands import adapter_group
    from workers.adapters.data import SPLITS, read_index, read_split
    from workers.inputs import make_demo
    from workers.models.tiny import make_tiny

    paths = make_tiny(tmp_path / "tiny", share_weights=True, seed=0)
    demo = make_demo(tmp_path / "demo", n_clips=4, n_sequences=3)
    common = ["--input", demo["dataset"], "--draft-model", paths["eventgpt"], "--target-model", paths["videollava"],
              "--max-new-tokens", 6, "--device", "cpu", "--quiet"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(adapter_group, ["collect", *map(str, common), "--out", str(tmp_path / "one")],
                                    catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    proc = run_cli("adapter", "collect", *common, "--out", tmp_path / "two", "--ray", ray_address, "--pipelines", 2,
                   check=True, timeout=300)
    assert "on 2 pipeline(s)" in proc.stdout
    one, two = read_index(tmp_path / "one"), read_index(tmp_path / "two")
    assert one["splits"] == two["splits"] and one["config"] == two["config"]
    assert sorted(r["key"] for r in one["records"]) == sorted(r["key"] for r in two["records"])
    assert len(one["records"]) == 4
    for split in SPLITS:
        a = {r.key: r for r in read_split(tmp_path / "one", split)}
        b = {r.key: r for r in read_split(tmp_path / "two", split)}
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key].target, b[key].target) and np.array_equal(a[key].draft, b[key].draft)
            assert np.allclose(a[key].hidden, b[key].hidden, atol=1e-2)
    assert (tmp_path / "two" / "target_head.safetensors").is_file()
    train = CliRunner().invoke(adapter_group, ["train", "--data", str(tmp_path / "two"), "--kind", "token", "--out",
                                               str(tmp_path / "ckpt"), "--epochs", "1", "--d-model", "16", "--layers",
                                               "1", "--heads", "2", "--quiet"], catch_exceptions=False)
    assert train.exit_code == 0 and "selected" in train.output, train.output


def test_bench_on_two_pipelines_measures_every_item_once(fake_input, tmp_path, ray_address):
    out = tmp_path / "bench"
    run_cli("bench", "--input", fake_input, *FAKE, "--samples", 4, "--max-new-tokens", 12, "--alphas", "0.5,1",
            "--oracle-profile", "", "--bench-mps", "off", "--no-hf-generate", "--warmup", 1, "--output-dir", out,
            "--ray", ray_address, "--pipelines", 2, check=True, timeout=180)
    data = json.loads((out / "bench.json").read_text())
    recs = data["records"]
    # 4 samples x (baseline + 2 alphas x 2 modes), each exactly once, warm-up requests not among them
    assert Counter((r["sample_id"], r["mode"], r["oracle"]) for r in recs) == Counter(
        {(s, m, o): 1 for s in {r["sample_id"] for r in recs}
         for m, o in [("baseline", None)] + [(m, f"alpha={a}") for a in ("0.5", "1") for m in ("parallel", "speculative")]})
    assert len(recs) == 20 and all(r["status"] == "ok" and r["pipeline"] in (0, 1) for r in recs)
    assert all(r["matches_baseline"] for r in recs if r["mode"] != "baseline")
    assert len(data["draft_alone"]) == 3
    conf = data["ray"]["configurations"]["same-gpu_mps_off"]
    assert conf["pipelines"] == 2 and sum(conf["items_per_pipeline"].values()) == 4 + 3
    assert "## Pipelines (--ray)" in (out / "bench.md").read_text()


def test_pipelines_that_cannot_start_fail_the_run_with_the_reason(fake_input, tmp_path, ray_address):
    proc = run_cli("run", "--input", fake_input, *FAKE, "--output-dir", tmp_path / "out", "--ray", ray_address,
                   "--pipelines", 1, "--draft-option", "crash_on_load=boom", timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert "no pipeline could start" in proc.stderr and "boom" in proc.stderr and "Traceback" not in proc.stderr
    assert load_results(tmp_path / "out")["records"] == []
