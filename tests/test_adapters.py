"""Draft-to-target adapters end to end on tiny checkpoints: collect -> train -> eval through the CLI group,
the position convention through real TokenEngine draft/verify/rebase loops, and live vs offline acceptance.

The tiny draft shares the target's language model but its `lm_head` rows are permuted, so the raw draft's
greedy token is perm(what it would have said): raw acceptance is ~0, and a token adapter has something
learnable (the inverse permutation plus the target's answer patterns) from the draft's tokens alone.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from coordinator.adapter_commands import adapter_group
from workers.adapters.data import DataError, TrainValData, assign_splits, read_index, read_split
from workers.adapters.evaluate import chained_acceptance, window_acceptance
from workers.adapters.live import LiveAdapter, load_live_adapter, oracle_adapter
from workers.engine.core import ModelChoice, StepOutput, TokenEngine
from workers.engine.hf import HFStepModel

MAX_NEW = 12
TRAIN_ARGS = ["--epochs", "30", "--lr", "3e-3", "--batch-size", "8", "--d-model", "64", "--layers", "2",
              "--heads", "4", "--dropout", "0", "--patience", "5", "--seed", "0", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # two busy cores: torch's thread pool thrashes on these tiny matrices (25x slower per linear)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cli(*args):
    result = CliRunner().invoke(adapter_group, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    from workers.inputs import make_demo
    from workers.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("adapters")
    paths = make_tiny(root / "tiny", share_weights=True, seed=0)
    weights = f"{paths['eventgpt']}/model.safetensors"
    sd = load_file(weights)
    perm = torch.randperm(sd["lm_head.weight"].shape[0], generator=torch.Generator().manual_seed(1))
    sd["lm_head.weight"] = sd["lm_head.weight"][torch.argsort(perm)].contiguous()   # greedy -> perm(greedy)
    save_file(sd, weights, metadata={"format": "pt"})
    demo = make_demo(root / "demo", n_clips=8, n_sequences=4)
    data = root / "data"
    _cli("collect", "--input", demo["dataset"], "--draft-model", paths["eventgpt"], "--target-model",
         paths["videollava"], "--out", data, "--max-new-tokens", MAX_NEW, "--question-set", "top10", "--device", "cpu",
         "--quiet")
    return {"root": root, "paths": paths, "demo": demo, "data": data}


@pytest.fixture(scope="module")
def token_ckpt(setup):
    ckpt = setup["root"] / "token_ckpt"
    _cli("train", "--data", setup["data"], "--kind", "token", "--out", ckpt, *TRAIN_ARGS)
    return ckpt


@pytest.fixture(scope="module")
def hidden_ckpt(setup):
    ckpt = setup["root"] / "hidden_ckpt"
    _cli("train", "--data", setup["data"], "--kind", "hidden", "--out", ckpt, "--epochs", "10", "--lr", "3e-3",
         "--batch-size", "8", "--d-model", "64", "--heads", "4", "--dropout", "0", "--quiet")
    return ckpt


@pytest.fixture(scope="module")
def models(setup):
    from workers.models.loading import load_eventgpt, load_videollava
    return load_eventgpt(setup["paths"]["eventgpt"]), load_videollava(setup["paths"]["videollava"])


# ------------------------------------------------------------------------------------------ collection
def test_collect_splits_by_sequence_and_aligns_positions(setup, models):
    index = read_index(setup["data"])
    by_split = {}
    for rec in index["records"]:
        by_split.setdefault(rec["split"], set()).add(rec["sequence"])
    assert set(by_split) == {"train", "val", "test"}
    for a in by_split:
        for b in by_split:
            assert a == b or not by_split[a] & by_split[b], "a sequence in two splits"
    assert len(index["records"]) == 8 * 10
    # the draft row t is the draft's greedy choice after the prompt and answer[:t] (one sample, redone by hand)
    from workers.inputs import discover_samples, load_sample_inputs
    from workers.models.loading import eventgpt_prefill_inputs
    draft, _ = models
    rec = read_split(setup["data"], "test")[0]
    entry = next(e for e in index["records"] if e["key"] == rec.key)
    sample = next(s for s in discover_samples(setup["demo"]["dataset"])[0] if s["sample_id"] == entry["sample_id"])
    images = load_sample_inputs(sample, "draft")["event_images"]
    prompt, _ = eventgpt_prefill_inputs(draft, images, entry["question"])
    step = HFStepModel(draft.model)
    t = len(rec.target) // 2
    step.prefill(prompt)
    out = step.forward([int(x) for x in rec.target[:t]])
    assert out.greedy[-1] == rec.draft[t]
    # resumable: a second run adds nothing
    before = (setup["data"] / "index.json").read_text()
    out = _cli("collect", "--input", setup["demo"]["dataset"], "--draft-model", setup["paths"]["eventgpt"],
               "--target-model", setup["paths"]["videollava"], "--out", setup["data"], "--max-new-tokens", MAX_NEW,
               "--question-set", "top10", "--device", "cpu", "--quiet")
    assert "0 new" in out
    assert json.loads((setup["data"] / "index.json").read_text())["records"] == json.loads(before)["records"]


def test_assign_splits_is_seeded_and_disjoint():
    seqs = [f"s{i}" for i in range(20)]
    a = assign_splits(seqs, seed=3, val_fraction=0.1, test_fraction=0.2)
    assert a == assign_splits(list(reversed(seqs)), seed=3, val_fraction=0.1, test_fraction=0.2)
    assert sorted(a.values()).count("test") == 4 and sorted(a.values()).count("val") == 2
    assert a != assign_splits(seqs, seed=4, val_fraction=0.1, test_fraction=0.2)
    assert set(assign_splits(["a", "b", "c"], seed=0, val_fraction=0.1, test_fraction=0.1).values()) == {
        "train", "val", "test"}


# ------------------------------------------------------------------------------------------ metrics
def test_window_and_chained_acceptance_by_hand():
    target = [np.array([5, 6, 7, 8, 9, 2])]
    pred = [np.array([0, 6, 7, 0, 9, 2])]
    w = window_acceptance(pred, target, k=2)
    # starts 0..5: [0,6]->0 [6,7]->2 [7,0]->1 [0,9]->0 [9,2]->2 [2]->1
    assert (w["accepted"], w["drafted"], w["windows"]) == (6, 11, 6)
    c = chained_acceptance(pred, target, k=2, max_new_tokens=50, eos_id=2)
    # committed [5]; drafts pos1,2 -> 2 accepted + bonus pos3 -> committed 4; drafts pos4,5 -> 2 accepted: EOS
    assert (c["rounds"], c["drafted"], c["accepted"]) == (2, 4, 4)
    assert c["mean_acceptance_length"] == 1 + 4 / 2
    c = chained_acceptance(pred, target, k=8, max_new_tokens=4, eos_id=2)
    # budget 4: drafts pos1,2 (room 4-1-1) -> 2 accepted + bonus -> 4 committed, done
    assert (c["rounds"], c["drafted"], c["accepted"]) == (1, 2, 2)


# ------------------------------------------------------------------------------------------ training
def test_adapter_beats_raw_draft_on_held_out_sequences(setup, token_ckpt):
    out = _cli("eval", "--data", setup["data"], "--ckpt", token_ckpt, "--split", "test", "--k", "4")
    print(out)
    result = json.loads((token_ckpt / "eval_test_k4.json").read_text())
    adapter, raw = result["adapter"]["chained"], result["raw_draft"]["chained"]
    print(f"held-out acceptance (chained, k=4): raw draft {raw['acceptance_rate']:.3f}, "
          f"adapter {adapter['acceptance_rate']:.3f}; mean acceptance length {raw['mean_acceptance_length']:.2f} "
          f"-> {adapter['mean_acceptance_length']:.2f}")
    assert raw["acceptance_rate"] < 0.05
    assert adapter["acceptance_rate"] > raw["acceptance_rate"] + 0.15
    assert result["adapter"]["every_window"]["acceptance_rate"] > 0.15
    assert result["adapter"]["top5"] >= result["adapter"]["top1"]
    for name in ("adapter.safetensors", "config.json", "metrics.json", "curves.png"):
        assert (token_ckpt / name).is_file()
    # the checkpoint names the sequences it saw, so `run --adapter` can flag them
    from coordinator.session import adapter_seen_split
    seen = json.loads((token_ckpt / "config.json").read_text())["extra"]["sequences"]
    index = read_index(setup["data"])["records"]
    for split in ("train", "val"):
        assert sorted({e["sequence"] for e in index if e["split"] == split}) == seen[split]
        assert adapter_seen_split({"sequences": seen}, seen[split][0]) == split
    test_seq = next(e["sequence"] for e in index if e["split"] == "test")
    assert adapter_seen_split({"sequences": seen}, test_seq) is None
    metrics = json.loads((token_ckpt / "metrics.json").read_text())
    assert metrics["selected_epoch"] == max(metrics["history"], key=lambda h: (h["val_acceptance_rate"],
                                                                             -h["val_loss"]))["epoch"]


def test_training_never_reads_the_test_split(setup, token_ckpt, tmp_path):
    with pytest.raises(DataError, match="test"):
        TrainValData(setup["data"]).split("test")
    # same seed, test shards replaced by garbage: the checkpoint is bit for bit the same
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    for shard in data.glob("test-*.safetensors"):
        shard.write_bytes(b"not a shard")
    ckpt = tmp_path / "ckpt"
    _cli("train", "--data", data, "--kind", "token", "--out", ckpt, *TRAIN_ARGS)
    assert (ckpt / "adapter.safetensors").read_bytes() == (token_ckpt / "adapter.safetensors").read_bytes()
    a = json.loads((ckpt / "metrics.json").read_text())["history"]
    b = json.loads((token_ckpt / "metrics.json").read_text())["history"]
    assert a == b
    with pytest.raises(DataError):   # while evaluation does read it
        read_split(data, "test")


# ------------------------------------------------------------------------------------------ live
def speculate(draft_engine, target_engine, draft_prompt, target_prompt, k, max_new_tokens, eos_id):
    """The coordinator's greedy speculative loop with a fixed k, in-process and sequential."""
    committed = [target_engine.start(target_prompt)]
    draft_engine.start(draft_prompt)
    drafted = accepted = rounds = 0
    while len(committed) < max_new_tokens and eos_id not in committed:
        draft_engine.rebase(committed)
        n = len(committed)
        window = max(0, min(k, max_new_tokens - n - 1))
        while len(draft_engine.tokens) < n + window:
            draft_engine.step()
        drafts = draft_engine.tokens[n : n + window]
        a, nxt = target_engine.verify(drafts)
        committed = committed + drafts[:a] + [nxt]
        assert committed == target_engine.tokens
        drafted, accepted, rounds = drafted + len(drafts), accepted + a, rounds + 1
    return committed, drafted, accepted, rounds


def _prompts(setup, models, record_entry):
    from workers.inputs import discover_samples, load_sample_inputs
    from workers.models.loading import eventgpt_prefill_inputs, videollava_prefill_inputs
    draft, target = models
    sample = next(s for s in discover_samples(setup["demo"]["dataset"])[0]
                  if s["sample_id"] == record_entry["sample_id"])
    images = load_sample_inputs(sample, "draft")["event_images"]
    frames = load_sample_inputs(sample, "target")["video_frames"]
    return (eventgpt_prefill_inputs(draft, images, record_entry["question"])[0],
            videollava_prefill_inputs(target, frames, record_entry["question"])[0])


def _test_entries(setup):
    return [e for e in read_index(setup["data"])["records"] if e["split"] == "test"]


def test_oracle_adapter_gets_every_draft_accepted(setup, models):
    draft, target = models
    entries = _test_entries(setup)[:3]
    records = {r.key: r for r in read_split(setup["data"], "test", hidden=False)}
    for entry in entries:
        answer = [int(t) for t in records[entry["key"]].target]
        draft_prompt, target_prompt = _prompts(setup, models, entry)
        for k in (1, 2, 3, 5, 8):
            draft_engine = TokenEngine(HFStepModel(draft.model))
            oracle_adapter(answer).attach(draft_engine)
            committed, drafted, accepted, rounds = speculate(
                draft_engine, TokenEngine(HFStepModel(target.model)), draft_prompt, target_prompt, k, MAX_NEW, 2)
            assert committed[:MAX_NEW] == answer
            assert drafted > 0 and accepted == drafted, (k, drafted, accepted)
        # an oracle wrong at a few positions: rejections, rebases, and exactly the offline chained count
        wrong = np.array(answer)
        wrong[[3, 4, 8]] = (wrong[[3, 4, 8]] + 1) % 600
        for k in (2, 4):
            draft_engine = TokenEngine(HFStepModel(draft.model))
            oracle_adapter(wrong.tolist()).attach(draft_engine)
            committed, drafted, accepted, rounds = speculate(
                draft_engine, TokenEngine(HFStepModel(target.model)), draft_prompt, target_prompt, k, MAX_NEW, 2)
            offline = chained_acceptance([wrong], [np.array(answer)], k, MAX_NEW, 2)
            assert committed[:MAX_NEW] == answer          # lossless whatever the drafts
            assert (drafted, accepted, rounds) == (offline["drafted"], offline["accepted"], offline["rounds"])


def test_live_adapter_history_follows_rebases():
    seen = []
    live = LiveAdapter(lambda lv, pos: seen.append((pos, list(lv.draft_tokens))) or 100 + pos)

    def emit(position, token, greedy, row):
        out = StepOutput(greedy=greedy)
        proposed, q = live.propose(list(range(position)), ModelChoice(token, None, out, row))
        assert q is None                      # greedy: no distribution travels
        return proposed
    assert emit(0, 7, [7], 0) == 100
    assert emit(1, 8, [8], 0) == 101
    assert emit(2, 9, [9], 0) == 102
    # a rebase that kept position 0 and fed three tokens: rows cover positions 1..3
    assert emit(3, 33, [11, 22, 33], 2) == 103
    assert seen[-1] == (3, [7, 11, 22, 33])
    # re-emission of position 2 truncates the later history
    emit(2, 44, [44], 0)
    assert live.draft_tokens == [7, 11, 44]
    with pytest.raises(RuntimeError, match="skipped"):
        emit(5, 1, [1], 0)


@pytest.mark.parametrize("kind", ["token", "hidden"])
def test_live_acceptance_matches_offline_eval(setup, models, kind, request):
    """Live (in-process speculative loop, adapter attached to the draft engine) vs `adapter eval` chained.

    They can differ only where (a) a near-tie argmax flips between the one-pass teacher-forced collection
    and the incremental KV-cached forwards (float rounding), or (b) the live loop drafts past an EOS and
    the draft matches the target's post-EOS token, which offline counts as rejected. Tolerance 0.02.
    """
    from workers.adapters.evaluate import evaluate
    draft, target = models
    k = 4
    ckpt = request.getfixturevalue(f"{kind}_ckpt")
    offline = evaluate(setup["data"], ckpt, split="test", k=k)["adapter"]["chained"]
    live = load_live_adapter(ckpt, draft_lm=draft, device="cpu")
    records = {r.key: r for r in read_split(setup["data"], "test", hidden=False)}
    drafted = accepted = rounds = 0
    for entry in _test_entries(setup):
        draft_prompt, target_prompt = _prompts(setup, models, entry)
        draft_engine = TokenEngine(HFStepModel(draft.model, want_hidden=live.needs_hidden))
        live.attach(draft_engine)
        live.reset()
        committed, d, a, r = speculate(draft_engine, TokenEngine(HFStepModel(target.model)), draft_prompt,
                                       target_prompt, k, MAX_NEW, 2)
        assert committed[:MAX_NEW] == [int(t) for t in records[entry["key"]].target]
        drafted, accepted, rounds = drafted + d, accepted + a, rounds + r
    live_rate, live_len = accepted / drafted, 1 + accepted / rounds
    print(f"{kind} adapter, acceptance rate: live {live_rate:.3f} vs offline {offline['acceptance_rate']:.3f}; mean acceptance "
          f"length: live {live_len:.3f} vs offline {offline['mean_acceptance_length']:.3f}")
    assert abs(live_rate - offline["acceptance_rate"]) <= 0.02
    assert abs(live_len - offline["mean_acceptance_length"]) <= 0.05
    assert accepted > 0


def test_hidden_adapter_beats_raw_and_needs_hidden_states(setup, models, hidden_ckpt):
    draft, _ = models
    assert (hidden_ckpt / "target_head.safetensors").is_file()
    _cli("eval", "--data", setup["data"], "--ckpt", hidden_ckpt, "--split", "test", "--k", "4")
    result = json.loads((hidden_ckpt / "eval_test_k4.json").read_text())
    print(f"hidden adapter, held-out chained acceptance: {result['adapter']['chained']['acceptance_rate']:.3f} "
          f"(raw draft {result['raw_draft']['chained']['acceptance_rate']:.3f})")
    assert result["adapter"]["chained"]["acceptance_rate"] > result["raw_draft"]["chained"]["acceptance_rate"] + 0.1
    live = load_live_adapter(hidden_ckpt, draft_lm=draft, device="cpu")
    assert live.needs_hidden
    entry = _test_entries(setup)[0]
    draft_prompt, _ = _prompts(setup, models, entry)
    engine = TokenEngine(HFStepModel(draft.model))   # want_hidden left off
    live.attach(engine)
    with pytest.raises(RuntimeError, match="want_hidden"):
        engine.start(draft_prompt)


def test_live_adapter_refuses_sampling_and_other_drafts(models, token_ckpt):
    draft, _ = models
    live = load_live_adapter(token_ckpt, draft_lm=draft, device="cpu")
    engine = TokenEngine(HFStepModel(draft.model), sampler=object())
    with pytest.raises(ValueError, match="greedy"):
        live.attach(engine)


def test_coordinator_import_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, coordinator.cli, coordinator.adapter_commands; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_token_adapter_default_shape_is_the_seeds():
    from workers.adapters.models import AdapterConfig, build_adapter, n_parameters
    with torch.device("meta"):
        model = build_adapter(AdapterConfig.defaults("token", vocab_size=32000))
    assert 44e6 < n_parameters(model) < 47e6


def test_coordinator_run_with_the_adapter_on_held_out_samples(setup, token_ckpt, tmp_path):
    """The live path users run: `coordinator run --adapter` with real worker processes on the test split.

    Windows as offline: --wait-for-drafts 4 --k-max 4 --no-adaptive. Tolerance vs `adapter eval`
    (chained, same k): 0.15 in acceptance rate. Besides the reasons in
    test_live_acceptance_matches_offline_eval, a verification may still go out with fewer than k drafts
    (the wait times out after 200 ms), and the run asks one question per sample where collection asked
    ten."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT
    from workers.adapters.evaluate import evaluate
    test_ids = {e["sample_id"] for e in _test_entries(setup)}
    data = tmp_path / "held_out"
    shutil.copytree(setup["demo"]["dataset"], data)
    index_path = data / "EventGPT_Instruction_Subset.json"
    entries = [e for e in json.loads(index_path.read_text()) if e["id"] in test_ids]
    assert entries
    index_path.write_text(json.dumps(entries))
    offline = evaluate(setup["data"], token_ckpt, split="test", k=4)

    def run(out, *extra):
        proc = subprocess.run([sys.executable, "-m", "coordinator", "run", "--input", str(data), "--draft-model",
                               str(setup["paths"]["eventgpt"]), "--target-model", str(setup["paths"]["videollava"]),
                               "--mode", "speculative", "--k-max", "4", "--no-adaptive", "--wait-for-drafts", "4",
                               "--max-new-tokens",
                               str(MAX_NEW), "--question-set", "top10", "--mps", "off", "--output-dir", str(out),
                               "--quiet", *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        recs = json.loads((out / "results.json").read_text())["records"]
        assert recs and all(r["status"] == "ok" for r in recs)
        assert all(r.get("adapter_seen_split") is None for r in recs)       # held out: nothing to flag
        drafted = sum(r["drafted_tokens"] for r in recs)
        return sum(r["accepted_tokens"] for r in recs) / max(1, drafted), drafted
    live_rate, drafted = run(tmp_path / "with", "--adapter", str(token_ckpt))
    raw_rate, _ = run(tmp_path / "without")
    print(f"coordinator run on held-out samples: live acceptance {live_rate:.3f} with the token adapter "
          f"({drafted} drafted), {raw_rate:.3f} raw; adapter eval (chained, k=4): "
          f"{offline['adapter']['chained']['acceptance_rate']:.3f}")
    assert drafted > 0
    assert live_rate > raw_rate + 0.1
    assert abs(live_rate - offline["adapter"]["chained"]["acceptance_rate"]) <= 0.15
