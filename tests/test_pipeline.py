"""End to end through real processes: the coordinator CLI spawns fake workers (no torch)."""
import json
import subprocess
import time

import psutil
import pytest

from tests.conftest import ROOT, load_results, run_cli

FAKE = ["--draft-backend", "fake", "--target-backend", "fake", "--mps", "off"]


def test_all_modes_produce_every_output_and_are_lossless(fake_input, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("run", "--input", fake_input, *FAKE, "--mode", "all", "--output-dir", out,
                   "--draft-option", "step_ms=1", "--draft-option", "quality=alpha:0.7", check=True)
    for name in ("results.json", "summary.md", "events.jsonl", "trace.json", "timeline.png"):
        assert (out / name).stat().st_size > 0, name
    res = load_results(out)
    recs = res["records"]
    assert len(recs) == 9 and all(r["status"] == "ok" for r in recs)
    base = {r["sample_id"]: r["output_ids"] for r in recs if r["mode"] == "baseline"}
    for r in recs:
        if r["mode"] != "baseline":
            assert r["matches_baseline"] is True
            assert r["output_ids"] == base[r["sample_id"]]
            assert r["drafted_tokens"] >= r["accepted_tokens"] >= 0
            assert r["free_draft_tokens"] >= 1
        for key in ("wall_ms", "ttft_ms"):
            assert r[key] > 0
        assert r["target"]["prefill_ms"] > 0
    assert set(res["aggregate"]) == {"baseline", "parallel", "speculative"}
    assert res["aggregate"]["parallel"]["speedup"] > 0
    assert "speedup" in (out / "summary.md").read_text()
    assert "mode" in proc.stdout and "speculative" in proc.stdout

    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    msgs = [e for e in events if e["kind"] == "message"]
    spans = [e for e in events if e["kind"] == "span"]
    assert {"prefill", "prefill_done", "draft", "verify", "verify_result", "rebase", "decode", "decode_result",
            "stop", "done"} <= {e["type"] for e in msgs}
    assert all(e["recv_ns"] is not None and e["sent_ns"] <= e["recv_ns"] for e in msgs if e["type"] != "shutdown")
    assert {"prefill", "decode", "verify", "draft_step", "load_inputs"} <= {s["name"] for s in spans}
    assert all(s["start_ns"] <= s["end_ns"] for s in spans)
    # parallel: the buffered drafts go out as VERIFY within 5 ms of PREFILL_DONE arriving
    for sample in base:
        done = [e for e in msgs if e["type"] == "prefill_done" and e["mode"] == "parallel" and e["sample_id"] == sample]
        verify = [e for e in msgs if e["type"] == "verify" and e["mode"] == "parallel" and e["sample_id"] == sample]
        assert len(done) == 1
        if verify:
            assert 0 <= verify[0]["sent_ns"] - done[0]["recv_ns"] < 5e6
    # both workers got PREFILL at the same moment
    for sample in base:
        pre = [e for e in msgs if e["type"] == "prefill" and e["mode"] == "speculative" and e["sample_id"] == sample]
        assert len(pre) == 2 and abs(pre[0]["sent_ns"] - pre[1]["sent_ns"]) < 5e6
    trace = json.loads((out / "trace.json").read_text())
    assert any(e.get("ph") == "X" for e in trace["traceEvents"])


@pytest.mark.parametrize("quality", ["perfect", "wrong", "prefix:4"])
def test_lossless_with_scripted_draft_quality(fake_input, tmp_path, quality):
    out = tmp_path / "out"
    run_cli("run", "--input", fake_input, *FAKE, "--output-dir", out, "--max-new-tokens", "40",
            "--draft-option", f"quality={quality}", "--draft-option", "step_ms=0.5", "--quiet", check=True)
    recs = load_results(out)["records"]
    spec = [r for r in recs if r["mode"] != "baseline"]
    assert spec and all(r["matches_baseline"] is True for r in spec)
    accepted = sum(r["accepted_tokens"] for r in spec)
    if quality == "wrong":
        assert accepted == 0
    if quality == "perfect":
        assert accepted > 0 and all(r["acceptance_rate"] in (None, 1.0) for r in spec)
    if quality == "prefix:4":
        # only positions 1..3 can ever be accepted: position 0 comes from the target's prefill
        assert all(r["accepted_tokens"] <= 3 for r in spec)


def test_worker_that_never_gets_ready_hits_the_startup_deadline(fake_input, tmp_path):
    start = time.monotonic()
    proc = run_cli("run", "--input", fake_input, *FAKE, "--output-dir", tmp_path / "out",
                   "--target-option", "startup_delay_s=60", "--startup-timeout", "2", timeout=60)
    assert proc.returncode == 4
    assert "target worker" in proc.stderr and "within 2 s" in proc.stderr
    assert time.monotonic() - start < 30
    assert not [p for p in psutil.process_iter(["cmdline"])
                if "startup_delay_s" in " ".join(p.info["cmdline"] or [])]


def test_worker_failing_to_load_is_reported(fake_input, tmp_path):
    proc = run_cli("run", "--input", fake_input, *FAKE, "--output-dir", tmp_path / "out",
                   "--draft-option", "crash_on_load=boom", timeout=60)
    assert proc.returncode in (3, 4)
    assert "draft" in proc.stderr and "boom" in proc.stderr


def test_attach_to_a_draft_worker_started_elsewhere_over_tcp(fake_input, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    import sys
    worker = subprocess.Popen([sys.executable, "-m", "workers", "--role", "draft", "--backend", "fake",
                               "--connect", endpoint], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out = tmp_path / "out"
        run_cli("run", "--input", fake_input, *FAKE, "--output-dir", out, "--draft-endpoint", endpoint,
                "--mode", "speculative", "--quiet", check=True)
        recs = load_results(out)["records"]
        assert len(recs) == 3 and all(r["status"] == "ok" for r in recs)
        assert all(r["draft"]["prefill_ms"] > 0 for r in recs)
        assert worker.poll() is None       # an attached worker is not ours to shut down
    finally:
        worker.kill()
        worker.wait()


def test_public_endpoint_needs_explicit_permission(fake_input, tmp_path):
    proc = run_cli("run", "--input", fake_input, *FAKE, "--output-dir", tmp_path / "out",
                   "--draft-endpoint", "tcp://0.0.0.0:5599", "--startup-timeout", "2")
    assert proc.returncode != 0 and "not on loopback" in proc.stderr


def test_missing_input_folder_is_a_clear_error(tmp_path):
    proc = run_cli("run", "--input", tmp_path / "nope", *FAKE)
    assert proc.returncode != 0
    assert "nope" in proc.stderr
    assert "Traceback" not in proc.stderr
