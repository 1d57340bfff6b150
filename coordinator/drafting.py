"""The draft worker's side of one request, as a pure state machine over its token list.

Owns what the draft may do next: the epoch of its branch, how many of its tokens the coordinator already
has (`sent`), how far beyond the committed prefix it may run (`max_ahead`, 0 pauses it), and a rebase that
a paused draft defers until it drafts again. Events in (a step done, REBASE, STOP); decisions out (may it
step, the committed prefix to rebase onto, which tokens go out as DRAFT). It never waits for a
verification: it drafts along its own branch until `max_ahead` and rolls back only when a REBASE opens a
new epoch (a verification rejected a token of its branch). Shared by the coordinator's tests and the draft
worker (workers.worker); never touches sockets, clocks, models or torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class SendDraft:
    """Send tokens[start_pos:end_pos] of the draft's branch `epoch` as one DRAFT."""

    epoch: int
    start_pos: int
    end_pos: int


@dataclass
class DraftState:
    max_total: int                  # answer positions the request may have (max_new_tokens)
    max_ahead: int                  # draft at most this many positions beyond the committed prefix
    eos_id: int                     # -1: never stop at EOS
    batch: int = 1                  # tokens per DRAFT message
    epoch: int = 0
    committed_len: int = 0
    sent: int = 0
    pending: list | None = None     # a new branch's committed prefix, applied when drafting resumes
    steps: int = 0

    def can_step(self, tokens: Sequence[int]) -> bool:
        """Whether to run one more draft step on `tokens` (the draft's answer so far) now."""
        return (self.pending is None and bool(tokens) and tokens[-1] != self.eos_id
                and len(tokens) < self.max_total and len(tokens) - self.committed_len < self.max_ahead)

    def on_rebase(self, epoch: int, committed: Sequence[int], max_ahead: int) -> list[int] | None:
        """The coordinator's REBASE. Returns the committed prefix to rebase the engine onto now, or None.

        The same epoch means the committed prefix extends this branch: nothing to redo, only the lookahead
        moves. A new epoch means a verification rejected a token of this branch (or the coordinator had not
        yet seen the tokens that continue it): rebase, and resend from the committed prefix on. A paused
        draft (max_ahead 0) keeps the rebase for later: it must not spend device time following the target."""
        self.committed_len = len(committed)
        if max_ahead >= 0:
            self.max_ahead = max_ahead
        if epoch != self.epoch or self.pending is not None:     # a deferred rebase follows the latest prefix
            self.epoch = epoch
            self.pending = [int(t) for t in committed]
            self.sent = self.committed_len
        if self.pending is not None and self.max_ahead > 0:
            todo, self.pending = self.pending, None
            return todo
        return None

    def after_step(self, tokens: Sequence[int]) -> SendDraft | None:
        self.steps += 1
        if len(tokens) - self.sent >= self.batch or tokens[-1] == self.eos_id:
            return self.flush(tokens)
        return None

    def flush(self, tokens: Sequence[int]) -> SendDraft | None:
        """Everything not yet sent (after prefill, a rebase, or at STOP)."""
        if self.pending is not None or len(tokens) <= self.sent:
            return None
        send = SendDraft(self.epoch, self.sent, len(tokens))
        self.sent = len(tokens)
        return send
