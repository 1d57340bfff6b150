"""`coordinator bench` end to end with fake workers: the oracle sweep, paired speedups, contention numbers."""
import json

import pytest

from tests.conftest import run_cli


def test_bench_oracle_sweep_with_fake_workers(fake_input, tmp_path):
    out = tmp_path / "bench"
    proc = run_cli("bench", "--input", fake_input, "--draft-backend", "fake", "--target-backend", "fake",
                   "--samples", "3", "--warmup", "1", "--max-new-tokens", "24", "--alphas", "0,1",
                   "--oracle-profile", "seed", "--bench-mps", "off", "--output-dir", out,
                   "--draft-option", "step_ms=0.5", "--target-option", "step_ms=4",
                   "--draft-option", "weight_bytes=1000000000", "--target-option", "weight_bytes=4000000000",
                   "--target-option", "kv_bytes_per_position=1000", "--bandwidth-gbs", "500", timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "bench.json").read_text())
    rows = {(r["mode"], r["oracle"]): r for r in data["aggregate"]["rows"]}
    assert rows[("baseline", None)]["n"] == 3 and rows[("hf-generate", None)]["n"] == 3
    for mode in ("parallel", "speculative"):
        perfect, hopeless = rows[(mode, "alpha=1")], rows[(mode, "alpha=0")]
        assert perfect["acceptance_rate"] == 1.0
        assert hopeless["acceptance_rate"] in (None, 0.0)
        assert perfect["matches_baseline"] == "3/3" and hopeless["matches_baseline"] == "3/3"
        assert rows[(mode, "profile=seed")]["matches_baseline"] == "3/3"
        # with every draft right the target's 4 ms steps are replaced by a few verifications (the walls
        # also hold message handling, which a loaded 2-core machine slows: the margins are wide)
        if mode == "speculative":              # keeps drafting, so it never depends on the prefill window
            passes = [r["target"]["forward_passes"] for r in data["records"]
                      if r["mode"] == mode and r["oracle"] == "alpha=1" and r["status"] == "ok"]
            assert max(passes) < 12             # baseline: 23 decode steps
            assert perfect["speedup_vs_baseline"] > 1.15
        else:                                   # what the draft made during the 20 ms window, verified once
            assert perfect["free_draft_tokens"] >= 1 and perfect["speedup_vs_baseline"] > 1.0
        assert hopeless["speedup_vs_baseline"] > 0.8
    # speedups are paired ratios of walls from this run
    recs = [r for r in data["records"] if r["status"] == "ok"]
    base = {r["sample_id"]: r["wall_ms"] for r in recs if r["mode"] == "baseline"}
    spec1 = sorted(base[r["sample_id"]] / r["wall_ms"] for r in recs
                   if r["mode"] == "speculative" and r["oracle"] == "alpha=1")
    assert abs(rows[("speculative", "alpha=1")]["speedup_vs_baseline"] - spec1[1]) < 1e-9
    c = data["aggregate"]["contention"]["same-gpu, MPS off"]
    assert c["draft_step_ms_alone"] > 0 and c["target_prefill_ms_alone"] > 0
    assert len(data["draft_alone"]) == 3
    md = (out / "bench.md").read_text()
    assert "coordinator bench" in md and "alpha=1" in md
    assert (out / "speedup_vs_alpha.png").stat().st_size > 1000
    # the ceiling: every drafting row has a prediction from this run's costs, and the ratio is measured ÷ it
    costs = data["aggregate"]["costs_alone"]["same-gpu_mps_off"]
    assert costs["target_step_ms"] >= 4 and 0.5 <= costs["draft_step_ms"] < costs["target_step_ms"]
    for mode in ("parallel", "speculative"):
        for oracle in ("alpha=0", "alpha=1", "profile=seed"):
            row = rows[(mode, oracle)]
            assert row["predicted_speedup"] >= 1.0
            assert row["ceiling_ratio"] == row["speedup_vs_baseline"] / row["predicted_speedup"]
    assert rows[("speculative", "alpha=1")]["predicted_speedup"] > rows[("speculative", "alpha=0")]["predicted_speedup"]
    assert "Against the ceiling" in md
    # the floor: bytes from the workers' READY, bandwidth from --bandwidth-gbs and the workers' own probe
    floors = {f["step"]: f for f in data["aggregate"]["floor"]}
    target = floors["target decode"]
    prompt = data["records"][0]["target"]["prompt_len"]
    assert target["bytes"] == 4e9 + 1000 * (prompt + 12)          # K/V at prompt + half the answer
    assert target["floor_ms"] == pytest.approx(8.0 + 1000 * (prompt + 12) / 5e8)
    assert target["ratio"] == target["measured_ms"] / target["floor_ms"]
    assert target["measured_gbs"] > 0 and target["floor_ms_measured_bw"] > 0
    assert floors["draft decode"]["bytes"] == 1e9
    assert any(step.startswith("target verify k=") for step in floors)
    assert "bandwidth floor" in md
    # one probe per device, before the workers start (fake workers: the host, with numpy)
    info = data["run_info"]["same-gpu_mps_off"]
    probe = info["target"]["info"]["bandwidth"]
    assert probe["best_gbs"] == max(probe["read_gbs"], probe["copy_gbs"]) > 0 and "numpy" in probe["method"]
    assert info["draft"]["info"]["bandwidth"] == probe
    assert floors["draft decode"]["measured_gbs"] == target["measured_gbs"] == probe["best_gbs"]


def test_bench_runs_both_placements_in_one_run(fake_input, tmp_path):
    """Two-GPU placement (issue: draft and target on their own GPUs): the sweep runs in both placements,
    each worker is told its device, and the rows keep the placements apart. Fake workers report the
    device they were given, so this runs on the CPU."""
    out = tmp_path / "bench"
    proc = run_cli("bench", "--input", fake_input, "--draft-backend", "fake", "--target-backend", "fake",
                   "--samples", "2", "--warmup", "0", "--max-new-tokens", "12", "--alphas", "1",
                   "--oracle-profile", "", "--bench-mps", "off", "--no-hf-generate", "--output-dir", out,
                   "--placement", "same-gpu,two-gpu", timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "bench.json").read_text())
    info = data["run_info"]
    assert info["two-gpu_mps_off"]["draft"]["device"] == "cuda:1"
    assert info["two-gpu_mps_off"]["target"]["device"] == "cuda:0"
    assert info["same-gpu_mps_off"]["draft"]["device"] == "cpu"
    assert info["two-gpu_mps_off"]["draft"]["info"]["bandwidth"]["best_gbs"] > 0     # measured for cuda:1
    rows = data["aggregate"]["rows"]
    assert {r["placement"] for r in rows} == {"same-gpu", "two-gpu"}
    for placement in ("same-gpu", "two-gpu"):
        spec = [r for r in rows if r["placement"] == placement and r["mode"] == "speculative"]
        assert spec and spec[0]["matches_baseline"] == "2/2" and spec[0]["speedup_vs_baseline"] is not None


def test_precision_per_worker():
    from coordinator.cli import bench_command, build_specs

    kw = {p.name: p.default for p in bench_command.params}
    kw.update(draft_backend="fake", target_backend="fake", draft_option=(), target_option=(), precision="bf16",
              draft_precision="nf4", target_precision=None)
    draft, target = build_specs(kw)
    assert draft.options["precision"] == "nf4" and target.options["precision"] == "bf16"


def test_bench_without_mps_tools_measures_mps_off_and_says_why(fake_input, tmp_path, monkeypatch):
    """No nvidia-cuda-mps-control and no GPU (PATH without them): MPS on is skipped with its reason."""
    import os
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("sh"), bin_dir / "sh")
    out = tmp_path / "bench"
    proc = run_cli("bench", "--input", fake_input, "--draft-backend", "fake", "--target-backend", "fake",
                   "--samples", "1", "--warmup", "0", "--max-new-tokens", "8", "--alphas", "1", "--oracle-profile", "",
                   "--no-hf-generate", "--output-dir", out, env={"PATH": str(bin_dir)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "skipping MPS on: nvidia-cuda-mps-control is not on PATH" in proc.stderr
    data = json.loads((out / "bench.json").read_text())
    assert {r["mps"] for r in data["records"]} == {"off"} and data["records"]
    assert "Not measured:** MPS on: nvidia-cuda-mps-control is not on PATH" in (out / "bench.md").read_text()


def test_bench_where_every_request_fails_exits_non_zero(fake_input, tmp_path):
    proc = run_cli("bench", "--input", fake_input, "--draft-backend", "fake", "--target-backend", "fake",
                   "--samples", "1", "--warmup", "0", "--max-new-tokens", "8", "--alphas", "1", "--oracle-profile", "",
                   "--no-hf-generate", "--bench-mps", "off", "--modes", "parallel", "--draft-option", "quality=bogus",
                   "--output-dir", tmp_path / "b", timeout=300)
    assert proc.returncode == 1, proc.stderr           # baseline measured, parallel failed on every sample
    assert "fake quality 'bogus'" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_passes_pipeline_and_draft_policy_to_every_request(fake_input, tmp_path):
    out = tmp_path / "bench-pipe"
    proc = run_cli("bench", "--input", fake_input, "--draft-backend", "fake", "--target-backend", "fake",
                   "--samples", "1", "--warmup", "0", "--max-new-tokens", "8", "--alphas", "1", "--oracle-profile", "",
                   "--bench-mps", "off", "--no-hf-generate", "--no-measure-bandwidth", "--pipeline", "on",
                   "--draft-policy", "always", "--output-dir", out, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = json.loads((out / "bench.json").read_text())["records"]
    drafting = [r for r in records if r["mode"] in ("parallel", "speculative") and r["status"] == "ok"]
    assert drafting and all(r.get("pipelined") is True for r in drafting)
    assert all(r["matches_baseline"] for r in drafting)


class _RecordingSession:
    """Stands in for a started Session: answers every request at once and records (mode, tokens)."""

    def __init__(self):
        self.calls = []

    def run_request(self, sample, mode, *, max_new_tokens, **_):
        self.calls.append((mode, max_new_tokens))
        return {"status": "ok", "mode": mode, "sample_id": sample["sample_id"], "request_id": str(len(self.calls)),
                "output_ids": [1] * max_new_tokens, "committed_ids": [1] * max_new_tokens}


@pytest.mark.parametrize("warmup", [0, 1])
def test_each_sample_is_primed_before_its_baseline_is_measured(warmup, tmp_path):
    """A new prompt length's first prefill is slower (measured: 130 vs 72 ms on an H200); with warm-up on,
    short unmeasured requests of every mode come first, so the measured baseline does not pay for it."""
    from coordinator.bench import PRIME_TOKENS, BenchConfig, sample_records
    from coordinator.session import WorkerSpec

    cfg = BenchConfig(input="x", output_dir=tmp_path, draft=WorkerSpec(role="draft", backend="fake"),
                      target=WorkerSpec(role="target", backend="fake"),
                      warmup=warmup, alphas=[1.0], profiles=[], hf_generate=False)
    session = _RecordingSession()
    records = list(sample_records(session, cfg, {"sample_id": "s0"}, 24, "off", "same-gpu"))
    assert [(r["mode"], r["max_new_tokens"]) for r in records] == [("baseline", 24), ("parallel", 24), ("speculative", 24)]
    primed = [("baseline", PRIME_TOKENS), ("parallel", PRIME_TOKENS), ("speculative", PRIME_TOKENS)] if warmup else []
    assert session.calls == primed + [("baseline", 24), ("parallel", 24), ("speculative", 24)]


def test_floor_section_says_why_a_bandwidth_column_is_empty():
    from coordinator.bench_model import floor_rows
    from coordinator.bench_report import model_sections

    step = {"weight_bytes": 1_000_000_000, "kv_bytes_per_position": 1000}
    run_info = {"same-gpu_mps_off": {
        "target": {"info": {"cuda_device": "NVIDIA H200", "step_bytes": step,
                            "bandwidth": {"method": "failed", "error": "TypeError: sum() received\nmore"}}},
        "draft": {"info": {"cuda_device": "NVIDIA H200", "step_bytes": step,
                           "bandwidth": {"method": "x", "best_gbs": 4000.0}}}}}
    sessions = {"same-gpu_mps_off": {"target_step_ms": 0.5, "draft_step_ms": 0.4}}
    floors = floor_rows(run_info, [], sessions, [], answer_positions=0)
    by_step = {f["step"]: f for f in floors}
    assert by_step["target decode"]["measured_gbs"] is None and by_step["draft decode"]["measured_gbs"] == 4000.0
    md = "\n".join(model_sections({"aggregate": {"rows": [], "floor": floors}}))
    assert "the target's bandwidth probe failed: TypeError: sum() received" in md
    assert "the draft's bandwidth probe failed" not in md
