"""The coordinator's decision logic for one request, as a pure state machine over token ids.
Longer than most modules because the three modes share one state (committed prefix, epochs, windows) and splitting it would split that state.

Owns what to verify and when, when to rebase the draft, and when the answer is complete, for the modes
baseline / parallel / speculative. Events in (prefill_done, draft, verify_result, decode_result), typed
actions out (Verify, Rebase, Decode, StopDraft, Finish). Pipelined (the draft on its own device): the draft
runs up to `max_ahead` beyond the committed prefix and the target verifies whatever drafts exist whenever
it is free, so no verification waits on the draft and the draft never waits on a verification. A draft
that stands aside (coordinator.costs decided drafting cannot pay) leaves the target decoding alone from the
start. Never touches sockets or clocks, so it is tested in milliseconds; coordinator.session maps the
actions to messages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from workers.engine.core import common_prefix_len   # pure, no torch

MODES = ("baseline", "parallel", "speculative", "hf-generate")


@dataclass(frozen=True)
class Verify:
    """The target checks `tokens` (drafts of branch `epoch`) at answer positions start_pos, ..."""

    start_pos: int
    tokens: list
    epoch: int


@dataclass(frozen=True)
class Rebase:
    """Tell the draft the committed prefix, its branch epoch and how far beyond it may draft (0 pauses)."""

    epoch: int
    committed: list
    max_ahead: int


@dataclass(frozen=True)
class Decode:
    """The target decodes up to `count` tokens alone (fewer at EOS)."""

    count: int


@dataclass(frozen=True)
class StopDraft:
    reason: str


@dataclass(frozen=True)
class Finish:
    pass


Action = Union[Verify, Rebase, Decode, StopDraft, Finish]


def next_k(k: int, drafted: int, accepted: int, k_min: int, k_max: int) -> int:
    """Adaptive draft length: grow after a fully accepted round; after a rejection shrink to what was
    accepted plus one, or halve when nothing was (reaching 0 pauses the draft)."""
    if not drafted or k == 0:
        return k                  # nothing judged, or paused: only a probe resumes drafting
    if accepted == drafted:
        return min(k_max, k + 2)
    return max(k_min, min(k, accepted + 1) if accepted else k // 2)


@dataclass
class RequestState:
    mode: str
    max_new_tokens: int
    eos_id: int
    k_max: int = 16
    k_min: int = 0
    adaptive: bool = True
    probe_every: int = 8              # while paused (k = 0), try one draft every this many rounds
    lookahead_margin: int = 2
    # pipelined: the draft has its own device, so drafting ahead costs the target nothing: let it run up to
    # max_ahead beyond the committed prefix, and never pause it for being starved
    pipelined: bool = False
    max_ahead: int = 32
    k_start: int | None = None        # first window (coordinator.costs' best k), else k_max
    stood_aside: str | None = None    # why the draft does not draft this request: the target runs alone
    # speculative: hold a verification until this many drafts exist (classic synchronous windows) as
    # long as the draft can still deliver; 0 = never wait (the target decodes a token itself instead)
    wait_for_drafts: int = 0
    waiting: bool = False
    # a draft that has nothing ready this many rounds in a row cannot keep up (on one GPU it is as
    # large as the target): pause it so it stops taking the target's memory bandwidth
    starved_rounds_to_pause: int = 3
    _starved: int = 0
    # drafting pays only when a round commits more tokens than it costs in target steps: pause the draft
    # when the last `judge_rounds` drafted rounds committed fewer than `min_mean_len` tokens each. The
    # session sets it from measured costs (coordinator.costs); unmeasured, the defaults: on one GPU a
    # verification beside a running draft cost about two lone decode steps (H100, BENCHMARKS.md); on its
    # own device only the verification's extra cost over a decode step counts
    min_mean_len: float | None = None
    judge_rounds: int = 3
    max_probe_every: int = 64
    committed: list = field(default_factory=list)
    draft_seq: list = field(default_factory=list)
    epoch: int = 0
    target_busy: bool = True          # prefilling
    finished: bool = False
    prefill_done: bool = False
    free_draft_tokens: int | None = None
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    per_round: list = field(default_factory=list)   # (drafted, accepted)
    _in_flight: list = field(default_factory=list)
    _k: int = 0
    _paused_rounds: int = 0
    k_history: list = field(default_factory=list)
    _judged: list = field(default_factory=list)
    hits: int = 0                     # committed positions the draft had proposed right, in a row
    misses: int = 0                   # ... and the first wrong one after them

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}")
        self._k = self.k_max if self.k_start is None else max(0, min(self.k_max, self.k_start))
        if self.min_mean_len is None:
            self.min_mean_len = 1.5 if self.pipelined else 2.5
        if self.k_max == 0:
            self.adaptive = False       # nothing to adapt: no drafts are ever verified

    # --- queries ---------------------------------------------------------------------------

    @property
    def k(self) -> int:
        return self._k

    @property
    def output(self) -> list[int]:
        """The answer: committed tokens up to (not including) EOS, at most max_new_tokens."""
        out = self.committed[: self.max_new_tokens]
        if self.eos_id in out:
            out = out[: out.index(self.eos_id)]
        return out

    def _complete(self) -> bool:
        return len(self.committed) >= self.max_new_tokens or self.eos_id in self.committed

    def _candidates(self) -> list[int]:
        n = len(self.committed)
        if self.draft_seq[:n] != self.committed:
            return []
        return self.draft_seq[n:]

    # --- events ----------------------------------------------------------------------------

    @property
    def drafting(self) -> bool:
        return self.mode in ("parallel", "speculative") and self.stood_aside is None

    def on_prefill_done(self, first_token: int) -> list[Action]:
        self.prefill_done = True
        self.committed = [int(first_token)]
        self._judge(0)
        # drafts that were ready when the target's prefill ended; position 0 is the target's own token
        self.free_draft_tokens = max(0, len(self.draft_seq) - 1) if self.drafting else None
        self.target_busy = False
        if self._complete():
            return self._finish()
        if not self.drafting:
            return self._decode_rest()
        if self.mode == "parallel":
            cands = self._candidates()[: min(self.k_max, self.max_new_tokens - 1)]
            actions: list[Action] = [StopDraft("parallel mode: drafting is over")]
            if not cands:
                return actions + self._decode_rest()
            return actions + self._verify(cands)
        return self._reconcile() + self._maybe_verify()

    def on_draft(self, epoch: int, start_pos: int, tokens: list[int]) -> list[Action]:
        if epoch != self.epoch or start_pos > len(self.draft_seq) or self.finished:
            return []                      # stale (before a rebase) or out of order: ignore
        self.draft_seq = self.draft_seq[:start_pos] + [int(t) for t in tokens]
        if self.mode == "speculative" and self.prefill_done and not self.target_busy:
            return self._maybe_verify()
        return []

    def on_wait_timeout(self) -> list[Action]:
        """The draft did not deliver in time: verify what exists."""
        if not self.waiting or self.target_busy or self.finished:
            return []
        return self._maybe_verify(force=True)

    def _draft_can_deliver(self) -> bool:
        if self._k == 0 or (self.draft_seq and self.draft_seq[-1] == self.eos_id):
            return False
        return len(self.draft_seq) < self.max_new_tokens

    def on_verify_result(self, accepted: int, next_token: int) -> list[Action]:
        sent = self._in_flight
        if not 0 <= accepted <= len(sent):
            raise ValueError(f"target accepted {accepted} of {len(sent)} drafted tokens")
        self.target_busy = False
        n_prev = len(self.committed)
        self.committed += sent[:accepted] + [int(next_token)]
        self.drafted += len(sent)
        self.accepted += accepted
        self.rounds += 1
        self.per_round.append((len(sent), accepted))
        # judge the draft on every newly committed position it had proposed, sent or not: a draft whose
        # first token after a rebase is already wrong never gets anything verified
        proposed, agree = self._judge(n_prev)
        if self.adaptive:
            self._k = next_k(self._k, len(proposed), agree, self.k_min, self.k_max)
            self._starved = self._starved + 1 if (self._k and not sent and not proposed) else 0
            if sent:
                self._judged.append(1 + accepted)
            recent = self._judged[-self.judge_rounds:]
            unprofitable = (len(sent) > 0 and len(recent) >= self.judge_rounds
                            and sum(recent) / len(recent) < self.min_mean_len)
            starved = self._starved >= self.starved_rounds_to_pause and not self.pipelined
            if self._k and (starved or unprofitable):
                self._k, self._starved = 0, 0
                self._judged = self._judged[-1:]       # a probe is judged with its own round
            self.k_history.append(self._k)
            if self._k == 0:
                self._paused_rounds += 1
                if self._paused_rounds >= self.probe_every:
                    self._probe()
        if self._complete():
            return self._finish()
        if self.mode == "parallel":
            return self._decode_rest()
        return self._reconcile() + self._maybe_verify()

    def on_decode_result(self, tokens: list[int]) -> list[Action]:
        self.target_busy = False
        n_prev = len(self.committed)
        self.committed += [int(t) for t in tokens]
        self._judge(n_prev)
        if self.mode != "speculative" or not self.drafting or self._complete():
            return self._finish()
        # a paused draft's stretch of plain decoding is over: probe the draft again
        self._probe()
        self.k_history.append(self._k)
        return self._reconcile() + self._maybe_verify()

    def _probe(self) -> None:
        """Resume a paused draft with a short window (never beyond k_max); back off while probes fail."""
        self._k, self._paused_rounds = min(2, self.k_max), 0
        self.probe_every = min(self.max_probe_every, self.probe_every * 2)

    # --- helpers ---------------------------------------------------------------------------

    def _judge(self, n_prev: int) -> tuple[list[int], int]:
        """The draft's proposals for the positions committed since n_prev (its branch must have agreed up
        to n_prev), and how many of them agree in a row. Counts per-position hits and misses: the
        acceptance estimate hits / (hits + misses) that coordinator.costs plans with."""
        if self.draft_seq[:n_prev] != self.committed[:n_prev]:
            return [], 0
        proposed = self.draft_seq[n_prev: len(self.committed)]
        agree = common_prefix_len(proposed, self.committed[n_prev:])
        self.hits += agree
        self.misses += agree < len(proposed)
        return proposed, agree

    @property
    def alpha_estimate(self) -> float | None:
        judged = self.hits + self.misses
        return self.hits / judged if judged else None

    def _finish(self) -> list[Action]:
        self.finished = True
        return [Finish()]

    def _decode_rest(self) -> list[Action]:
        self.target_busy = True
        return [Decode(self.max_new_tokens - len(self.committed))]

    def _verify(self, cands: list[int]) -> list[Action]:
        self.target_busy = True
        self._in_flight = list(cands)
        return [Verify(start_pos=len(self.committed), tokens=list(cands), epoch=self.epoch)]

    def lookahead(self) -> int:
        """How far beyond the committed prefix the draft may run now (0: paused)."""
        if self._k == 0:
            return 0
        if self.pipelined or not self.adaptive:
            return max(self.max_ahead, self._k)
        return self._k + self.lookahead_margin

    def _reconcile(self) -> list[Action]:
        """Tell the draft the committed prefix; a new epoch when its tokens no longer extend it."""
        n = len(self.committed)
        if self.draft_seq[:n] != self.committed:
            self.epoch += 1
            self.draft_seq = list(self.committed)
        return [Rebase(epoch=self.epoch, committed=list(self.committed), max_ahead=self.lookahead())]

    def _maybe_verify(self, force: bool = False) -> list[Action]:
        if self.target_busy or self.finished:
            return []
        room = self.max_new_tokens - len(self.committed) - 1
        if self._k == 0:
            # paused (or k_max 0): the target decodes alone until the next probe, no round trip per token
            self.target_busy = True
            left = self.max_new_tokens - len(self.committed)
            count = min(max(1, self.probe_every - self._paused_rounds), left) if self.adaptive else left
            return [Decode(count)]
        cands = self._candidates()[: max(0, min(self._k, room))]
        want = min(self.wait_for_drafts, self._k, max(0, room))
        if not force and len(cands) < want and self._draft_can_deliver():
            self.waiting = True
            return []
        self.waiting = False
        return self._verify(cands)
