"""Fast tests for coordinator.reports on a synthetic run: two samples x three modes, plus one failure."""

import json
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator import reports

MS = 1_000_000
REPO = Path(__file__).resolve().parents[1]

# wall_ms per (sample, mode), chosen so that pairing by sample matters:
# speculative ratios are 1000/500 = 2.0 and 800/1000 = 0.8, median 1.4; a ratio of medians would be 1.2.
WALL_MS = {
    ("s1", "baseline"): 1000.0, ("s2", "baseline"): 800.0,
    ("s1", "parallel"): 900.0, ("s2", "parallel"): 700.0,
    ("s1", "speculative"): 500.0, ("s2", "speculative"): 1000.0,
}
# (accepted, drafted): per-sample rates 0.25 and 0.375 average 0.3125; summed, 7 / 20 = 0.35.
ACCEPTED = {("s1", "speculative"): (1, 4), ("s2", "speculative"): (6, 16),
            ("s1", "parallel"): (0, 0), ("s2", "parallel"): (0, 0)}
MATCHES = {("s1", "speculative"): True, ("s2", "speculative"): False,
           ("s1", "parallel"): True, ("s2", "parallel"): True}


def _record(sample, mode, start_ns):
    accepted, drafted = ACCEPTED.get((sample, mode), (None, None))
    speculating = mode != "baseline"
    return {
        "sample_id": sample, "mode": mode, "status": "ok", "error": None, "output_ids": [1, 2, 3],
        "text": "a cat", "wall_ms": WALL_MS[sample, mode], "ttft_ms": 300.0,
        "draft": {"prefill_ms": 100.0, "decode_ms": 50.0, "tokens": 5, "ms_per_token": 10.0,
                  "load_ms": 4.0} if speculating else None,
        "target": {"prefill_ms": 300.0, "decode_ms": 72.0, "tokens": 5, "ms_per_token": 14.4,
                   "load_ms": 6.0},
        "overlap_window_ms": 200.0 if speculating else None,
        "free_draft_tokens": 20 if speculating else None,
        "drafted_tokens": drafted, "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "verify_rounds": 2 if speculating else None,
        "mean_acceptance_length": 1 + accepted / 2 if speculating else None,
        "verify_ms": 70.0 if mode == "speculative" else None,
        "matches_baseline": MATCHES.get((sample, mode)),
        "request_start_ns": start_ns, "request_end_ns": start_ns + int(WALL_MS[sample, mode] * MS),
    }


def _events(sample, mode, t0):
    common = {"request_id": f"{sample}-{mode}", "sample_id": sample, "mode": mode}

    def span(name, proc, start, end):
        return {"kind": "span", "name": name, "proc": proc, "start_ns": start, "end_ns": end,
                "attrs": {"k": 3}, **common}

    def message(kind, src, dst, sent, recv, n):
        return {"kind": "message", "type": kind, "src": src, "dst": dst, "msg_id": f"{sample}-{mode}-{n}",
                "sent_ns": sent, "recv_ns": recv, **common}

    # Odd nanosecond offsets so microsecond conversion is checked to the fraction.
    events = [
        span("load_inputs", "coordinator", t0, t0 + 5 * MS + 123),
        message("prefill", "coordinator", "target", t0 + 5 * MS + 500, t0 + 5 * MS + 40_789, 0),
        span("prefill", "target", t0 + 6 * MS, t0 + 306 * MS + 456_789),
        span("decode", "target", t0 + 307 * MS, t0 + 379 * MS + 1),
        message("prefill_done", "target", "coordinator", t0 + 306 * MS + 500_000, t0 + 306 * MS + 530_007, 1),
    ]
    if mode != "baseline":
        events += [
            message("prefill", "coordinator", "draft", t0 + 5 * MS + 600, t0 + 5 * MS + 33_333, 2),
            span("prefill", "draft", t0 + 6 * MS, t0 + 106 * MS),
            span("draft_step", "draft", t0 + 107 * MS, t0 + 117 * MS + 999),
            message("draft", "draft", "coordinator", t0 + 118 * MS, t0 + 118 * MS + 21_001, 3),
            message("verify", "coordinator", "target", t0 + 307 * MS - 50_000, t0 + 307 * MS - 10_000, 4),
            span("verify", "target", t0 + 380 * MS, t0 + 450 * MS + 77),
            # Sent but never received: the trace must still show the send and draw no arrow.
            message("stop", "coordinator", "draft", t0 + 451 * MS, None, 5),
        ]
    return events


@pytest.fixture(scope="module")
def run():
    events, results = [], []
    t0 = 50_000_000_000
    for i, (sample, mode) in enumerate(WALL_MS):
        start = t0 + i * 2_000 * MS
        events += _events(sample, mode, start)
        results.append(_record(sample, mode, start))
    events.insert(0, {"kind": "message", "type": "heartbeat", "src": "draft", "dst": "coordinator",
                      "request_id": "", "msg_id": "hb", "sent_ns": t0 - 1_234, "recv_ns": t0 - 234,
                      "sample_id": None, "mode": None})
    results.append({"sample_id": "s3", "mode": "speculative", "status": "error",
                    "error": "target worker died: CUDA out of memory", "wall_ms": None})
    # Shuffled, so that aggregate has to pair by sample_id, not by position.
    results = [results[i] for i in (5, 6, 2, 0, 4, 3, 1)]
    return events, results


def test_aggregate_speedup_is_median_of_paired_ratios(run):
    agg = reports.aggregate(run[1])
    assert list(agg) == ["baseline", "parallel", "speculative"]
    spec = agg["speculative"]
    assert spec["n"] == 2 and spec["n_failed"] == 1 and spec["n_paired"] == 2
    assert spec["speedup"] == pytest.approx(statistics.median([1000 / 500, 800 / 1000]))  # 1.4
    assert spec["time_saved_ms"] == pytest.approx(statistics.median([1000 - 500, 800 - 1000]))  # 150
    assert agg["parallel"]["speedup"] == pytest.approx((1000 / 900 + 800 / 700) / 2)
    assert agg["baseline"]["speedup"] == pytest.approx(1.0)
    assert agg["baseline"]["wall_ms_p10"] == pytest.approx(820.0)  # linear interpolation
    assert agg["baseline"]["wall_ms_p90"] == pytest.approx(980.0)


def test_aggregate_acceptance_rate_sums_over_samples(run):
    agg = reports.aggregate(run[1])
    assert agg["speculative"]["acceptance_rate"] == pytest.approx(7 / 20)
    assert agg["parallel"]["acceptance_rate"] is None  # nothing drafted: no rate, not 0%
    assert agg["speculative"]["matches_baseline"] == {"matched": 1, "compared": 2}
    assert agg["parallel"]["matches_baseline"] == {"matched": 2, "compared": 2}
    assert agg["baseline"]["matches_baseline"] is None
    assert agg["speculative"]["target"]["tok_per_s"] == pytest.approx(1000 / 14.4)
    assert agg["baseline"]["draft"]["prefill_ms"] is None


def test_aggregate_without_baseline_has_no_speedup(run):
    agg = reports.aggregate([r for r in run[1] if r["mode"] != "baseline"])
    assert agg["speculative"]["speedup"] is None
    assert agg["speculative"]["time_saved_ms"] is None
    assert reports.aggregate([]) == {}


def test_events_jsonl_round_trips(run, tmp_path):
    path = tmp_path / "out" / "events.jsonl"
    reports.write_events_jsonl(path, run[0])
    assert [json.loads(line) for line in path.read_text().splitlines()] == run[0]


def test_trace_json_has_spans_and_flow_pairs(run, tmp_path):
    events = run[0]
    path = tmp_path / "trace.json"
    reports.write_trace_json(path, events)
    document = json.loads(path.read_text())
    assert document["displayTimeUnit"] == "ms"
    trace = document["traceEvents"]
    origin = min(s for e in events for s in (e.get("start_ns"), e.get("end_ns"), e.get("sent_ns"),
                                              e.get("recv_ns")) if s is not None)

    pids = {e["args"]["name"]: e["pid"] for e in trace if e["ph"] == "M" and e["name"] == "process_name"}
    assert set(pids) == {"coordinator", "draft", "target"}
    assert len(set(pids.values())) == 3

    slices = [e for e in trace if e["ph"] == "X" and e["cat"] == "span"]
    spans = [e for e in events if e["kind"] == "span"]
    assert len(slices) == len(spans)
    for span in spans:
        matching = [s for s in slices if s["pid"] == pids[span["proc"]] and s["name"] == span["name"]
                    and s["ts"] == pytest.approx((span["start_ns"] - origin) / 1000)]
        assert len(matching) == 1
        assert matching[0]["dur"] == pytest.approx((span["end_ns"] - span["start_ns"]) / 1000)
        assert matching[0]["args"]["sample_id"] == span["sample_id"]

    starts = {e["id"]: e for e in trace if e["ph"] == "s"}
    finishes = {e["id"]: e for e in trace if e["ph"] == "f"}
    delivered = [e for e in events if e["kind"] == "message" and e["recv_ns"] is not None]
    assert len(starts) == len(finishes) == len(delivered)
    assert set(starts) == set(finishes)
    binders = {(e["pid"], e["tid"], e["ts"]) for e in trace if e["ph"] == "X" and e["cat"] == "message"}
    for fid, start in starts.items():
        finish = finishes[fid]
        message = next(m for m in delivered if m["msg_id"] == start["args"]["msg_id"])
        assert start["pid"] == pids[message["src"]] and finish["pid"] == pids[message["dst"]]
        assert start["ts"] == pytest.approx((message["sent_ns"] - origin) / 1000)
        assert finish["ts"] == pytest.approx((message["recv_ns"] - origin) / 1000)
        assert finish["bp"] == "e" and start["name"] == finish["name"] == message["type"]
        assert start["args"]["type"] == message["type"]
        assert (start["pid"], start["tid"], start["ts"]) in binders
        assert (finish["pid"], finish["tid"], finish["ts"]) in binders
    # An undelivered message still shows up at its sender.
    assert any(e["ph"] == "X" and e["name"] == "send stop" for e in trace)


def test_trace_json_keeps_slices_on_a_thread_nested(tmp_path):
    def span(name, start, end):
        return {"kind": "span", "name": name, "proc": "coordinator", "start_ns": start, "end_ns": end,
                "request_id": name, "sample_id": "s", "mode": "parallel", "attrs": {}}

    # a and b overlap without nesting (two concurrent requests); c nests inside a.
    events = [span("a", 0, 10_000), span("b", 5_000, 20_000), span("c", 1_000, 2_000)]
    path = tmp_path / "trace.json"
    reports.write_trace_json(path, events)
    tids = {e["name"]: e["tid"] for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"}
    assert tids["a"] == tids["c"] != tids["b"]


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_timeline_png_is_a_picture_of_the_run(run, tmp_path):
    events, results = run
    path = tmp_path / "timeline.png"
    reports.write_timeline_png(path, events, results)
    width, height_two = _png_size(path)
    assert path.stat().st_size > 20_000 and width > 500

    one = tmp_path / "one.png"
    reports.write_timeline_png(one, events, None, max_samples=1)
    _, height_one = _png_size(one)
    assert height_one < height_two  # max_samples limits the panels

    # The heartbeat belongs to no request, so it must not take one of the max_samples panels.
    from_events = tmp_path / "events_only.png"
    reports.write_timeline_png(from_events, events, None, max_samples=2)
    from_results = tmp_path / "with_results.png"
    reports.write_timeline_png(from_results, events, [r for r in results if r["status"] == "ok"], max_samples=2)
    assert _png_size(from_events)[1] == _png_size(from_results)[1]


def test_summary_md_reports_measured_values(run, tmp_path):
    results = run[1]
    agg = reports.aggregate(results)
    command = "coordinator run --samples 2 --modes baseline,parallel,speculative --out runs/x"
    path = tmp_path / "summary.md"
    reports.write_summary_md(path, results, agg, command=command,
                             run_info={"synthetic": True, "backends": "fake", "device": "cpu"})
    text = path.read_text()
    assert f"```bash\n{command}\n```" in text
    assert "Synthetic run" in text and "device: cpu" in text
    for measured in ("1.40×", "150.0", "35.0%", "820.0–980.0", "1/2", "14.40", "69.4", "300.0"):
        assert measured in text, measured
    assert "`s3` (speculative): target worker died: CUDA out of memory" in text


def test_format_table_one_row_per_mode(run):
    table = reports.format_table(reports.aggregate(run[1]))
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    speculative = next(line for line in lines if line.startswith("speculative"))
    assert "1.40×" in speculative and "35.0%" in speculative and "1/2" in speculative
    baseline = next(line for line in lines if line.startswith("baseline"))
    assert "—" in baseline


def test_none_fields_do_not_crash(tmp_path):
    sparse = [
        {"sample_id": "s1", "mode": "baseline", "status": "ok", "wall_ms": None, "draft": None,
         "target": None, "matches_baseline": None},
        {"sample_id": "s1", "mode": "speculative", "status": "ok", "wall_ms": float("nan"),
         "accepted_tokens": 3, "drafted_tokens": None, "target": {"ms_per_token": None}},
        {"sample_id": "s2", "mode": "speculative", "status": "error", "error": None},
    ]
    agg = reports.aggregate(sparse)
    assert agg["speculative"]["n"] == 1 and agg["speculative"]["n_failed"] == 1
    assert agg["speculative"]["speedup"] is None and agg["speculative"]["wall_ms_median"] is None
    assert agg["speculative"]["acceptance_rate"] is None
    assert "—" in reports.format_table(agg)
    summary = tmp_path / "summary.md"
    reports.write_summary_md(summary, sparse, agg, command="coordinator run", run_info={})
    assert "`s2` (speculative): no error message" in summary.read_text()
    reports.write_trace_json(tmp_path / "trace.json", [])
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"] == []
    reports.write_timeline_png(tmp_path / "empty.png", [], sparse)
    reports.write_timeline_png(tmp_path / "none.png", [])
    assert _png_size(tmp_path / "none.png")[0] > 0


def test_reports_does_not_import_torch():
    code = "import sys, coordinator.reports; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_shared_statistics_skip_gaps_and_pair_by_key():
    from coordinator.reports import stats

    assert stats.median([3, None, float("nan"), "x", True, 1, 2]) == 2
    assert stats.median([]) is None
    assert stats.percentile([1, 2, 3, 4, 5], 0.1) == pytest.approx(1.4)
    speedup, saved, n = stats.paired_speedup({"a": 100.0, "b": 90.0, "c": 50.0}, {"a": 50.0, "b": 30.0, "d": 1.0})
    assert (speedup, saved, n) == (pytest.approx(2.5), pytest.approx(55.0), 2)
    assert stats.paired_speedup({"a": 1.0}, {"b": 1.0}) == (None, None, 0)


def test_signal_guard_raises_once_then_only_notes():
    import os
    import signal as sig

    from coordinator.signals import Interrupted, SignalGuard

    before = sig.getsignal(sig.SIGTERM)
    guard = SignalGuard().install()
    try:
        done = []
        with pytest.raises(Interrupted):
            with guard.deferred():          # a record being written is never cut in two
                os.kill(os.getpid(), sig.SIGHUP)
                for _ in range(1000):
                    pass
                done.append(1)
        assert done == [1] and guard.signum == sig.SIGHUP
        guard.signum, guard.raising = None, True
        with pytest.raises(Interrupted) as caught:
            os.kill(os.getpid(), sig.SIGTERM)
            for _ in range(1000):           # the handler runs between bytecodes
                pass
        assert caught.value.signum == sig.SIGTERM and guard.signum == sig.SIGTERM and not guard.raising
        os.kill(os.getpid(), sig.SIGINT)    # while shutting down: noted, not raised
        for _ in range(1000):
            pass
        assert guard.signum == sig.SIGTERM
    finally:
        guard.restore()
    assert sig.getsignal(sig.SIGTERM) == before


def test_bench_md_names_how_each_workers_nf4_kernel_reads_its_scales():
    """A worker run with `--draft-option nf4_scales=bytes` says so beside its model in bench.md (its run_info
    carries it); a worker without the option, or not in nf4, says nothing about it."""
    from coordinator.bench_report import render_markdown
    agg = {"rows": [], "contention": {}, "costs_alone": {}, "floor": [], "ceiling": []}
    info = {"draft": {"model_id": "d", "device": "cuda", "info": {"precision": "nf4", "pdl": True, "nf4_scales": "bytes"}},
            "target": {"model_id": "t", "device": "cuda", "info": {"precision": "bf16", "pdl": True}}}
    md = render_markdown({"aggregate": agg, "command": "coordinator bench", "run_info": {"s": info}})
    draft = next(line for line in md.splitlines() if line.startswith("- s draft"))
    target = next(line for line in md.splitlines() if line.startswith("- s target"))
    assert "programmatic dependent launch, NF4 scales read as bytes" in draft and "NF4 scales" not in target
