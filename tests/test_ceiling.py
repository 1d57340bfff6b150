"""The ceiling model (coordinator/ceiling.py), the lost-time split and the bandwidth floor: pure, CPU, fast."""
import pytest

from coordinator import bench_model, ceiling, floor
from coordinator.ceiling import Acceptance, Costs

# DOMAIN.md, "the two levers": 200 tokens, verification of k drafts 1 + 0.02k target steps
DOMAIN_TABLE = {
    (1.0, "same-gpu"): (1.00, 1.00, 1.00, 1.00),
    (1.0, "two-gpu"): (1.00, 1.00, 1.00, 1.00),
    (0.56, "same-gpu"): (1.00, 1.08, 1.26, 1.59),
    (0.56, "two-gpu"): (1.09, 1.23, 1.52, 1.77),
    (0.36, "same-gpu"): (1.09, 1.25, 1.63, 2.22),
    (0.36, "two-gpu"): (1.21, 1.48, 2.09, 2.72),
}


@pytest.mark.parametrize("c,placement", sorted(DOMAIN_TABLE))
def test_reproduces_domain_table(c, placement):
    # The one-GPU column is an exact expectation (dynamic programming over k); the two-GPU column an event
    # simulation averaged over seeded trials. DOMAIN.md's table came from a simulation of its own: its
    # entries and ours differ by at most 0.009 (e.g. 0.36 one GPU α=0.7: 1.244 vs 1.25).
    got = [ceiling.table_speedup(c, a, placement, trials=300) for a in (0.5, 0.7, 0.9, 1.0)]
    for value, want in zip(got, DOMAIN_TABLE[(c, placement)]):
        assert value == pytest.approx(want, abs=0.012), (c, placement, got)


def test_verify_cost_interpolates_and_extrapolates():
    costs = Costs(target_step_ms=4.0, draft_step_ms=1.0, verify_ms={2: 4.4, 6: 5.2})
    assert costs.verify(0) == 4.0
    assert costs.verify(2) == 4.4
    assert costs.verify(4) == pytest.approx(4.8)
    assert costs.verify(1) == pytest.approx(4.2)
    assert costs.verify(10) > 5.2                      # beyond the largest measured k: the fitted slope


def test_acceptance_distributions():
    dist = Acceptance.iid(0.5).accepted_dist(3)
    assert dist == pytest.approx([0.5, 0.25, 0.125, 0.125])
    seed = Acceptance.profile("seed")
    assert seed.rate(0) == 0.94 and seed.rate(100) == 0.3
    assert sum(seed.accepted_dist(12, first_distance=1)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        Acceptance.iid(1.5)


def test_pipelined_by_hand():
    # draft step 0.5, any verification 1.0: t=0 nothing drafted -> decode (t=1); drafts 0,1 ready -> verify
    # draft 1 (t=2, committed 3); then one token left -> decode (t=3)
    costs = Costs(target_step_ms=1.0, draft_step_ms=0.5, verify_ms={1: 1.0, 2: 1.0})
    assert ceiling.pipelined_decode_ms(4, costs, Acceptance.iid(1.0), 8, trials=3) == pytest.approx(3.0)
    # a draft that is always wrong never saves a step
    assert ceiling.pipelined_decode_ms(50, costs, Acceptance.iid(0.0), 8, trials=3) == pytest.approx(50.0)


def test_one_gpu_stands_aside_when_drafting_cannot_pay():
    costs = Costs(target_step_ms=4.0, draft_step_ms=3.0, verify_ms={4: 4.4})
    expected, best_k = ceiling.one_gpu_decode(100, costs, Acceptance.iid(0.3), 8)
    assert expected[100] == pytest.approx(400.0) and best_k[100] == 0
    pred = ceiling.predict("speculative", "same-gpu", 101, costs, Acceptance.iid(0.3))
    assert pred["speedup"] == pytest.approx(1.0) and "target alone" in pred["policy"]
    better = ceiling.predict("speculative", "same-gpu", 101, costs, Acceptance.iid(1.0))
    assert better["speedup"] > 1.2


def test_parallel_ceiling_by_hand():
    # two GPUs, the draft's own prefill ends 10 ms before the target's: positions 0..5 drafted (step 2 ms);
    # at α = 1 the target verifies positions 1..5 once (k = 5) and decodes the rest alone
    costs = Costs(target_step_ms=4.0, draft_step_ms=2.0, verify_ms={5: 5.0}, target_load_ms=10,
                  target_prefill_ms=40, draft_load_ms=10, draft_prefill_ms=30)
    pred = ceiling.predict("parallel", "two-gpu", 50, costs, Acceptance.iid(1.0))
    assert pred["free_drafts"] == 6
    assert pred["wall_ms"] == pytest.approx(50 + 5.0 + (49 - 6) * 4.0)
    assert pred["baseline_wall_ms"] == pytest.approx(50 + 49 * 4.0)


def _span(proc, name, start_ms, end_ms, **attrs):
    return {"kind": "span", "proc": proc, "name": name, "start_ns": int(start_ms * 1e6), "end_ns": int(end_ms * 1e6),
            "attrs": attrs, "request_id": "r"}


def test_lost_time_parts_add_up_to_the_gap():
    costs = Costs(target_step_ms=4.0, draft_step_ms=1.0, verify_ms={2: 5.0}, target_load_ms=10, target_prefill_ms=40)
    pred = {"wall_ms": 10 + 40 + 12.0}
    spans = [_span("target", "load_inputs", 1, 13), _span("target", "prefill", 13.5, 60),
             _span("target", "verify", 61, 67, k=2), _span("target", "decode", 68, 72)]
    messages = [{"kind": "message", "src": "coordinator", "dst": "target", "type": "verify", "sent_ns": int(60.5e6),
                 "recv_ns": int(60.8e6), "request_id": "r"},
                {"kind": "message", "src": "target", "dst": "coordinator", "type": "verify_result",
                 "sent_ns": int(67e6), "recv_ns": int(67.4e6), "request_id": "r"}]
    rec = {"wall_ms": 73.0, "request_start_ns": 0, "request_end_ns": int(73e6)}
    parts = bench_model.lost_time(rec, spans, messages, costs, pred)
    assert parts["total_ms"] == pytest.approx(73 - 62)
    assert sum(v for k, v in parts.items() if k != "total_ms") == pytest.approx(parts["total_ms"])
    assert parts["load_ms"] == pytest.approx(2.0) and parts["prefill_ms"] == pytest.approx(6.5)
    assert parts["steps_ms"] == pytest.approx(1.0) and parts["messages_ms"] == pytest.approx(0.7)


def test_floor_arithmetic_and_card_lookup():
    assert floor.datasheet_bandwidth("NVIDIA H200")[0] == 4800.0
    assert floor.datasheet_bandwidth("NVIDIA H100 80GB HBM3")[0] == 3350.0
    assert floor.datasheet_bandwidth("NVIDIA GeForce RTX 4090")[0] == 1008.0
    gbs, why = floor.datasheet_bandwidth("Mystery GPU 9000")
    assert gbs is None and "--bandwidth-gbs" in why
    # DOMAIN.md: 13.5 GB of weights plus ~1 GB of K/V at 4.8 TB/s is about 3.0 ms
    step = {"weight_bytes": 13.5e9, "kv_bytes_per_position": 524288}
    nbytes = floor.step_bytes(step, 2076 + 100)
    assert nbytes == pytest.approx(13.5e9 + 524288 * 2176)
    assert floor.floor_ms(nbytes, 4800.0) == pytest.approx(3.05, abs=0.01)
    assert floor.ratio(6.1, floor.floor_ms(nbytes, 4800.0)) == pytest.approx(2.0, abs=0.01)
    assert floor.step_bytes(None, 10) is None and floor.floor_ms(1e9, None) is None


def test_ceiling_command_reads_a_bench_json(tmp_path):
    import json

    from click.testing import CliRunner

    from coordinator.cli import main

    measured = {"target_step_ms": 4.0, "draft_step_ms": 1.5, "target_load_ms": 30.0, "target_prefill_ms": 70.0,
                "draft_load_ms": 40.0, "draft_prefill_ms": 40.0, "verify_ms_by_k": {"1": 4.1, "8": 4.6},
                "verify_source": "alone"}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"aggregate": {"costs_alone": {"two-gpu_mps_off": measured}}}))
    result = CliRunner().invoke(main, ["ceiling", str(path), "--alphas", "0.5,1", "--oracle-profile", ""])
    assert result.exit_code == 0, result.output
    costs = bench_model.costs_from(measured)
    want = [ceiling.predict("speculative", "two-gpu", 200, costs, Acceptance.iid(a))["speedup"] for a in (0.5, 1.0)]
    assert f"| two-gpu_mps_off | 0.38 | speculative | {want[0]:.2f}× | {want[1]:.2f}× |" in result.output
    bad = tmp_path / "other.json"
    bad.write_text("{}")
    result = CliRunner().invoke(main, ["ceiling", str(bad)])
    assert result.exit_code != 0 and "costs_alone" in result.output


def test_verification_costs_alone_are_told_from_those_beside_the_draft():
    spans = {"r": [_span("target", "verify", 0, 10, k=2), _span("draft", "draft_step", 5, 8),
                   _span("target", "verify", 30, 34, k=2), _span("target", "verify", 40, 52, k=3),
                   _span("draft", "draft_step", 45, 47)]}
    by_k, source = bench_model._verify_alone([{"request_id": "r"}], spans, "same-gpu")
    assert by_k == {2: pytest.approx(4.0), 3: pytest.approx(12.0)}     # k=2: the one alone; k=3: none alone
    assert source == "alone, except k = 3 (beside the draft)"
    by_k, source = bench_model._verify_alone([{"request_id": "r"}], spans, "two-gpu")   # no contention there
    assert by_k[2] == pytest.approx(7.0) and source == "alone"


def test_ceiling_command_on_the_h200_run_and_a_what_if_draft(tmp_path):
    """`coordinator ceiling` on the committed 2×H200 bench.json: its measured draft (c ≈ 1.2–1.3) allows
    nothing; the same run with a 2.2 ms draft step allows a speedup, more on two GPUs than on one."""
    import gzip
    import re
    from pathlib import Path

    from click.testing import CliRunner

    from coordinator.ceiling_command import ceiling_command

    src = Path(__file__).resolve().parents[1] / "benchmarks" / "2026-11-30-h200" / "bench.json.gz"
    bench_json = tmp_path / "bench.json"
    bench_json.write_bytes(gzip.decompress(src.read_bytes()))

    def table(*extra):
        result = CliRunner().invoke(ceiling_command, [str(bench_json), "--alphas", "0,1", "--oracle-profile", "",
                                                      *extra])
        assert result.exit_code == 0, result.output
        rows = {}
        for line in result.output.splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 5 and cells[2] in ("parallel", "speculative"):
                rows[(cells[0], cells[2])] = [float(re.sub("×", "", x)) for x in cells[3:]]
        return rows

    measured = table()
    assert all(v == [1.0, 1.0] for v in measured.values()) and len(measured) == 4
    faster = table("--draft-step-ms", "2.2")
    assert faster[("two-gpu_mps_off", "speculative")][1] > faster[("same-gpu_mps_off", "speculative")][1] > 1.2
    assert faster[("two-gpu_mps_off", "speculative")][0] == 1.0
