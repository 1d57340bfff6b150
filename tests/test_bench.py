"""`coordinator bench` end to end with fake workers: the oracle sweep, paired speedups, contention numbers."""
import json

from tests.conftest import run_cli


def test_bench_oracle_sweep_with_fake_workers(fake_input, tmp_path):
    out = tmp_path / "bench"
    proc = run_cli("bench", "--input", fake_input, "--draft-backend", "fake", "--target-backend", "fake",
                   "--samples", "3", "--warmup", "1", "--max-new-tokens", "24", "--alphas", "0,1",
                   "--oracle-profile", "seed", "--bench-mps", "off", "--output-dir", out,
                   "--draft-option", "step_ms=0.5", "--target-option", "step_ms=4", timeout=300)
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
        # with every draft right the target's 4 ms steps are replaced by a few verifications
        assert perfect["speedup_vs_baseline"] > 1.5
        assert hopeless["speedup_vs_baseline"] > 0.8
    # speedups are paired ratios of walls from this run
    recs = [r for r in data["records"] if r["status"] == "ok"]
    base = {r["sample_id"]: r["wall_ms"] for r in recs if r["mode"] == "baseline"}
    spec1 = sorted(base[r["sample_id"]] / r["wall_ms"] for r in recs
                   if r["mode"] == "speculative" and r["oracle"] == "alpha=1")
    assert abs(rows[("speculative", "alpha=1")]["speedup_vs_baseline"] - spec1[1]) < 1e-9
    c = data["aggregate"]["contention"]["off"]
    assert c["draft_step_ms_alone"] > 0 and c["target_prefill_ms_alone"] > 0
    assert len(data["draft_alone"]) == 3
    md = (out / "bench.md").read_text()
    assert "coordinator bench" in md and "alpha=1" in md
    assert (out / "speedup_vs_alpha.png").stat().st_size > 1000
