"""The benchmark tools' pure parts, on made-up inputs: benchmarks/handover.py (a one-GPU round's hand-over,
message by message, from a bench run's events), benchmarks/nf4_sass.py (instructions per block of the
NF4 kernel's SASS) and benchmarks/kernel_fit.py (launch time against bytes)."""
from __future__ import annotations

import pytest


def test_handover_breakdown_names_every_message_of_a_round():
    """benchmarks/handover.py splits a one-GPU round's hand-over into its messages and the processing on each
    side, from the timestamped events of a bench run (measured on an H200: 1.85 ms a round, 1.56 ms once a
    REBASE's token ids validated at C speed)."""
    from benchmarks.handover import breakdown

    us = 1_000

    def span(proc, name, s, e):
        return {"kind": "span", "request_id": "r", "proc": proc, "name": name, "start_ns": s * us, "end_ns": e * us}

    def msg(kind, sent, recv):
        return {"kind": "message", "request_id": "r", "type": kind, "sent_ns": sent * us, "recv_ns": recv * us}

    events = [span("draft", "draft_step", 0, 3000), msg("draft", 3010, 3200), msg("verify", 3300, 3550),
              span("target", "verify", 3700, 8700), msg("verify_result", 8720, 8950), msg("rebase", 9100, 9350),
              span("draft", "rebase", 9450, 12850), msg("draft", 12860, 13000),
              span("draft", "draft_step", 12900, 15900), span("draft", "draft_step", 16000, 19000),
              {"kind": "message", "request_id": "other", "type": "verify", "sent_ns": 0, "recv_ns": 1}]
    parts = breakdown(events, {"r"})
    expected = {"1 draft step end -> DRAFT sent": 0.01, "2 DRAFT draft -> coordinator": 0.19,
                "3 coordinator: DRAFT in -> VERIFY out": 0.1, "4 VERIFY coordinator -> target": 0.25,
                "5 target: VERIFY in -> verify span": 0.15, "6 verify span end -> VERIFY_RESULT sent": 0.02,
                "7 VERIFY_RESULT target -> coordinator": 0.23, "8 coordinator: VERIFY_RESULT in -> REBASE out": 0.15,
                "9 REBASE coordinator -> draft": 0.25, "10 draft: REBASE in -> rebase span": 0.1,
                "rebase span (the round's first draft)": 3.4}
    for name, ms in expected.items():
        assert parts[name] == [pytest.approx(ms)], name
    assert parts["gap between draft steps"] == [pytest.approx(0.05), pytest.approx(0.1)]
    assert breakdown(events, {"nobody"}) == {}


def test_nf4_sass_counts_instructions_between_the_blocks_first_mmas():
    """benchmarks/nf4_sass.py's count of SASS instructions per 64-value block: an MMA with a zero accumulator
    (RZ) starts a block's sum; the 9-16 row kernel starts two (rows 0-7 and 8-15) a few lines apart."""
    from benchmarks.nf4_sass import block_lengths

    def line(i, text):
        return f"        /*{i * 16:04x}*/                   {text} ;"

    body = ["LDS R1, [R2]"] * 5 + ["HMMA.16816.F32.BF16 R4, R8, R12, RZ", "HMMA.16816.F32.BF16 R20, R8, R14, RZ"]
    body += ["HMMA.16816.F32.BF16 R4, R8, R12, R4"] * 3 + ["FFMA R1, R2, R3, R1"] * 4
    sass = "\n".join(line(i, text) for i, text in enumerate(["S2R R0, SR_TID.X"] + body * 3 + ["EXIT"]))
    assert block_lengths(sass) == [len(body), len(body)]
    assert block_lengths("no code") == []


def test_kernel_fit_recovers_the_fixed_cost_and_the_rate_of_a_line():
    """benchmarks/kernel_fit.py: µs = fixed + MB ÷ rate over the shapes of one variant; one layer is the sum."""
    from benchmarks.kernel_fit import table
    mb_us = {(4096, 4096): (10.0, 7.0), (12288, 4096): (30.0, 17.0), (22016, 4096): (50.0, 27.0)}   # 2 µs + MB/2
    results = [dict(kind="bf16-mma", n=n, k=k, rows=1, ms=us / 1e3, gbs=mb / (us / 1e3))
               for (n, k), (mb, us) in mb_us.items()]
    results.append(dict(kind="bf16-mma", n=1, k=1, rows=9, ms=1.0, gbs=1.0))      # another row count: left out
    (row,) = table(results, rows=1)
    assert row["variant"] == "bf16-mma" and row["shapes"] == 3
    assert row["fixed_us"] == pytest.approx(2.0) and row["marginal_tbs"] == pytest.approx(2.0)
    assert row["layer_us"] == pytest.approx(51.0)


def test_plan_outcomes_pairs_each_request_with_its_own_samples_baseline():
    from benchmarks.plan_outcomes import outcomes
    plan = {"reason": "drafting pays (sharing the target's device): predicted 1.037x (...)", "predicted_speedup": 1.037}
    records = [
        {"sample_id": "a", "mode": "baseline", "status": "ok", "wall_ms": 1000.0, "placement": "same-gpu", "mps": "off"},
        {"sample_id": "b", "mode": "baseline", "status": "ok", "wall_ms": 500.0, "placement": "same-gpu", "mps": "off"},
        {"sample_id": "a", "mode": "speculative", "alpha": 0.9, "oracle": "alpha=0.9", "wall_ms": 1250.0,
         "placement": "same-gpu", "mps": "off", "draft_plan": plan},
        {"sample_id": "b", "mode": "speculative", "alpha": 1.0, "oracle": "alpha=1", "wall_ms": 400.0,
         "placement": "same-gpu", "mps": "off", "draft_plan": None},
        {"sample_id": "b", "mode": "speculative", "alpha": 1.0, "wall_ms": 400.0, "placement": "same-gpu",
         "mps": "on"},                                  # no baseline with MPS on: not paired
    ]
    rows = outcomes(records)
    assert [(r["sample"], r["plan"], r["predicted"], r["measured"]) for r in rows] == [
        ("a", "drafting pays", 1.037, 0.8), ("b", "", None, 1.25)]
    assert [r["sample"] for r in outcomes(records, alpha=0.9)] == ["a"]


def test_critical_path_charges_each_kernel_what_it_adds_to_the_step():
    """benchmarks/step_bench.py's timeline: a kernel resident early (programmatic dependent launch) is charged
    only for the time its end moves past the kernels before it, gaps are charged as idle time, and the
    marginals plus the idle time make up the span."""
    from benchmarks.step_bench import critical_path

    events = [{"name": "matmul", "ts": 0, "dur": 50}, {"name": "finish", "ts": 40, "dur": 15},   # waits, ends at 55
              {"name": "attention", "ts": 60, "dur": 10},                                          # 5 µs idle first
              {"name": "matmul", "ts": 100, "dur": 50}, {"name": "finish", "ts": 145, "dur": 3}]   # inside the matmul
    path = critical_path(events, steps=1)
    rows = {r["name"]: r for r in path["kernels"]}
    assert rows["matmul"]["marginal_ms"] == pytest.approx(0.100)
    assert rows["matmul"]["idle_before_ms"] == pytest.approx(0.030)
    assert rows["finish"]["marginal_ms"] == pytest.approx(0.005)
    assert rows["finish"]["duration_ms"] == pytest.approx(0.018)
    assert rows["attention"]["idle_before_ms"] == pytest.approx(0.005)
    assert path["span_ms"] == pytest.approx(0.150)
    assert sum(r["marginal_ms"] for r in path["kernels"]) + path["idle_ms"] == pytest.approx(path["span_ms"])
    assert critical_path(events, steps=2)["span_ms"] == pytest.approx(0.075)


def test_layer_launch_probe_folds_a_layers_shapes_into_one_weight_of_the_same_bytes():
    from benchmarks.layer_launch_probe import LAYER, merged_shape
    n, k = merged_shape()
    assert (n, k) == (49408, 4096)
    assert n * k == sum(rows * cols for rows, cols in LAYER)
    assert merged_shape(((8, 128), (4, 64)), k=64) == (20, 64)
    with pytest.raises(ValueError, match="do not fold"):
        merged_shape(((3, 100),), k=64)
