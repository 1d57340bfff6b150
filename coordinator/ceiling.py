"""The ceiling model: what a configuration could reach, predicted from costs measured alone.

Inputs are the costs a run measures with one model at a time (target decode step, draft step, verification
of k drafts, input loading and prefill of each model) and the oracle's acceptance (an i.i.d. rate α per
position or a per-position profile). Outputs are the expected walls and speedups of `baseline`, `parallel`
and `speculative` on one GPU and on two. Pure: no clocks, sockets, files or torch; tested in milliseconds.

Assumptions (the model is an upper bound for the policies eventspec runs, not a measurement):
- Messages are free and instantaneous; a rejected or overtaken draft rolls back at once.
- One GPU runs one thing at a time: compute-bound prefills gain nothing from sharing it (DOMAIN.md, "the
  two levers"). The draft's prefill and any free drafting fit only in the GPU's idle time while the target
  loads its inputs (CPU); the rest of the draft's prefill is on the critical path. Speculation is then
  "draft k, verify", with k chosen by dynamic programming over the tokens left (k = 0: the target decodes
  alone), and the draft stands aside entirely when that is faster.
- Two GPUs do not contend: the draft drafts along its own guess without waiting; the target, when free,
  verifies every draft that exists beyond the committed prefix (at most k_max) or decodes one token itself.
  This is an event simulation, averaged over seeded trials.
- Position p drafted while the draft knew L committed tokens is right with probability rate(p - L)
  (i.i.d. α: rate = α everywhere), as the benchmark oracle does.
"""
from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field

from workers.oracle import PROFILES       # pure, no torch


@dataclass(frozen=True)
class Acceptance:
    """Probability that a draft at `distance` positions beyond the committed prefix the draft knew is right."""

    alpha: float | None = None
    rates: tuple = ()
    tail: float = 0.0

    @classmethod
    def iid(cls, alpha: float) -> "Acceptance":
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"acceptance {alpha} is not in [0, 1]")
        return cls(alpha=float(alpha))

    @classmethod
    def profile(cls, name: str) -> "Acceptance":
        if name not in PROFILES:
            raise ValueError(f"unknown acceptance profile {name!r}; choose one of {sorted(PROFILES)}")
        rates, tail = PROFILES[name]
        return cls(rates=tuple(rates), tail=float(tail))

    def rate(self, distance: int) -> float:
        if self.alpha is not None:
            return self.alpha
        distance = max(0, distance)
        return self.rates[distance] if distance < len(self.rates) else self.tail

    def accepted_dist(self, k: int, first_distance: int = 0) -> list[float]:
        """P(exactly j of k drafts accepted), j = 0..k, the first draft at `first_distance`."""
        out, run = [], 1.0
        for i in range(k):
            r = self.rate(first_distance + i)
            out.append(run * (1.0 - r))
            run *= r
        out.append(run)
        return out


@dataclass(frozen=True)
class Costs:
    """Milliseconds, each measured with the other model idle. `verify_ms[k]` for the k that were measured;
    others are interpolated (see verify)."""

    target_step_ms: float
    draft_step_ms: float
    verify_ms: dict = field(default_factory=dict)
    target_load_ms: float = 0.0
    target_prefill_ms: float = 0.0
    draft_load_ms: float = 0.0
    draft_prefill_ms: float = 0.0

    def verify(self, k: int) -> float:
        """Verification of k drafts: measured medians, linear between them, the least-squares slope beyond
        the largest measured k; k = 0 is one decode step."""
        if k <= 0:
            return self.target_step_ms
        points = sorted({0: self.target_step_ms, **{int(a): float(b) for a, b in self.verify_ms.items()
                                                     if b is not None and int(a) > 0}}.items())
        if k in dict(points):
            return dict(points)[k]
        ks = [p[0] for p in points]
        i = bisect.bisect_left(ks, k)
        if i < len(points):
            (k0, v0), (k1, v1) = points[i - 1], points[i]
            return v0 + (v1 - v0) * (k - k0) / (k1 - k0)
        return points[-1][1] + max(0.0, _slope(points)) * (k - points[-1][0])

    @classmethod
    def relative(cls, c: float, verify_per_draft: float = 0.02, step_ms: float = 1.0) -> "Costs":
        """DOMAIN.md's normalised costs: target step 1, draft step c, verification of k drafts 1 + 0.02k."""
        return cls(target_step_ms=step_ms, draft_step_ms=c * step_ms,
                   verify_ms={1: step_ms * (1 + verify_per_draft), 64: step_ms * (1 + 64 * verify_per_draft)})


def _slope(points) -> float:
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else 0.0


# --- one GPU: draft k, then verify ------------------------------------------------------------------

def one_gpu_decode(n: int, costs: Costs, acc: Acceptance, k_max: int) -> tuple[list[float], list[int]]:
    """Expected ms E[m] to commit m = 0..n more tokens from a synchronised draft, and the best k for each m.

    A round drafts k tokens (k draft steps) and verifies them; j accepted commit j + 1 tokens (the target's
    correction or bonus). k = 0 is the target decoding one token alone."""
    expected, best_k = [0.0] * (n + 1), [0] * (n + 1)
    rounds = [(k, k * costs.draft_step_ms + costs.verify(k), acc.accepted_dist(k)) for k in range(1, k_max + 1)]
    for m in range(1, n + 1):
        best, arg = costs.target_step_ms + expected[m - 1], 0
        for k, cost, probs in rounds[: max(0, min(k_max, m - 1))]:
            e = cost + sum(p * expected[m - j - 1] for j, p in enumerate(probs))
            if e < best:
                best, arg = e, k
        expected[m], best_k[m] = best, arg
    return expected, best_k


def _first_round(n: int, free: int, costs: Costs, acc: Acceptance, k_cap: int, rest) -> float:
    """Expected ms when the target, just after its prefill, finds `free` drafts (positions 0..free-1 of the
    draft's own answer, drafted knowing nothing committed): position 0 must match the target's first token,
    then positions 1.. are verified at once; rest(m) is the expected ms for m tokens after that."""
    k = min(free - 1, k_cap, n)
    if k <= 0:
        return rest(n)
    r0 = acc.rate(0)
    probs = acc.accepted_dist(k, first_distance=1)
    hit = costs.verify(k) + sum(p * rest(max(0, n - j - 1)) for j, p in enumerate(probs))
    return r0 * min(hit, rest(n)) + (1 - r0) * rest(n)


# --- two GPUs: pipelined -----------------------------------------------------------------------------

def pipelined_once(n: int, costs: Costs, acc: Acceptance, k_max: int, rng: random.Random, *,
                   committed: int = 0, first_ready_ms: float | None = None) -> float:
    """One simulated decode phase on two GPUs: ms until n tokens beyond `committed` are committed.

    Time 0 is the end of the target's prefill. The draft's answer position 0 is ready at `first_ready_ms`
    (negative: drafted during the target's prefill; None: the draft starts at time 0 with nothing drafted),
    position p one draft step after p - 1. `committed` tokens (the target's first token) exist at time 0.
    """
    c = costs.draft_step_ms
    goal = committed + n
    base, tb = (0, 0.0) if first_ready_ms is None else (0, first_ready_ms - c)   # p ready at tb + (p-base+1)c
    t = 0.0
    known_t, known_n = [-math.inf], [0]       # what the draft knows: committed count after each round
    right: dict[int, bool] = {}

    def ready_count(now: float) -> int:      # positions < this are drafted on the current branch
        return base + max(0, math.floor((now - tb) / c + 1e-9)) if now >= tb else base

    def is_right(p: int) -> bool:
        if p not in right:
            made = tb + (p - base + 1) * c
            knew = max(known_n[bisect.bisect_right(known_t, made) - 1], base)
            right[p] = rng.random() < acc.rate(p - knew)
        return right[p]

    def restart(at_pos: int, free_at: float) -> None:
        nonlocal base, tb                       # feeding the committed tokens costs one draft step
        base, tb = at_pos, free_at
        right.clear()

    if committed > 0:                           # the target's first token against the draft's position 0
        if ready_count(t) < committed or not all(is_right(p) for p in range(committed)):
            restart(committed, max(0.0, tb + c))
        known_t.append(0.0)
        known_n.append(committed)
    while committed < goal:
        k = max(0, min(k_max, ready_count(t) - committed, goal - committed - 1))
        j = 0
        while j < k and is_right(committed + j):
            j += 1
        t += costs.verify(k) if k else costs.target_step_ms
        committed += j + 1
        known_t.append(t)
        known_n.append(committed)
        last = committed - 1                    # the target's own token: correction or bonus
        if j < k or ready_count(t) <= last or not is_right(last):
            restart(committed, t)
    return t


def pipelined_decode_ms(n: int, costs: Costs, acc: Acceptance, k_max: int, *, committed: int = 0,
                        first_ready_ms: float | None = None, trials: int = 400, seed: int = 0) -> float:
    rng = random.Random(seed)
    total = sum(pipelined_once(n, costs, acc, k_max, rng, committed=committed, first_ready_ms=first_ready_ms)
                for _ in range(trials))
    return total / trials


# --- whole requests ------------------------------------------------------------------------------------

def predict(mode: str, placement: str, new_tokens: int, costs: Costs, acc: Acceptance | None, *,
            k_max: int = 16, trials: int = 400, seed: int = 0) -> dict:
    """Expected wall (ms, from PREFILL sent to the last token) of `mode` and of `baseline` with the same
    costs, their ratio, and how the ceiling gets there. The first token comes from the target's prefill."""
    n = max(0, new_tokens - 1)
    start = costs.target_load_ms + costs.target_prefill_ms
    base_wall = start + n * costs.target_step_ms
    out = {"baseline_wall_ms": base_wall, "wall_ms": base_wall, "speedup": 1.0, "policy": "target alone"}
    if mode in ("baseline", "hf-generate") or acc is None or n == 0:
        return out
    two = placement == "two-gpu"
    if two:     # no contention: the draft's answer starts when its own load + prefill end
        window = start - (costs.draft_load_ms + costs.draft_prefill_ms)
        extra = 0.0
    else:       # one GPU: the draft gets the GPU only while the target loads its inputs
        idle = costs.target_load_ms - costs.draft_load_ms
        extra = max(0.0, costs.draft_prefill_ms - max(0.0, idle))
        window = idle - costs.draft_prefill_ms
    free = int(math.floor(window / costs.draft_step_ms + 1e-9)) + 1 if window >= 0 else 0
    out["free_drafts"] = free
    if mode == "parallel":
        decode = _first_round(n, free, costs, acc, n, lambda m: m * costs.target_step_ms)
        out["policy"] = f"verify {max(0, free - 1)} free drafts, then the target alone"
    elif two:
        decode = pipelined_decode_ms(n, costs, acc, k_max, committed=1, first_ready_ms=-window,
                                     trials=trials, seed=seed)
        out["policy"] = "pipelined"
    else:
        expected, best_k = one_gpu_decode(n, costs, acc, k_max)
        decode = extra + _first_round(n, free, costs, acc, k_max, lambda m: expected[m])
        out["policy"] = f"draft k then verify (k = {best_k[n]} at the start)" + (
            f", {extra:.1f} ms of draft prefill on the critical path" if extra > 0 else "")
        if decode >= n * costs.target_step_ms:
            decode = n * costs.target_step_ms
            out["policy"] = "target alone (drafting cannot pay)"
    out["wall_ms"] = start + decode
    out["decode_ms"] = decode
    out["speedup"] = base_wall / out["wall_ms"] if out["wall_ms"] > 0 else None
    return out


def table_speedup(c: float, alpha: float, placement: str, tokens: int = 200, k_max: int = 8,
                  trials: int = 2000, seed: int = 0) -> float:
    """DOMAIN.md's table: decode only (every token costs a target step in the baseline), verification of k
    drafts 1 + 0.02k target steps, no prefill window."""
    costs = Costs.relative(c)
    acc = Acceptance.iid(alpha)
    if placement == "two-gpu":
        return tokens / pipelined_decode_ms(tokens, costs, acc, k_max, trials=trials, seed=seed)
    return tokens / one_gpu_decode(tokens, costs, acc, k_max)[0][tokens]
