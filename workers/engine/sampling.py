"""Temperature sampling and speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023).

Owns the randomness: one seeded `torch.Generator` per `Sampler`, on the CPU, so a seed gives the same tokens
whatever device produced the logits. `speculative_accept` is the pure core; it keeps the target's output
distribution exactly, whatever the draft proposes. Never does I/O, timing or model calls.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def _probs(x: Any) -> torch.Tensor:
    t = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
    return t.detach().to("cpu", torch.float32)


def _draw(probs_row: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs_row, 1, generator=generator))


def speculative_accept(
    drafts: Sequence[int], q: Any, p: Any, generator: torch.Generator
) -> tuple[int, int]:
    """Accept a prefix of `drafts` and emit the token after it.

    `q[i]` is the draft's distribution that `drafts[i]` was sampled from; `p[i]` the target's at the same
    position, with one more row for the bonus position. Returns (accepted, next_token).
    """
    drafts = [int(d) for d in drafts]
    k = len(drafts)
    p = _probs(p)
    if p.ndim != 2 or p.shape[0] < k + 1:
        raise ValueError(f"need {k + 1} target rows for {k} drafts, got shape {tuple(p.shape)}")
    if k:
        if q is None:
            raise ValueError("sampled verification needs the draft's probabilities for its drafts")
        q = _probs(q)
        if q.ndim != 2 or q.shape[0] < k or q.shape[1] != p.shape[1]:
            raise ValueError(f"need [{k}, {p.shape[1]}] draft probabilities, got shape {tuple(q.shape)}")
    uniforms = torch.rand(k, generator=generator)
    for i, x in enumerate(drafts):
        p_x, q_x = float(p[i, x]), float(q[i, x])
        # accept with probability min(1, p/q): u < 1 always passes when q <= p
        if float(uniforms[i]) * q_x < p_x:
            continue
        residual = (p[i] - q[i]).clamp_min(0.0)
        total = float(residual.sum())
        if not total > 0.0:    # p <= q everywhere up to rounding: p and q agree, so p is the residual
            residual, total = p[i], float(p[i].sum())
        return i, _draw(residual / total, generator)
    return k, _draw(p[k], generator)


class Sampler:
    """softmax(logits / temperature), sampled with a generator seeded once."""

    def __init__(self, temperature: float, seed: int):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (got {temperature}); use greedy decoding (no sampler) for 0")
        self.temperature = float(temperature)
        self.generator = torch.Generator().manual_seed(int(seed))

    def probs(self, logits: Any) -> torch.Tensor:
        return torch.softmax(_probs(logits) / self.temperature, dim=-1)

    def sample(self, logits_row: Any) -> tuple[int, torch.Tensor]:
        probs = self.probs(logits_row)
        return _draw(probs, self.generator), probs

    def accept(self, drafts: Sequence[int], draft_probs: Any, target_logits: Any) -> tuple[int, int]:
        return speculative_accept(drafts, draft_probs, self.probs(target_logits), self.generator)
