"""Fast CPU tests for the decoding core: HFStepModel cache bookkeeping, TokenEngine verify/rebase against
no-cache greedy decoding, and the distribution kept by speculative rejection sampling.

Models are tiny random LLaMAs built from a config (no downloads). `initializer_range` is raised above the
default so that greedy continuations vary and the top-2 logit gap dwarfs cache-vs-recompute rounding.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaForCausalLM  # noqa: E402

from tests.engine_support import (PROMPT, REF_LEN, VOCAB, check_cache, prompt_ids,  # noqa: E402
                                  speculative_greedy, tiny_llama)
from workers.engine.core import TokenEngine  # noqa: E402
from workers.engine.hf import HFStepModel  # noqa: E402
from workers.engine.sampling import Sampler, speculative_accept  # noqa: E402


def perturbed(model: LlamaForCausalLM, scale: float, seed: int) -> LlamaForCausalLM:
    """A draft that agrees with `model` often but not always."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def greedy_by_recompute(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and last-position logits, re-running the whole sequence without a cache each time."""
    seq, tokens, logits = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            row = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].float()
            tokens.append(int(row.argmax()))
            logits.append(row)
            seq.append(tokens[-1])
    return tokens, logits


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def reference(target):
    return greedy_by_recompute(target, PROMPT, REF_LEN)


# --- HFStepModel + TokenEngine, greedy ------------------------------------------------------------------


@pytest.mark.parametrize("as_embeds", [False, True], ids=["input_ids", "inputs_embeds"])
def test_steps_equal_no_cache_greedy(target, reference, as_embeds):
    ref_tokens, ref_logits = reference
    if as_embeds:
        with torch.no_grad():
            prompt = {"inputs_embeds": target.get_input_embeddings()(torch.tensor([PROMPT]))}
    else:
        prompt = {**prompt_ids(), "attention_mask": torch.ones(1, len(PROMPT), dtype=torch.long)}
    model = HFStepModel(target, want_hidden=True)
    engine = TokenEngine(model)

    first = engine.start(prompt)
    out = engine.last_output
    assert model.kv_len == len(PROMPT) and engine.seq.prompt_len == len(PROMPT)
    assert len(out.greedy) == 1 and out.logits.shape == (1, VOCAB) and out.logits.dtype == torch.float32
    assert out.hidden.shape == (1, 48)
    torch.testing.assert_close(out.logits[0], ref_logits[0], atol=1e-4, rtol=1e-4)
    assert first == ref_tokens[0]

    for i in range(1, 30):
        assert engine.step() == ref_tokens[i], f"step {i}"
        torch.testing.assert_close(engine.last_output.logits[0], ref_logits[i], atol=1e-4, rtol=1e-4)
        check_cache(engine)
    assert engine.tokens == ref_tokens[:30]


def test_forward_rows_and_crop(target, reference):
    ref_tokens, ref_logits = reference
    model = HFStepModel(target, want_hidden=True)
    model.prefill(prompt_ids())
    out = model.forward(ref_tokens[:5])
    assert model.kv_len == len(PROMPT) + 5
    assert out.greedy == ref_tokens[1:6]
    assert out.logits.shape == (5, VOCAB) and out.hidden.shape == (5, 48)
    for row in range(5):
        torch.testing.assert_close(out.logits[row], ref_logits[row + 1], atol=1e-4, rtol=1e-4)
    model.crop(len(PROMPT) + 2)
    assert model.kv_len == len(PROMPT) + 2 == model.cache.get_seq_length()
    assert model.forward([ref_tokens[2]]).greedy == [ref_tokens[3]]
    with pytest.raises(ValueError):
        model.crop(model.kv_len + 1)
    model.sync()    # no-op on the CPU, must not fail


def drafts_for(case: str, truth: list[int]) -> tuple[list[int], int]:
    """Drafts of the given kind and how many of them the target must accept."""
    wrong = [(t + 1) % VOCAB for t in truth]
    if case == "right":
        return list(truth), len(truth)
    if case == "wrong":
        return wrong, 0
    good = len(truth) // 2
    return truth[:good] + wrong[good:], good


@pytest.mark.parametrize("k", [0, 1, 3, 16])
@pytest.mark.parametrize("case", ["right", "wrong", "prefix"])
def test_verify_commits_exactly_and_crops(target, reference, k, case):
    ref_tokens, _ = reference
    engine = TokenEngine(HFStepModel(target))
    engine.start(prompt_ids())
    for _ in range(3):
        engine.step()
    for _round in range(2):     # a second verify starts from the cache the first one cropped
        m = len(engine.tokens)
        drafts, expect = drafts_for(case, ref_tokens[m: m + k])
        accepted, nxt = engine.verify(drafts)
        assert (accepted, nxt) == (expect, ref_tokens[m + expect])
        assert engine.tokens == ref_tokens[: m + expect + 1]
        check_cache(engine)
    for _ in range(4):
        engine.step()
    assert engine.tokens == ref_tokens[: len(engine.tokens)]
    check_cache(engine)


@pytest.mark.parametrize("k", [1, 4, 7])
def test_speculative_loop_is_lossless(target, reference, k):
    ref_tokens, _ = reference
    independent = tiny_llama(1)
    close = perturbed(target, 0.01, seed=7)

    tokens, accepted = speculative_greedy(HFStepModel, target, target, REF_LEN, k)
    assert tokens == ref_tokens
    assert all(a == k for a in accepted), "a draft with the target's own weights must be accepted in full"

    tokens, accepted = speculative_greedy(HFStepModel, target, independent, REF_LEN, k)
    assert tokens == ref_tokens

    tokens, accepted = speculative_greedy(HFStepModel, target, close, REF_LEN, k)
    assert tokens == ref_tokens
    assert 0 in accepted and any(a > 0 for a in accepted), accepted   # both rebase paths were exercised


def test_sampled_speculative_loop_same_weights_accepts_everything(target):
    """Sampling through TokenEngine: a draft equal to the target has p == q, so every draft is accepted."""
    k, n = 4, 40
    target_engine = TokenEngine(HFStepModel(target), Sampler(1.0, seed=3))
    draft = TokenEngine(HFStepModel(target), Sampler(1.0, seed=4))
    target_engine.start(prompt_ids())
    draft.start(prompt_ids())
    probs: dict[int, torch.Tensor] = {}     # position in the answer -> the draft's distribution there
    if draft.rebase(target_engine.tokens) is not None:
        probs[len(draft.tokens) - 1] = draft.last_probs
    drafted = accepted_total = 0
    while len(target_engine.tokens) < n:
        base = len(target_engine.tokens)
        while len(draft.tokens) < base + k:
            draft.step()
            probs[len(draft.tokens) - 1] = draft.last_probs
        q = torch.stack([probs[base + i] for i in range(k)])
        accepted, _ = target_engine.verify(draft.tokens[base: base + k], q)
        drafted += k
        accepted_total += accepted
        if draft.rebase(target_engine.tokens) is not None:
            probs[len(draft.tokens) - 1] = draft.last_probs
        check_cache(target_engine)
        check_cache(draft)
    assert accepted_total == drafted


# --- rejection sampling, pure core ----------------------------------------------------------------------

DRAWS = 20_000
TV_TOLERANCE = 0.02
# chi-square critical value for 7 degrees of freedom at significance 0.001 (tables): 8 categories
CHI2_CRIT_DF7 = 24.32


def distributions(seed: int, rows: int, vocab: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Target rows p and draft rows q that differ a lot (q is sharper and puts mass elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(rows, vocab, generator=g), dim=-1)
    q = torch.softmax(2.5 * torch.randn(rows, vocab, generator=g), dim=-1)
    return p, q


def tv(counts: np.ndarray, probs: torch.Tensor) -> float:
    return 0.5 * float(np.abs(counts / counts.sum() - probs.numpy()).sum())


def chi2(counts: np.ndarray, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs.double().numpy()
    return float(((counts - expected) ** 2 / expected).sum())


def run_rejection(p, q, k: int, seed: int):
    """Many seeded rounds: drafts sampled from q, then speculative_accept. Returns the emitted sequences."""
    g = torch.Generator().manual_seed(seed)
    emitted, accepted_counts = [], []
    for _ in range(DRAWS):
        drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(k)]
        accepted, nxt = speculative_accept(drafts, q[:k], p, g)
        emitted.append(drafts[:accepted] + [nxt])
        accepted_counts.append(accepted)
    return emitted, np.array(accepted_counts)


def test_rejection_sampling_keeps_target_distribution():
    p, q = distributions(seed=11, rows=3)
    assert 0.5 * float((p[0] - q[0]).abs().sum()) > 0.2, "q must differ from p or the test cannot fail"
    alphas = torch.minimum(p, q).sum(dim=-1).double().numpy()      # acceptance probability per position

    emitted, accepted = run_rejection(p, q, k=2, seed=5)

    first = np.bincount([e[0] for e in emitted], minlength=8)
    assert tv(first, p[0]) < TV_TOLERANCE
    assert chi2(first, p[0]) < CHI2_CRIT_DF7
    # the same test rejects the draft distribution itself
    assert tv(first, q[0]) > TV_TOLERANCE and chi2(first, q[0]) > CHI2_CRIT_DF7

    # given the first draft was accepted, the second emitted token (draft 2 or its resample) follows p[1]
    second = np.bincount([e[1] for e, a in zip(emitted, accepted) if a >= 1], minlength=8)
    assert chi2(second, p[1]) < CHI2_CRIT_DF7

    # acceptance matches theory: P(first accepted) = sum(min(p0, q0)); E[accepted] = a0 + a0*a1
    rate = float((accepted >= 1).mean())
    sigma = np.sqrt(alphas[0] * (1 - alphas[0]) / DRAWS)
    assert abs(rate - alphas[0]) < 4 * sigma
    mean_accepted = alphas[0] + alphas[0] * alphas[1]
    assert abs(accepted.mean() - mean_accepted) < 4 * accepted.std() / np.sqrt(DRAWS)


def test_k0_samples_from_p_and_equal_distributions_always_accept():
    p, _ = distributions(seed=12, rows=1)
    emitted, accepted = run_rejection(p, p, k=0, seed=6)
    assert (accepted == 0).all()
    assert chi2(np.bincount([e[0] for e in emitted], minlength=8), p[0]) < CHI2_CRIT_DF7

    p, _ = distributions(seed=13, rows=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        drafts = [int(torch.multinomial(p[i], 1, generator=g)) for i in range(3)]
        assert speculative_accept(drafts, p[:3], p, g)[0] == 3


def test_rejection_edge_cases():
    g = torch.Generator().manual_seed(0)
    # a draft token that neither model allows: rejected, and the residual p - q is all zero -> sample from p
    p = torch.tensor([[0.0, 0.3, 0.7], [0.2, 0.3, 0.5]])
    nxt = [speculative_accept([0], p[:1], p, g) for _ in range(300)]
    assert all(a == 0 for a, _ in nxt) and {t for _, t in nxt} == {1, 2}
    # numpy inputs, and a target that gives the draft token zero probability
    q = np.array([[1.0, 0.0, 0.0]])
    for _ in range(50):
        accepted, token = speculative_accept([0], q, p.numpy(), g)
        assert accepted == 0 and token in (1, 2)
    with pytest.raises(ValueError):
        speculative_accept([0, 1], p[:2], p, g)        # needs k + 1 target rows
    with pytest.raises(ValueError):
        speculative_accept([0], torch.ones(1, 4) / 4, p, g)
    with pytest.raises(ValueError):
        speculative_accept([0], None, p, g)             # sampled verify without the draft's probabilities


def test_sampler_is_seeded_and_tempered():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0])
    a, b = Sampler(0.7, seed=9), Sampler(0.7, seed=9)
    draws_a = [a.sample(logits)[0] for _ in range(50)]
    assert draws_a == [b.sample(logits)[0] for _ in range(50)]
    token, probs = a.sample(logits)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(logits / 0.7, dim=-1))
    with pytest.raises(ValueError):
        Sampler(0.0, seed=1)
    # Sampler.accept applies the temperature to the target logits before speculative_accept
    target_logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 9.0, 0.0]])
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    s = Sampler(0.5, seed=2)
    results = [s.accept([0], q, target_logits) for _ in range(200)]
    p0 = float(torch.softmax(target_logits[0] / 0.5, dim=-1)[0])
    assert abs(sum(a for a, _ in results) / 200 - p0) < 0.05


def test_rejection_sampling_on_tiny_model_logits_keeps_the_targets_distribution(target):
    """Tiny LLaMA target, perturbed tiny draft, temperature 0.8: over many seeded rounds the first emitted
    token follows the target's own sampling distribution (TV < 0.04 at 20k draws over 96 tokens, where
    the draft's distribution is far off), drafted through Sampler.sample and accepted by Sampler.accept."""
    draft_model = perturbed(target, 0.3, seed=5)
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        p_logits = target(input_ids=prompt).logits[0, -1].float()
        q_logits = draft_model(input_ids=prompt).logits[0, -1].float()
    target_sampler, draft_sampler = Sampler(0.8, seed=21), Sampler(0.8, seed=22)
    p = target_sampler.probs(p_logits)
    q = draft_sampler.probs(q_logits)
    assert 0.5 * float((p - q).abs().sum()) > 0.1, "the draft must differ or the test cannot fail"
    counts = np.zeros(VOCAB)
    rows = torch.stack([p_logits, p_logits])        # row 1 (the bonus) does not affect the first token
    for _ in range(DRAWS):
        token, q_row = draft_sampler.sample(q_logits)
        accepted, nxt = target_sampler.accept([token], q_row[None], rows)
        counts[token if accepted else nxt] += 1
    assert tv(counts, p) < 0.04
    assert tv(counts, q) > 0.08
