"""Draft strategies behind one small interface (the shape of transformers' CandidateGenerator).

A proposer chooses the token the draft emits for the next answer position, and the distribution q it was
drawn from, given the answer prefix and what the draft model itself chose there (`ModelChoice`); it is told
what the target committed (`observe`). The draft model still runs every forward pass whatever the proposer
returns, and the engine feeds the proposed token, so timings and cache contents stay real. Implemented by:

- `ModelDraft` (here): the raw draft model, its own token and q;
- `workers.oracle.Oracle`: the benchmark oracle (the target's known answer at a chosen acceptance);
- `workers.adapters.live.LiveAdapter`: the token and hidden-state adapters;
- `workers.backends.fake.ScriptQuality`: the fake draft's scripted quality.

Losslessness under sampling needs q to be the distribution the emitted token was really drawn from: a
proposer that picks its token deterministically from the prefix returns a one-hot q (`one_hot`). Greedy
verification ignores q (None). Never imports torch, touches sockets or clocks.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class Proposer:
    """The interface, and the raw draft's behaviour: emit what the model chose."""

    def propose(self, prefix: Sequence[int], model) -> tuple[int, Any]:
        """The token for answer position len(prefix) and its q (None when verification is greedy).
        `model` is a workers.engine.core.ModelChoice."""
        return int(model.token), model.q

    def observe(self, committed: Sequence[int]) -> None:
        """The target committed `committed` (the answer prefix so far): called on every rebase."""

    def reset(self) -> None:
        """A new request starts."""


class ModelDraft(Proposer):
    """The raw draft model."""


def one_hot(token: int, like: Any) -> np.ndarray | None:
    """q for a token chosen deterministically: 1 at `token`, as wide as the model's q row `like`; None
    when the model is greedy (`like` is None)."""
    if like is None:
        return None
    width = int(like.shape[-1])
    if not 0 <= token < width:
        raise ValueError(f"proposed token {token} is outside the draft's vocabulary of {width}")
    q = np.zeros(width, dtype=np.float32)
    q[token] = 1.0
    return q
