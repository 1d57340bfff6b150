"""The real EventGPT / Video-LLaVA workers on tiny checkpoints written in the released layouts, CPU fp32,
spawned as real processes: lossless in every mode, for a high-acceptance and an independent draft."""
import json

import pytest

from tests.conftest import load_results, run_cli

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    run_cli("make-tiny", root / "shared", "--share-weights", check=True)
    run_cli("make-tiny", root / "independent", "--seed", "7", check=True)
    run_cli("make-demo", root / "data", check=True)
    return root


def _run(tiny, draft, out, *extra):
    return run_cli("run", "--input", tiny / "data" / "dataset", "--draft-model", tiny / draft / "eventgpt",
                   "--target-model", tiny / "shared" / "videollava", "--output-dir", out, "--mps", "off",
                   "--max-new-tokens", "24", "--quiet", *extra, timeout=300)


@pytest.mark.parametrize("draft", ["shared", "independent"])
def test_lossless_in_every_mode_on_tiny_checkpoints(tiny, tmp_path, draft):
    # synchronous windows (wait for 4 drafts) so acceptance does not depend on how the two processes
    # happen to be scheduled on the test machine's cores
    proc = _run(tiny, draft, tmp_path / "out", "--question-set", "top10", "--wait-for-drafts", "4", "--k-max", "4",
                "--no-adaptive")
    assert proc.returncode == 0, proc.stderr
    res = load_results(tmp_path / "out")
    recs = res["records"]
    assert len(recs) == 12 and all(r["status"] == "ok" for r in recs)
    for r in recs:
        if r["mode"] != "baseline":
            assert r["matches_baseline"] is True, (r["sample_id"], r["mode"])
    base_texts = {r["text"] for r in recs if r["mode"] == "baseline"}
    assert len(base_texts) > 1                       # different inputs, different answers
    spec = [r for r in recs if r["mode"] == "speculative"]
    accepted = sum(r["accepted_tokens"] for r in spec)
    drafted = sum(r["drafted_tokens"] for r in spec)
    if draft == "shared":
        print(f"shared-weights draft: {accepted}/{drafted} accepted")
        assert accepted > 0 and accepted / max(1, drafted) > 0.15
    else:
        assert accepted <= 2
    info = res["run_info"]
    assert info["synthetic"] is False
    assert info["models"]["draft"].endswith("eventgpt") and info["device"]["target"] == "cpu"
    assert all(r["target"]["prompt_len"] > 8 * 17 for r in recs)          # 8 frames × 17 tokens + text
    assert all(r["draft"]["prompt_len"] > 5 + 17 for r in recs if r["draft"])
    assert info["memory_at_ready"]["target"]["rss_bytes"] > 0
    for role in ("draft", "target"):                  # the bench's floor: what one step reads, from READY
        step = info["worker_info"][role]["step_bytes"]
        assert step["weight_bytes"] > 0 and step["kv_bytes_per_position"] > 0, step


def test_broken_checkpoint_fails_at_startup_naming_the_tensor(tiny, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    broken = tmp_path / "eventgpt"
    shutil.copytree(tiny / "shared" / "eventgpt", broken)
    sd = load_file(broken / "model.safetensors")
    del sd["model.feature_adaptor.weight"]
    save_file(sd, broken / "model.safetensors")
    # the copy's mm_visual_tower ("../clip") points nowhere: --clip-path supplies the tower
    proc = run_cli("run", "--input", tiny / "data" / "dataset", "--draft-model", broken, "--target-model",
                   tiny / "shared" / "videollava", "--clip-path", tiny / "shared" / "clip",
                   "--output-dir", tmp_path / "out", "--mps", "off", timeout=120)
    assert proc.returncode != 0
    assert "model.feature_adaptor.weight" in proc.stderr and "draft" in proc.stderr


def test_a_bad_sample_is_skipped_and_reported(tiny, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny / "data" / "dataset", data)
    index = json.loads((data / "EventGPT_Instruction_Subset.json").read_text())
    victim = data / "event_npy" / (index[0]["event_data"])
    victim.write_bytes(b"not a numpy file")
    proc = run_cli("run", "--input", data, "--draft-model", tiny / "shared" / "eventgpt", "--target-model",
                   tiny / "shared" / "videollava", "--output-dir", tmp_path / "out", "--mps", "off",
                   "--max-new-tokens", "8", "--mode", "speculative", timeout=300)
    assert proc.returncode == 0, proc.stderr
    recs = load_results(tmp_path / "out")["records"]
    bad = [r for r in recs if r["status"] == "error"]
    assert len(bad) == 1 and victim.name in bad[0]["error"]
    assert victim.name in proc.stderr
    assert sum(r["status"] == "ok" for r in recs) == len(index) - 1
    proc = run_cli("run", "--input", data, "--draft-model", tiny / "shared" / "eventgpt", "--target-model",
                   tiny / "shared" / "videollava", "--output-dir", tmp_path / "out2", "--mps", "off",
                   "--max-new-tokens", "8", "--mode", "speculative", "--on-error", "fail", timeout=300)
    assert proc.returncode == 1


def test_tokenizer_mismatch_is_refused_unless_allowed(tmp_path, fake_input):
    args = ["run", "--input", fake_input, "--draft-backend", "fake", "--target-backend", "fake", "--mps", "off",
            "--draft-option", "tokenizer_checksum=other-vocab", "--output-dir", tmp_path / "o"]
    proc = run_cli(*args, timeout=60)
    assert proc.returncode == 4 and "--allow-vocab-mismatch" in proc.stderr
    proc = run_cli(*args, "--allow-vocab-mismatch", "--quiet", timeout=60)
    assert proc.returncode == 0 and "warning" in proc.stderr


def test_placement_flags_reach_each_worker_and_an_attached_draft_serves_a_run(tiny, tmp_path):
    """Two-GPU placement on the CPU: each worker reports the device it was given; a draft worker started
    on its own (as on another GPU or host) attaches over tcp on loopback."""
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    worker = subprocess.Popen([sys.executable, "-m", "workers", "--role", "draft", "--backend", "eventgpt",
                               "--model", str(tiny / "shared" / "eventgpt"), "--device", "cpu", "--precision", "fp32",
                               "--connect", endpoint], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        out = tmp_path / "out"
        proc = _run(tiny, "shared", out, "--draft-endpoint", endpoint, "--target-device", "cpu",
                    "--mode", "all", "--samples", "2")
        assert proc.returncode == 0, proc.stderr
        res = load_results(out)
        assert res["run_info"]["device"] == {"draft": "cpu", "target": "cpu"}
        recs = res["records"]
        assert len(recs) == 6 and all(r["status"] == "ok" for r in recs)
        assert all(r["matches_baseline"] for r in recs if r["mode"] != "baseline")
        assert worker.poll() is None
    finally:
        worker.kill()
        worker.wait()


def test_a_cuda_device_on_a_machine_without_one_is_a_clear_error(tiny, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _run(tiny, "shared", tmp_path / "out", "--draft-device", "cuda:1", "--startup-timeout", "60")
    assert proc.returncode != 0
    assert "cuda:1" in proc.stderr and "no CUDA device" in proc.stderr


def test_sampling_runs_through_the_pipeline_with_rejection_sampling(tiny, tmp_path):
    """--temperature > 0: the draft sends q for every drafted token, the target accepts with min(1, p/q),
    here with the draft pipelined (it runs ahead and its q rows are matched by branch epoch and position).
    (The distribution itself is tested statistically in tests/test_engine.py.)"""
    proc = _run(tiny, "shared", tmp_path / "out", "--temperature", "0.7", "--seed", "3", "--mode", "all",
                "--wait-for-drafts", "3", "--pipeline", "on")
    assert proc.returncode == 0, proc.stderr
    recs = load_results(tmp_path / "out")["records"]
    assert all(r["status"] == "ok" for r in recs)
    assert all(r["matches_baseline"] is None for r in recs)          # draws, not a greedy answer
    spec = [r for r in recs if r["mode"] == "speculative"]
    assert all(r["pipelined"] is True for r in spec)
    assert sum(r["drafted_tokens"] for r in spec) > 0
    assert sum(r["accepted_tokens"] for r in spec) > 0
    events = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert any(e.get("type") == "verify" for e in events)
