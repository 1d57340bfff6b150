"""The decoding core shared by every backend: KV-cache bookkeeping for prefill, decode, verify, rebase.

Owns the position convention that makes speculative decoding lossless: the cache holds the prompt and
every committed token except the last, which is *pending* (chosen, not yet fed). Verification feeds the
pending token followed by the k drafts in one forward pass; output row i is the model's choice for the
position after input i, so row i is compared with draft i. Never does I/O, timing or messaging.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence


class StepModel(Protocol):
    """What a backend's model must offer to the engine. `scores` rows are per fed position."""

    kv_len: int

    def prefill(self, prompt: Any) -> "StepOutput": ...

    def forward(self, token_ids: Sequence[int]) -> "StepOutput": ...

    def crop(self, kv_len: int) -> None: ...


@dataclass
class StepOutput:
    greedy: list[int]          # argmax per fed position
    logits: Any = None         # [n, vocab] tensor where the backend has one (needed for sampling)
    hidden: Any = None         # [n, hidden] last-layer states where asked for (adapters)


@dataclass
class ModelChoice:
    """What the model chose for one answer position: the input of a proposer (workers.proposers)."""

    token: int                 # the model's own token (greedy, or sampled from q)
    q: Any                     # the distribution `token` was drawn from; None when greedy
    out: StepOutput            # the forward pass that produced it
    row: int                   # its row in `out`


def greedy_accept(drafts: Sequence[int], target_choices: Sequence[int]) -> tuple[int, int]:
    """Longest prefix of `drafts` equal to the target's choices, and the token that follows it.

    `target_choices[i]` is the target's greedy token at the position of `drafts[i]`; it has one more
    entry than `drafts` (the bonus position). Returns (accepted, correction_or_bonus).
    """
    if len(target_choices) != len(drafts) + 1:
        raise ValueError(f"need {len(drafts) + 1} target choices for {len(drafts)} drafts, got {len(target_choices)}")
    accepted = 0
    for draft, choice in zip(drafts, target_choices):
        if draft != choice:
            break
        accepted += 1
    return accepted, int(target_choices[accepted])


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class AnswerState:
    """Tokens of the answer so far; all but the last are in the cache."""

    prompt_len: int = 0
    tokens: list[int] = field(default_factory=list)


class TokenEngine:
    """Prefill / step / verify / rebase over a StepModel, greedy unless a sampler is given."""

    def __init__(self, model: StepModel, sampler: Any = None):
        self.model = model
        self.sampler = sampler      # workers.engine.sampling.Sampler for temperature > 0, else None
        self.seq = AnswerState()
        self.last_probs = None
        # a workers.proposers.Proposer: chooses the emitted token and its q from the model's choice (raw
        # draft, benchmark oracle, adapters, fake script) while the model still runs every forward pass
        self.proposer = None
        # ids this model can embed; a committed id beyond it (the target's <video>, padding rows) is fed
        # as 0 (<unk>) so a draft with a smaller vocabulary follows the target instead of crashing
        self.feed_limit: int | None = None

    def _feed(self, token_ids):
        return self.model.forward(self._feedable(token_ids))

    def _feedable(self, token_ids):
        if self.feed_limit is None:
            return list(token_ids)
        return [t if 0 <= t < self.feed_limit else 0 for t in token_ids]

    @property
    def tokens(self) -> list[int]:
        return self.seq.tokens

    def _choose(self, out: StepOutput, row: int) -> int:
        if self.sampler is None:
            self.last_probs = None
            return int(out.greedy[row])
        token, self.last_probs = self.sampler.sample(out.logits[row])
        return token

    def _emit(self, out: StepOutput, row: int) -> int:
        token = self._choose(out, row)
        if self.proposer is not None:
            token, self.last_probs = self.proposer.propose(self.seq.tokens, ModelChoice(token, self.last_probs, out, row))
            token = int(token)
        return token

    def start(self, prompt: Any) -> int:
        """Prefill the prompt; returns the first answer token (pending)."""
        out = self.model.prefill(prompt)
        self.seq = AnswerState(prompt_len=self.model.kv_len, tokens=[])
        first = self._emit(out, len(out.greedy) - 1)
        self.seq.tokens.append(first)
        self.last_output = out
        return first

    def step(self) -> int:
        """Feed the pending token, append and return the next one."""
        out = self._feed([self.seq.tokens[-1]])
        token = self._emit(out, 0)
        self.seq.tokens.append(token)
        self.last_output = out
        return token

    def verify(self, drafts: Sequence[int], draft_probs: Any = None) -> tuple[int, int]:
        """Check `drafts` (positions len(tokens) ...) in one forward pass; commit the accepted prefix and
        the correction/bonus token; crop the cache to exactly the committed length minus the pending one."""
        drafts = [int(d) for d in drafts]
        base_kv = self.seq.prompt_len + len(self.seq.tokens) - 1
        if self.model.kv_len != base_kv:
            raise RuntimeError(f"cache holds {self.model.kv_len} positions, expected {base_kv}")
        out = self._feed([self.seq.tokens[-1]] + drafts)
        if self.sampler is None:
            accepted, nxt = greedy_accept(drafts, out.greedy)
        else:
            accepted, nxt = self.sampler.accept(drafts, draft_probs, out.logits)
        # keep the pending token and the accepted drafts; the new pending token is not in the cache
        self.model.crop(base_kv + 1 + accepted)
        self.seq.tokens.extend(drafts[:accepted])
        self.seq.tokens.append(nxt)
        self.last_output = out
        return accepted, nxt

    def rebase(self, committed: Sequence[int]) -> int | None:
        """Make `committed` the answer prefix. Keeps own tokens beyond it when they extend it; otherwise
        crops to the common prefix and feeds the rest. Returns the new next (pending) token when a
        forward pass was needed, else None."""
        committed = [int(t) for t in committed]
        own = self.seq.tokens
        if len(own) >= len(committed) and own[: len(committed)] == committed:
            return None
        keep = common_prefix_len(own, committed)
        # own[:keep] match; in the cache are prompt + own[:len(own)-1]; keep at most own[:keep] there
        keep_in_cache = min(keep, len(own) - 1) if own else 0
        self.model.crop(self.seq.prompt_len + keep_in_cache)
        feed = committed[keep_in_cache:]
        out = self._feed(feed)
        self.seq.tokens = list(committed)
        token = self._emit(out, len(feed) - 1)
        self.seq.tokens.append(token)
        self.last_output = out
        return token
