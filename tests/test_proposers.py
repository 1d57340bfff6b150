"""Draft strategies behind one interface (workers.proposers), the fake model they run on, and the draft
worker's state machine (coordinator.drafting), in-process and in milliseconds."""
import numpy as np
import pytest
import torch

from coordinator.drafting import DraftState, SendDraft
from workers.adapters.live import LiveAdapter
from workers.backends.fake import EOS, ScriptedModel, ScriptQuality, StaleCacheEngine, fake_prompt
from workers.engine.core import ModelChoice, StepOutput, TokenEngine
from workers.engine.sampling import speculative_accept
from workers.oracle import Oracle
from workers.proposers import ModelDraft, one_hot


def choice(token, q=None):
    return ModelChoice(token, q, StepOutput(greedy=[token]), 0)


# ------------------------------------------------------------------------------------- proposers
def test_raw_draft_emits_the_models_token_and_q():
    q = np.full(8, 1 / 8, np.float32)
    assert ModelDraft().propose([1, 2], choice(5, q)) == (5, q)
    assert ModelDraft().propose([], choice(5)) == (5, None)


def test_oracle_hits_alpha_and_sends_one_hot_q_when_sampling():
    answer = list(range(10, 410))
    oracle = Oracle(answer, alpha=0.7, seed=1, key="s", vocab_size=1000, eos_id=2)
    right = [oracle.propose(answer[:p], choice(999))[0] == answer[p] for p in range(400)]
    assert 0.62 < sum(right) / 400 < 0.78
    assert oracle.propose(answer[:3], choice(999))[1] is None            # greedy: no q travels
    token, q = oracle.propose(answer[:3], choice(999, np.full(1000, 1e-3, np.float32)))
    assert q.shape == (1000,) and q[token] == 1.0 and q.sum() == 1.0      # sampling: q says what it did
    assert Oracle(answer, alpha=1.0, vocab_size=1000).propose(answer[:7], choice(0))[0] == answer[7]
    assert Oracle(answer, alpha=0.0, vocab_size=1000).propose(answer[:7], choice(answer[7]))[0] != answer[7]


def test_oracle_profile_windows_follow_the_committed_prefix():
    answer = list(range(10, 60))
    oracle = Oracle(answer, profile="seed", seed=3, key="s", vocab_size=100)
    oracle.observe(answer[:5])
    assert oracle.rate(5) == 0.94 and oracle.rate(7) == 0.80      # distance from the committed prefix
    oracle.observe(answer[:7])
    assert oracle.rate(7) == 0.94
    oracle.reset()
    assert oracle.committed_len == 0


def test_one_hot_q_keeps_rejection_sampling_lossless_and_the_models_q_does_not():
    """The oracle emits a token chosen from the prefix, not drawn from the model's q. With a one-hot q the
    first emitted token is distributed as the target's p; with the model's q (the old bug) it is not."""
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    model_q = torch.tensor([0.1, 0.1, 0.1, 0.7])
    gen = torch.Generator().manual_seed(0)

    def first_token_distribution(q_row, trials=4000):
        counts = np.zeros(4)
        for _ in range(trials):
            accepted, nxt = speculative_accept([0], q_row[None], p, gen)   # the oracle always proposes 0
            counts[0 if accepted else nxt] += 1
        return counts / trials
    assert np.abs(first_token_distribution(torch.tensor(one_hot(0, model_q))) - p[0].numpy()).max() < 0.03
    assert np.abs(first_token_distribution(model_q) - p[0].numpy()).max() > 0.2


def test_live_adapter_sends_one_hot_q_under_sampling():
    live = LiveAdapter(lambda lv, pos: 3)
    token, q = live.propose([], choice(1, np.zeros(6, np.float32)))
    assert token == 3 and q.argmax() == 3 and q.sum() == 1.0


def test_script_quality_replaces_the_models_token_where_the_script_says_wrong():
    quality = ScriptQuality(lambda pos: pos < 2)
    assert quality.propose([7], choice(40))[0] == 40
    assert quality.propose([7, 8], choice(40))[0] != 40


# ------------------------------------------------------------------------------------ fake model
def engine(cls=TokenEngine):
    return cls(ScriptedModel(0, 0, 0))


PROMPT = fake_prompt("sample", "question", None, True, 100)


def test_fake_answer_depends_on_the_whole_history():
    a, b = engine(), engine()
    a.start(PROMPT), b.start(PROMPT)
    for _ in range(10):
        a.step(), b.step()
    assert a.tokens == b.tokens                                   # deterministic
    b.rebase(a.tokens[:4] + [a.tokens[4] + 1])                    # one other token at position 4 ...
    for _ in range(5):
        b.step()
    assert all(x != y for x, y in zip(a.tokens[5:10], b.tokens[5:10]))   # ... changes every later one
    b.rebase(a.tokens[:6])                                        # back on a's history: a's answer again
    while len(b.tokens) < 11:
        b.step()
    assert b.tokens == a.tokens


def test_fake_eos_at_the_scripted_length():
    e = engine()
    e.start(fake_prompt("s", "q", 6, False, 10))
    while e.tokens[-1] != EOS:
        e.step()
    assert len(e.tokens) == 7 and EOS not in e.tokens[:6]


def speculate(target, draft, k=4, n=40):
    committed = [target.start(PROMPT)]
    draft.start(PROMPT)
    while len(committed) < n:
        draft.rebase(committed)
        while len(draft.tokens) < len(committed) + k:
            draft.step()
        target.verify(draft.tokens[len(committed):len(committed) + k])
        committed = list(target.tokens)
    return committed[:n]


def test_a_broken_verification_is_caught_by_the_history_dependent_fake():
    baseline = engine()
    baseline.start(PROMPT)
    while len(baseline.tokens) < 40:
        baseline.step()
    right = speculate(engine(), engine())
    assert right == baseline.tokens[:40]
    broken = speculate(engine(StaleCacheEngine), engine())
    assert broken[:2] == baseline.tokens[:2] and broken != baseline.tokens[:40]


# ------------------------------------------------------------------------- draft state machine
def test_draft_runs_ahead_until_max_ahead_and_stops_at_eos_and_the_limit():
    st = DraftState(max_total=10, max_ahead=3, eos_id=2)
    assert st.can_step([5, 6]) and not st.can_step([5, 6, 7])       # 3 beyond the committed prefix (0)
    assert not st.can_step([5, 2])                                  # EOS
    st.on_rebase(0, [5, 6, 7], 3)
    assert st.can_step([5, 6, 7, 8, 9]) and not st.can_step([5, 6, 7, 8, 9, 10])
    assert not DraftState(max_total=4, max_ahead=9, eos_id=2).can_step([5, 6, 7, 8])


def test_same_epoch_rebase_moves_the_lookahead_without_redoing_anything():
    st = DraftState(max_total=50, max_ahead=3, eos_id=-1)
    assert st.flush([5]) == SendDraft(0, 0, 1)
    assert st.after_step([5, 6]) == SendDraft(0, 1, 2)
    assert st.after_step([5, 6, 7]) == SendDraft(0, 2, 3)
    assert st.on_rebase(0, [5, 6], 4) is None and st.committed_len == 2 and st.max_ahead == 4
    assert st.sent == 3 and st.flush([5, 6, 7]) is None           # nothing resent


def test_new_epoch_rolls_back_and_resends_from_the_committed_prefix():
    st = DraftState(max_total=50, max_ahead=8, eos_id=-1)
    st.after_step([5, 6, 7, 8])
    assert st.on_rebase(1, [5, 6, 99], -1) == [5, 6, 99] and st.max_ahead == 8
    assert st.flush([5, 6, 99, 41]) == SendDraft(1, 3, 4)         # the engine's new token, new epoch


def test_a_paused_draft_defers_its_rebase_until_it_drafts_again():
    st = DraftState(max_total=50, max_ahead=8, eos_id=-1)
    st.after_step([5, 6, 7])
    assert st.on_rebase(1, [5, 9], 0) is None and st.pending == [5, 9]
    assert not st.can_step([5, 6, 7]) and st.flush([5, 6, 7]) is None   # old branch: never sent as epoch 1
    assert st.on_rebase(1, [5, 9, 4], 2) == [5, 9, 4] and st.pending is None


def test_batched_drafts_go_out_together_and_at_eos():
    st = DraftState(max_total=50, max_ahead=9, eos_id=2, batch=3)
    st.flush([5])
    assert st.after_step([5, 6]) is None and st.after_step([5, 6, 7]) is None
    assert st.after_step([5, 6, 7, 8]) == SendDraft(0, 1, 4)
    assert st.after_step([5, 6, 7, 8, 2]) == SendDraft(0, 4, 5)
    assert st.steps == 4


@pytest.mark.parametrize("bad", [-1, 50])
def test_one_hot_refuses_tokens_outside_the_vocabulary(bad):
    with pytest.raises(ValueError, match="vocabulary"):
        one_hot(bad, np.zeros(50))
