"""Speculation through real processes (coordinator CLI, fake workers, no torch): pipelining across two
devices, a draft standing aside when drafting cannot pay, a broken verifier caught, hf-generate's text.
The fake target's answer depends on its whole history (workers.backends.fake), so equality with the
baseline is evidence that verification and rebasing were right."""
import json

from protocol import messages as m
from tests.conftest import load_results, run_cli
from tests.peer_support import recv_until, router_channel, spawn_worker

FAKE = ["--draft-backend", "fake", "--target-backend", "fake", "--mps", "off", "--quiet"]


def _events(out):
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def _draft_lead(events, mode):
    """How far beyond the committed prefix the draft drafted, by what it knew: for each draft step after
    the first REBASE of a request, its position minus the committed length of the last REBASE the draft
    had received (the head start before the first REBASE is left out)."""
    lead = 0
    for rid in {e["request_id"] for e in events if e.get("mode") == mode}:
        rebases = sorted((e["recv_ns"], e["committed_len"]) for e in events
                         if e["kind"] == "message" and e["type"] == "rebase" and e["request_id"] == rid)
        for step in (e for e in events if e["kind"] == "span" and e["name"] == "draft_step" and e["request_id"] == rid):
            known = [n for recv_ns, n in rebases if recv_ns <= step["start_ns"]]
            if known:
                lead = max(lead, step["attrs"]["pos"] - known[-1])
    return lead


def test_two_devices_pipeline_the_draft_and_stay_lossless(fake_input, tmp_path):
    common = [*FAKE, "--max-new-tokens", "40", "--draft-policy", "always", "--k-max", "4",
              "--draft-option", "step_ms=0.5", "--target-option", "step_ms=6", "--ignore-eos"]
    out = tmp_path / "two"
    run_cli("run", "--input", fake_input, "--output-dir", out, *common, "--draft-option", "device=cuda:1",
            "--target-option", "device=cuda:0", "--draft-option", "quality=perfect", "--mode", "all", check=True)
    recs = load_results(out)["records"]
    spec = [r for r in recs if r["mode"] == "speculative"]
    assert all(r["pipelined"] is True for r in spec)
    assert all(r["matches_baseline"] is True for r in recs if r["mode"] != "baseline")
    events = _events(out)
    # the draft ran ahead of what the target had committed, beyond the k + 2 of one device (k <= 4)
    assert _draft_lead(events, "speculative") > 4 + 2
    # right drafts: the draft never rolled back (a rebase with a forward pass)
    rebases = [e for e in events if e["kind"] == "span" and e["name"] == "rebase" and e.get("mode") == "speculative"]
    assert not [e for e in rebases if e["attrs"].get("forward")]

    wrong = tmp_path / "two-alpha"
    run_cli("run", "--input", fake_input, "--output-dir", wrong, *common, "--draft-option", "device=cuda:1",
            "--target-option", "device=cuda:0", "--draft-option", "quality=alpha:0.7", "--mode", "all", check=True)
    recs = load_results(wrong)["records"]
    assert all(r["matches_baseline"] is True for r in recs if r["mode"] != "baseline")
    assert sum(r["accepted_tokens"] for r in recs if r["mode"] == "speculative") > 0

    same = tmp_path / "one"
    run_cli("run", "--input", fake_input, "--output-dir", same, *common, "--draft-option", "quality=perfect",
            "--mode", "speculative", check=True)
    assert all(r["pipelined"] is False for r in load_results(same)["records"] if r["mode"] == "speculative")
    assert _draft_lead(_events(same), "speculative") <= 4 + 2


def test_on_one_gpu_a_draft_that_cannot_pay_stands_aside(fake_input, tmp_path):
    """Fake workers that say they share cuda:0: after the first sample has measured the costs and a hopeless
    acceptance, the target runs alone; a good draft keeps drafting."""
    # --warmup 0: the warm-up requests would measure the costs before the first sample does
    gpu = ["--draft-option", "device=cuda:0", "--target-option", "device=cuda:0", "--warmup", "0"]
    out = tmp_path / "hopeless"
    run_cli("run", "--input", fake_input, "--output-dir", out, *FAKE, *gpu, "--max-new-tokens", "30",
            "--draft-option", "quality=wrong", "--draft-option", "step_ms=5", "--target-option", "step_ms=5",
            check=True)
    recs = load_results(out)["records"]
    assert all(r["matches_baseline"] is True for r in recs if r["mode"] != "baseline")
    first, *later = sorted({r["sample_id"] for r in recs})
    aside = [r for r in recs if r["sample_id"] in later and r["mode"] != "baseline"]
    assert len(aside) == 4
    for r in aside:
        assert "cannot pay" in r["draft_stood_aside"] and r["draft_plan"]["draft"] is False
        assert r["draft"]["prefill_ms"] is None and r["drafted_tokens"] == 0     # the draft computed nothing
    assert [r["draft_stood_aside"] for r in recs if r["sample_id"] == first and r["mode"] == "parallel"] == [None]

    good = tmp_path / "good"
    run_cli("run", "--input", fake_input, "--output-dir", good, *FAKE, *gpu, "--max-new-tokens", "30",
            "--draft-option", "quality=perfect", "--draft-option", "step_ms=0.5", "--target-option", "step_ms=6",
            check=True)
    recs = load_results(good)["records"]
    spec = [r for r in recs if r["mode"] == "speculative"]
    assert all(r["draft_stood_aside"] is None and r["matches_baseline"] is True for r in spec)
    assert all(r["accepted_tokens"] > 0 for r in spec)


def test_a_broken_verifier_shows_as_a_mismatch_with_the_baseline(fake_input, tmp_path):
    out = tmp_path / "out"
    # 40 fixed-length tokens, at most 16 verified at once: every answer has a tail after a verification
    run_cli("run", "--input", fake_input, "--output-dir", out, *FAKE, "--max-new-tokens", "40", "--ignore-eos",
            "--k-max", "16", "--target-option", "fault=stale_cache", "--draft-option", "step_ms=0.5", check=True)
    recs = load_results(out)["records"]
    spec = [r for r in recs if r["mode"] != "baseline"]
    assert spec and all(r["status"] == "ok" and r["accepted_tokens"] > 0 for r in spec)
    assert all(r["matches_baseline"] is False for r in spec)


def test_hf_generate_text_is_its_own_not_the_previous_requests():
    """The fake's hf_generate, like transformers' generate(), leaves the worker's engine alone."""
    ctx, _sock, endpoint, chan = router_channel()
    proc = spawn_worker("target", endpoint)
    try:
        recv_until(chan, m.Ready)
        texts = {}
        for rid, mode, sample in (("r1", "baseline", "a"), ("r2", "hf-generate", "b")):
            chan.send(m.Prefill(request_id=rid, mode=mode, sample={"sample_id": sample, "path": "/none"},
                                question="q", max_new_tokens=8, options={"ignore_eos": True}), to="target")
            first = recv_until(chan, m.PrefillDone).first_token
            chan.send(m.Decode(request_id=rid, max_tokens=7), to="target")
            tokens = [first] + recv_until(chan, m.DecodeResult).tokens
            chan.send(m.Stop(request_id=rid), to="target")
            texts[sample] = (recv_until(chan, m.Done).stats["text"], " ".join(f"w{t}" for t in tokens))
        assert texts["a"][0] == texts["a"][1] and texts["b"][0] == texts["b"][1] and texts["a"] != texts["b"]
        chan.send(m.Shutdown(), to="target")
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        chan.close()
        ctx.term()
