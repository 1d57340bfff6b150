"""Every way a run can end leaves the same things behind: every finished record, a summary that says how it
ended, no worker, no MPS daemon, no private temporary folder. Real processes: `coordinator run` with fake
workers and a stub MPS daemon, spawned and then signalled, killed or broken."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, coordinator_cmd, load_results, wait_gone
from tests.test_mps import make_stubs

FAKE = ["--draft-backend", "fake", "--target-backend", "fake"]
SLOW = ["--max-new-tokens", "30", "--target-option", "step_ms=40", "--draft-option", "step_ms=40",
        "--target-option", "length=400"]


def _spawn(argv, tmp_path, python_code=None):
    env = {**os.environ, **make_stubs(tmp_path / "bin", tmp_path / "mps.log")}
    cmd = [sys.executable, "-c", python_code, *map(str, argv)] if python_code else coordinator_cmd(*argv)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _children(proc, n=2, timeout=60):
    """{role: (pid, ipc dir)} of the coordinator's worker processes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = {}
        for child in psutil.Process(proc.pid).children():
            try:
                cmd = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "--role" in cmd:
                connect = cmd[cmd.index("--connect") + 1]
                kids[cmd[cmd.index("--role") + 1]] = (child.pid, os.path.dirname(connect[len("ipc://"):]))
        if len(kids) == n:
            return kids
        time.sleep(0.05)
    raise AssertionError("workers did not start")


def _records_written(out, n, proc, timeout=60):
    path = out / "records.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} records within {timeout} s")


def _check_clean_end(out, kids, tmp_path, ended_pattern):
    """What every ending must leave: results.json with every finished record, summary.md saying how the run
    ended, readable events, no worker, no MPS daemon, no private folder."""
    streamed = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    results = load_results(out)
    assert streamed and results["records"] == streamed
    assert re.search(ended_pattern, results["ended"]), results["ended"]
    summary = (out / "summary.md").read_text()
    assert re.search(r"\*\*How the run ended:\*\* " + ended_pattern, summary)
    assert json.loads((out / "trace.json").read_text())["traceEvents"]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    done = {r["request_id"] for r in streamed if r.get("status") == "ok"}
    assert done <= {e["request_id"] for e in events if e["kind"] == "span"}
    assert wait_gone([pid for pid, _ in kids.values()]) == []
    for _, ipc_dir in kids.values():
        assert not os.path.exists(ipc_dir), ipc_dir                      # the private es-* folder
    mps_log = (tmp_path / "mps.log").read_text().splitlines()
    assert mps_log[0].startswith("start") and mps_log[-1].startswith("quit")
    pipe_dir = mps_log[0].split()[1].split("=", 1)[1]
    assert not os.path.exists(os.path.dirname(pipe_dir))              # the private es-mps-* folder
    return results


@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_a_signal_keeps_every_finished_record_and_leaves_nothing(fake_input, tmp_path, sig, code, name):
    out = tmp_path / "out"
    proc = _spawn(["run", "--input", fake_input, *FAKE, *SLOW, "--output-dir", out], tmp_path)
    kids = _children(proc)
    _records_written(out, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    results = _check_clean_end(out, kids, tmp_path, f"interrupted by {name}")
    assert 2 <= len(results["records"]) < 9
    assert all(r["status"] == "ok" for r in results["records"])
    assert "Traceback" not in err


@pytest.mark.parametrize("victim", ["draft", "target"])
def test_kill9_of_a_worker_names_it_and_keeps_what_finished(fake_input, tmp_path, victim):
    out = tmp_path / "out"
    proc = _spawn(["run", "--input", fake_input, *FAKE, *SLOW, "--output-dir", out], tmp_path)
    kids = _children(proc)
    _records_written(out, 2, proc)
    os.kill(kids[victim][0], signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    pid = kids[victim][0]
    results = _check_clean_end(out, kids, tmp_path, f"worker lost: {victim} worker \\(pid {pid}\\) died: killed by "
                                                    f"signal 9 \\(SIGKILL\\)")
    assert f"--- last lines of {out / 'logs' / victim}.log ---" in results["failure"]
    assert "not connected" not in err and "Host unreachable" not in err


BROKEN = """
import sys
from coordinator import session
real = session.Session.run_request
calls = []
def run_request(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        raise RuntimeError("a bug in the coordinator")
    return real(self, *args, **kwargs)
session.Session.run_request = run_request
from coordinator.cli import main
sys.argv = ["coordinator", *sys.argv[1:]]
main()
"""


def test_an_unexpected_exception_keeps_every_finished_record_and_leaves_nothing(fake_input, tmp_path):
    out = tmp_path / "out"
    proc = _spawn(["run", "--input", fake_input, *FAKE, "--max-new-tokens", "10", "--output-dir", out], tmp_path,
                  python_code=BROKEN)
    kids = _children(proc)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 70, err
    results = _check_clean_end(out, kids, tmp_path, "internal error: RuntimeError: a bug in the coordinator")
    assert len(results["records"]) == 2 and all(r["status"] == "ok" for r in results["records"])
    assert "Traceback" in err          # a bug is shown with its traceback, after the outputs are safe


def test_a_completed_run_says_so_and_a_run_where_everything_failed_exits_non_zero(fake_input, tmp_path):
    out = tmp_path / "ok"
    proc = _spawn(["run", "--input", fake_input, *FAKE, "--max-new-tokens", "8", "--output-dir", out], tmp_path)
    kids = _children(proc)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert len(_check_clean_end(out, kids, tmp_path, "completed")["records"]) == 9

    bad = tmp_path / "bad"
    proc = subprocess.run(coordinator_cmd("run", "--input", fake_input, *FAKE, "--mps", "off", "--max-new-tokens",
                                          "8", "--draft-option", "quality=bogus", "--output-dir", bad, "--quiet"),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    records = load_results(bad)["records"]
    assert [r["status"] for r in records if r["mode"] == "baseline"] == ["ok"] * 3       # the target alone works
    assert all(r["status"] == "error" and "bogus" in r["error"] for r in records if r["mode"] != "baseline")
    assert "every request of mode parallel, speculative failed" in load_results(bad)["ended"]


def test_sigterm_during_bench_writes_what_was_measured_and_stops_everything(fake_input, tmp_path):
    out = tmp_path / "bench"
    proc = _spawn(["bench", "--input", fake_input, *FAKE, "--samples", "3", "--warmup", "0", "--max-new-tokens", "30",
                   "--alphas", "0,1", "--target-option", "step_ms=40", "--output-dir", out], tmp_path)
    kids = _children(proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    data = json.loads((out / "bench.json").read_text())
    assert data["failure"] == "interrupted (SIGTERM)"
    assert "The run stopped early:** interrupted (SIGTERM)" in (out / "bench.md").read_text()
    assert wait_gone([pid for pid, _ in kids.values()]) == []
    assert all(not os.path.exists(ipc_dir) for _, ipc_dir in kids.values())
    mps_log = (tmp_path / "mps.log").read_text().splitlines()
    assert mps_log[0].startswith("start") and mps_log[-1].startswith("quit")
