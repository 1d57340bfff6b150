"""The coordinator's decision logic, driven by hand: what it verifies, when it rebases, what it outputs."""
import random

import pytest

from coordinator.spec import Decode, Finish, Rebase, RequestState, StopDraft, Verify, next_k
from workers.engine.core import greedy_accept

EOS = 2


def kinds(actions):
    return [type(a).__name__ for a in actions]


def simulate(mode, target, draft_fn, max_new, k_max=8, adaptive=True, drafts_before_prefill=5, **kw):
    """Play both workers by their definitions: the target's greedy answer is `target`; the draft proposes
    draft_fn(position) after the committed prefix. Returns the state after completion."""
    st = RequestState(mode=mode, max_new_tokens=max_new, eos_id=EOS, k_max=k_max, adaptive=adaptive, **kw)
    epoch_seen = 0
    draft = [draft_fn(i) for i in range(drafts_before_prefill)]
    if mode != "baseline":
        st.on_draft(0, 0, draft)
    actions = st.on_prefill_done(target[0])
    rounds = 0
    while not st.finished:
        rounds += 1
        assert rounds < 500
        nxt = []
        for a in actions:
            if isinstance(a, Verify):
                pos = a.start_pos
                assert st.committed == target[:pos] and a.epoch == st.epoch
                assert len(a.tokens) <= k_max
                choices = target[pos: pos + len(a.tokens) + 1]
                nxt += st.on_verify_result(*greedy_accept(a.tokens, choices))
            elif isinstance(a, Decode):
                have = len(st.committed)
                rest = []
                while len(rest) < a.count and (have + len(rest)) < len(target) and target[have + len(rest) - 1] != EOS:
                    rest.append(target[have + len(rest)])
                nxt += st.on_decode_result(rest)
            elif isinstance(a, Rebase):
                # the draft drafts 3 more tokens from the committed prefix after each rebase
                base = a.committed
                if a.epoch != epoch_seen:
                    epoch_seen = a.epoch
                ahead = min(3, a.max_ahead)      # a paused draft (0) drafts nothing
                seq = list(base) + [draft_fn(len(base) + i) for i in range(ahead)]
                nxt += st.on_draft(a.epoch, len(base), seq[len(base):])
            else:
                assert isinstance(a, (StopDraft, Finish))
        actions = nxt
    return st


def target_seq(n, eos_at=None, seed=0):
    rng = random.Random(seed)
    seq = [rng.randrange(3, 1000) for _ in range(n)]
    if eos_at is not None:
        seq[eos_at] = EOS
    return seq


@pytest.mark.parametrize("mode", ["baseline", "parallel", "speculative"])
@pytest.mark.parametrize("quality", ["perfect", "wrong", "prefix3", "alpha"])
def test_output_is_the_targets_greedy_answer(mode, quality):
    target = target_seq(80, eos_at=37)
    rng = random.Random(1)
    noise = [rng.random() < 0.6 for _ in range(200)]
    fn = {"perfect": lambda i: target[i], "wrong": lambda i: target[i] + 1,
          "prefix3": lambda i: target[i] if i < 3 else target[i] + 1,
          "alpha": lambda i: target[i] if noise[i] else target[i] + 1}[quality]
    st = simulate(mode, target, fn, max_new=50)
    assert st.output == target[:37]
    if mode != "baseline":
        assert st.drafted >= st.accepted >= 0
    if mode != "baseline" and quality == "wrong":
        assert st.accepted == 0


def test_token_limit_and_perfect_drafts_accept_everything():
    target = target_seq(100)
    st = simulate("speculative", target, lambda i: target[i], max_new=30)
    assert st.output == target[:30] and len(st.committed) == 30
    assert st.accepted == st.drafted > 0


def test_parallel_verifies_only_the_free_drafts_then_decodes():
    target = target_seq(60)
    st = RequestState(mode="parallel", max_new_tokens=20, eos_id=EOS)
    st.on_draft(0, 0, target[:6])
    actions = st.on_prefill_done(target[0])
    assert kinds(actions) == ["StopDraft", "Verify"]
    assert actions[1].start_pos == 1 and actions[1].tokens == target[1:6]
    assert st.free_draft_tokens == 5                 # position 0 is the target's own first token
    actions = st.on_verify_result(5, target[6])
    assert kinds(actions) == ["Decode"] and actions[0].count == 20 - 7


def test_wrong_first_draft_token_means_nothing_to_verify():
    st = RequestState(mode="parallel", max_new_tokens=10, eos_id=EOS)
    st.on_draft(0, 0, [5, 6, 7])
    actions = st.on_prefill_done(9)
    assert kinds(actions) == ["StopDraft", "Decode"]


def test_stale_drafts_after_a_rebase_are_ignored():
    st = RequestState(mode="speculative", max_new_tokens=50, eos_id=EOS, k_max=4)
    st.on_draft(0, 0, [10, 11, 12, 13])
    st.on_prefill_done(10)                      # verify [11, 12, 13]
    actions = st.on_verify_result(1, 99)        # committed 10 11 99: the draft went wrong at 12
    rebase = [a for a in actions if isinstance(a, Rebase)][0]
    assert rebase.epoch == 1 and rebase.committed == [10, 11, 99]
    assert st.on_draft(0, 4, [14, 15]) == []    # old epoch: dropped
    assert st.draft_seq == [10, 11, 99]


def test_adaptive_k_grows_on_success_and_shrinks_on_rejection():
    assert next_k(4, 4, 4, 1, 16) == 6
    assert next_k(16, 16, 16, 1, 16) == 16
    assert next_k(8, 8, 2, 1, 16) == 3
    assert next_k(8, 8, 0, 0, 16) == 4
    assert next_k(1, 1, 0, 0, 16) == 0
    assert next_k(5, 0, 0, 1, 16) == 5


def test_hopeless_drafts_pause_the_draft_and_good_ones_grow_k():
    target = target_seq(300)
    bad = simulate("speculative", target, lambda i: target[i] + 1, max_new=200, k_max=16)
    assert bad.output == target[:200]
    assert 0 in bad.k_history[:6]                       # 16 → 8 → 4 → 2 → 1 → 0, or sooner
    drafted_rounds = sum(1 for d, _ in bad.per_round if d)
    assert drafted_rounds <= 12                         # a few probes, backing off: 8, 16, 32, 64 tokens
    assert bad.probe_every == 64
    good = simulate("speculative", target, lambda i: target[i], max_new=200, k_max=16)
    assert good.output == target[:200]
    assert max(good.k_history) == 16 and 0 not in good.k_history


def test_a_paused_draft_lets_the_target_decode_alone_until_the_next_probe():
    target = target_seq(300)
    st = RequestState(mode="speculative", max_new_tokens=100, eos_id=EOS, k_max=4)
    st.on_draft(0, 0, [target[0] + 1])
    actions = st.on_prefill_done(target[0])
    for _ in range(10):                                 # rejected rounds until the draft is paused
        verify = [a for a in actions if isinstance(a, Verify)]
        if not verify:
            break
        n = len(st.committed)
        actions = st.on_verify_result(0, target[n])
    decode = [a for a in actions if isinstance(a, Decode)]
    assert st.k == 0 and decode and decode[0].count == st.probe_every - 1   # the pausing round counts
    actions = st.on_decode_result(target[len(st.committed): len(st.committed) + decode[0].count])
    assert not st.finished and st.k == 2                # probe: drafting resumes with a short window
    assert kinds(actions) == ["Rebase", "Verify"] and actions[0].max_ahead == 4


def test_waiting_for_drafts_holds_the_verification_until_k_exist():
    st = RequestState(mode="speculative", max_new_tokens=50, eos_id=EOS, k_max=4, adaptive=False, wait_for_drafts=3)
    st.on_draft(0, 0, [10, 11])
    actions = st.on_prefill_done(10)
    assert kinds(actions) == ["Rebase"] and st.waiting                 # only 1 candidate: wait
    assert st.on_draft(0, 2, [12]) == [] and st.waiting                # 2 candidates: still waiting
    actions = st.on_draft(0, 3, [13])
    verify = [a for a in actions if isinstance(a, Verify)]
    assert verify and verify[0].tokens == [11, 12, 13] and not st.waiting
    st.on_verify_result(3, 14)
    assert st.waiting                                                   # nothing drafted beyond 14 yet
    actions = st.on_wait_timeout()
    assert kinds(actions) == ["Verify"] and actions[0].tokens == []


def test_rounds_that_commit_too_little_pause_the_draft_with_backoff():
    target = target_seq(400)
    # right at one position in three: rounds commit about two tokens, below min_mean_len = 2.5
    poor = simulate("speculative", target, lambda i: target[i] if i % 3 == 0 else target[i] + 1,
                    max_new=300, k_max=8)
    assert poor.output == target[:300]
    drafted_rounds = sum(1 for d, _ in poor.per_round if d)
    assert drafted_rounds < 40                           # of 300 tokens: mostly decoded alone
    assert poor.probe_every > 8                          # failed probes back off


@pytest.mark.parametrize("k_max", [0, 1, 3])
def test_k_max_is_never_exceeded_even_after_a_probe(k_max):
    target = target_seq(300)
    # wrong at every other position: the draft is paused and probed again and again
    st = simulate("speculative", target, lambda i: target[i] if i % 2 else target[i] + 1, max_new=200, k_max=k_max)
    assert st.output == target[:200]                     # simulate() asserts every window <= k_max
    assert max(st.k_history, default=0) <= k_max
    if k_max == 0:
        assert st.drafted == 0 and st.rounds == 0


def test_lookahead_pipelined_runs_to_max_ahead_and_one_device_to_k_plus_margin():
    one = RequestState(mode="speculative", max_new_tokens=100, eos_id=EOS, k_max=4, max_ahead=32)
    two = RequestState(mode="speculative", max_new_tokens=100, eos_id=EOS, k_max=4, max_ahead=32, pipelined=True)
    for st in (one, two):
        st.on_draft(0, 0, [10])
    assert one.on_prefill_done(10)[0].max_ahead == 4 + 2
    assert two.on_prefill_done(10)[0].max_ahead == 32
    assert one.min_mean_len == 2.5 and two.min_mean_len == 1.5      # unmeasured defaults


def test_a_draft_standing_aside_leaves_the_target_decoding_alone():
    st = RequestState(mode="speculative", max_new_tokens=20, eos_id=EOS, stood_aside="cannot pay")
    actions = st.on_prefill_done(7)
    assert kinds(actions) == ["Decode"] and actions[0].count == 19 and st.free_draft_tokens is None
    assert kinds(st.on_decode_result(list(range(100, 119)))) == ["Finish"]
    par = RequestState(mode="parallel", max_new_tokens=20, eos_id=EOS, stood_aside="cannot pay")
    assert kinds(par.on_prefill_done(7)) == ["Decode"]               # no StopDraft: it never drafted


def test_acceptance_estimate_counts_every_judged_proposal():
    target = target_seq(400)
    rng = random.Random(5)
    right = [rng.random() < 0.8 for _ in range(400)]
    st = simulate("speculative", target, lambda i: target[i] if right[i] else target[i] + 1, max_new=300,
                  adaptive=False, k_max=4)
    assert st.output == target[:300]
    assert 0.7 < st.alpha_estimate < 0.9
    hopeless = simulate("speculative", target, lambda i: target[i] + 1, max_new=50)
    assert hopeless.alpha_estimate == 0.0 and hopeless.misses > 0
