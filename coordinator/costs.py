"""Whether drafting can pay for the next request, from costs measured earlier in this session.

The model (../shared/DOMAIN.md, "the two levers"). With per-token acceptance α, a window of k drafts
commits E(α, k) = 1 + α + … + α^k tokens per verification. On one device the draft's k steps and the
verification share it: a round costs k·D + V(k). Pipelined (the draft on its own device) the draft drafts
the next window while the target verifies this one: a round costs max(V(k), (k+1)·D), plus one draft
step after a rejection (the draft must also pass the target's own token, so c = D/T ≥ 1 cannot pay). Drafting pays when the best window's time per committed token beats the target's own
step T by a margin, counting the drafts ready when the target's prefill ends (the window) and what the
draft's prefill costs the target's (the slowdown). `plan` is pure; `CostTracker` keeps the medians of the
spans of recent requests it reads from. Nothing here is a constant measured elsewhere: with a cost or the
acceptance unmeasured, the answer is "draft, to measure it". Never imports torch, touches sockets or clocks.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass


@dataclass
class Costs:
    target_step_ms: float | None = None       # T: a decode step of the target alone
    draft_step_ms: float | None = None        # D: a draft step while drafting
    verify_base_ms: float | None = None       # V(k) = verify_base_ms + verify_per_draft_ms * k
    verify_per_draft_ms: float = 0.0
    prefill_slowdown_ms: float = 0.0          # target prefill beside the draft minus alone (>= 0)
    free_drafts: float | None = None          # drafts ready when the target's prefill ends (None: unmeasured)
    round_overhead_ms: float = 0.0            # one GPU, in turns: a round's time beyond its k draft steps and
                                              # verification (messages, hand-overs), measured per round

    def verify_ms(self, k: int) -> float:
        return self.verify_base_ms + self.verify_per_draft_ms * k


@dataclass(frozen=True)
class Plan:
    draft: bool
    reason: str
    k: int | None = None                      # the best window, where the model knows it
    predicted_speedup: float | None = None    # decode phase (after the prefill), target alone = 1
    min_mean_len: float | None = None         # a round of window k pays only when it commits more tokens


def expected_committed(alpha: float, k: int) -> float:
    """Tokens one verification of k drafts commits: the accepted prefix plus the target's own token."""
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def round_ms(costs: Costs, k: int, alpha: float, pipelined: bool) -> float:
    verify, step = costs.verify_ms(k), costs.draft_step_ms
    if pipelined:
        # to keep ahead the draft must make the next window and the position of the target's own token
        # while the target verifies (so a draft as costly as the target cannot run ahead of it), and it
        # redoes one step after a rejection
        return max(verify, (k + 1) * step) + (1.0 - alpha ** k) * step
    return k * step + verify + costs.round_overhead_ms


def plan(costs: Costs, alpha: float | None, *, mode: str, pipelined: bool, k_max: int, max_new_tokens: int,
         margin: float = 0.02) -> Plan:
    """Draft or let the target run alone. Drafting must save more than `margin` of the target's decode time."""
    # `parallel` drafts only in the target's prefill window and verifies what is ready when it ends: its
    # price is the window (free drafts) against the prefill slowdown, and a verification only when the window
    # holds drafts. Draft steps after the window are no cost of it (on one GPU they were never uncontended,
    # so waiting for them to be measured made every parallel request draft; measured 0.96x on an H200).
    needed = [("acceptance", alpha), ("target step", costs.target_step_ms)]
    if mode == "speculative":
        needed += [("draft step", costs.draft_step_ms), ("verification", costs.verify_base_ms)]
    else:
        needed.append(("prefill window", costs.free_drafts))
        if costs.free_drafts:
            needed.append(("verification", costs.verify_base_ms))
    missing = [name for name, value in needed if value is None]
    if missing == ["acceptance"]:
        # a draft that never gets a window verified (too slow to keep ahead) never measures its acceptance:
        # if even all-accepted drafts cannot pay at these costs, measuring it is not worth its cost
        best = plan(costs, 1.0, mode=mode, pipelined=pipelined, k_max=k_max, max_new_tokens=max_new_tokens,
                    margin=margin)
        if not best.draft:
            return Plan(False, "drafting cannot pay even if every draft were accepted: "
                               + best.reason.split(": ", 1)[-1], best.k, best.predicted_speedup, best.min_mean_len)
    if missing:
        return Plan(True, f"drafting to measure what is not measured yet: {', '.join(missing)}")
    if k_max < 1:
        return Plan(False, "--k-max 0: no drafts are ever verified")
    T, n = costs.target_step_ms, max(1, max_new_tokens - 1)
    alone_ms = n * T
    free = int(min(costs.free_drafts or 0.0, k_max, n))
    window_saved = (T * (expected_committed(alpha, free) - 1.0) - (costs.verify_ms(free) - T)) if free else 0.0
    saved = window_saved - costs.prefill_slowdown_ms
    k_best, per_token, min_len = None, T, None
    if mode == "speculative":
        k_best = min(range(1, k_max + 1), key=lambda k: round_ms(costs, k, alpha, pipelined) / expected_committed(alpha, k))
        per_token = round_ms(costs, k_best, alpha, pipelined) / expected_committed(alpha, k_best)
        min_len = round_ms(costs, k_best, alpha, pipelined) / T
        saved += n * max(0.0, T - per_token)     # a window that cannot pay is paused inside the request
    speedup = alone_ms / max(1e-9, alone_ms - saved)
    where = "pipelined on its own device" if pipelined else "sharing the target's device"
    def ms(value):
        return "unmeasured" if value is None else f"{value:.2f} ms"
    verify = None if costs.verify_base_ms is None else costs.verify_ms(k_best or max(1, free))
    facts = (f"acceptance {alpha:.2f}, target step {T:.2f} ms, draft step {ms(costs.draft_step_ms)}, "
             f"verify {ms(verify)}, {costs.free_drafts or 0.0:.1f} free drafts, "
             f"prefill slowdown {costs.prefill_slowdown_ms:.1f} ms"
             + (f", {costs.round_overhead_ms:.2f} ms a round beyond its steps" if costs.round_overhead_ms else ""))
    if saved <= margin * alone_ms:
        return Plan(False, f"drafting cannot pay ({where}): predicted {speedup:.3f}x ({facts})", k_best, speedup,
                    min_len)
    return Plan(True, f"drafting pays ({where}): predicted {speedup:.3f}x ({facts})", k_best, speedup, min_len)


def turn_window(decision: Plan | None, k_max: int) -> int:
    """The largest window of a request whose draft and target take turns on one GPU: the plan's best k where
    it has one (the window that minimises time per committed token at the measured acceptance), else k_max
    (costs or acceptance unmeasured: draft to measure)."""
    if decision is None or not decision.draft or not decision.k:
        return k_max
    return max(1, min(k_max, decision.k))


MEASURE_WINDOW = 4      # the first window of a request that drafts to measure (acceptance or costs unknown)


def first_window(decision: Plan | None, k_max: int) -> int | None:
    """A request's first window: the plan's best k where it has one; a short `MEASURE_WINDOW` where it drafts
    to measure what is unknown (the window then grows by 2 after each fully accepted round, up to k_max, and
    shrinks after rejections). A first window of k_max cost a one-GPU request at acceptance 0 about 30 draft
    steps (16 + 8 + 4 + 2 + 1 before it paused: 0.79x on an H200); 4 + 2 + 1 costs 7. None: no plan (k_max)."""
    if decision is None or not decision.draft:
        return None
    return max(1, min(k_max, decision.k if decision.k else MEASURE_WINDOW))


def _median(xs) -> float | None:
    return statistics.median(xs) if xs else None


def round_overhead_ms(spans: dict) -> float | None:
    """One GPU, in turns: a round's time beyond the k draft forwards and the verification the plan prices, per
    round (None without rounds). The time from the end of the target's prefill to the end of its last
    verification that neither it (verify, decode) nor the draft (draft steps, rebases, the rest of its
    prefill) computed: the messages and hand-overs; plus what each rebase took beyond a draft step. A round's
    first draft is the rebase's forward (the draft passes the target's own token and proposes the next), so
    the plan's k draft steps include it. Measured on an H200 (bf16 target, nf4 draft, alpha 0.9): ~1.9 ms of
    hand-overs a round (four ZeroMQ hops of ~0.27 ms, the rest Python on both sides), rebases 0.3 ms longer
    than a 3.1 ms draft step."""
    target, draft = spans.get("target", []), spans.get("draft", [])
    prefill_end = max((e for n, _, e, _ in target if n == "prefill"), default=None)
    verifies = [(s, e) for n, s, e, _ in target if n == "verify" and prefill_end is not None and s >= prefill_end]
    if not verifies:
        return None
    end = max(e for _, e in verifies)
    busy = [(s, min(e, end)) for n, s, e, _ in target + draft
            if n in ("verify", "decode", "draft_step", "rebase", "prefill") and s < end and e > prefill_end]
    busy = sorted((max(s, prefill_end), e) for s, e in busy)     # a draft prefill running past the target's
    covered, reach = 0, prefill_end         # the union of the busy spans (the workers take turns, but the
    for s, e in busy:                       # draft may step while the target decodes a paused stretch)
        if e > reach:
            covered += e - max(s, reach)
            reach = e
    steps = [e - s for n, s, e, _ in draft if n == "draft_step"]
    step = statistics.median(steps) if steps else 0
    beyond = sum(max(0, e - s - step) for n, s, e, a in draft
                 if n == "rebase" and (a or {}).get("forward") and prefill_end <= s < end)
    return max(0.0, (end - prefill_end - covered + beyond) / len(verifies) / 1e6)


def decode_speedup(spans: dict, tokens: int, target_step_ms: float | None) -> float | None:
    """What a request's decode phase measured against the target alone: (tokens − 1) target steps over the
    time from the end of the target's prefill to the end of its last verification or decode step (None
    without a measured target step or a decode phase)."""
    target = spans.get("target", [])
    prefill_end = max((e for n, _, e, _ in target if n == "prefill"), default=None)
    if prefill_end is None or not target_step_ms or tokens < 2:
        return None
    end = max((e for n, s, e, _ in target if n in ("verify", "decode") and s >= prefill_end), default=None)
    if end is None or end <= prefill_end:
        return None
    return (tokens - 1) * target_step_ms / ((end - prefill_end) / 1e6)


def _overlaps(span, others) -> bool:
    """Whether [start, end) of `span` meets any span of `others` (lists of [name, start_ns, end_ns, attrs])."""
    _, start, end, _ = span
    return any(s < end and start < e for _, s, e, _ in others)


class CostTracker:
    """Running measurements of one session: the last `keep` spans of each kind, acceptance per draft strategy.

    A strategy the plan stood aside is drafted again after `reprobe_after` requests (doubling each time the
    re-measured acceptance still cannot pay), so a changed acceptance is noticed."""

    def __init__(self, keep: int = 64, reprobe_after: int = 8):
        self.target_step = deque(maxlen=keep)
        self.draft_step = deque(maxlen=keep)
        self.verify = deque(maxlen=keep)               # (k, ms)
        self.prefill_alone = deque(maxlen=8)
        self.prefill_beside = deque(maxlen=8)
        self.free = deque(maxlen=8)
        self.round_overhead = deque(maxlen=8)          # per request, one GPU in turns
        self.acceptance: dict[str, deque] = {}          # key -> (hits, judged proposals) per request
        self.outcome: dict[str, float] = {}             # key -> decode-phase speedup its last drafting
                                                        # speculative request measured on one GPU
        self.reprobe_after = reprobe_after
        self._aside: dict[str, list[int]] = {}          # key -> [requests stood aside in a row, re-probe limit]

    def observe(self, *, key: str, drafting: bool, spans: dict, free_drafts=None, hits: int = 0, misses: int = 0,
                shared_device: bool = False, mode: str = "", tokens: int | None = None):
        """One finished request: `spans` maps role -> [name, start_ns, end_ns, attrs] lists; hits and misses
        are the draft's proposals judged against the committed answer (coordinator.spec); `tokens` the
        answer's length, `mode` the request's mode.

        `shared_device`: both workers on one GPU. The plan there prices a round as k draft steps then a
        verification, one after the other, so only draft steps while the target computed nothing, and
        verifications while the draft computed nothing, are its costs; the others (a `parallel` request, the
        prefill window) ran at a share of the GPU (measured on an H200: 6.8 ms draft steps beside the target,
        3.6 ms alone) and would make drafting look unable to pay."""
        def ms(role, name):
            return [(e - s) / 1e6 for n, s, e, _ in spans.get(role, []) if n == name]
        if drafting:
            draft_steps = [x for x in spans.get("draft", []) if x[0] == "draft_step"]
            verifies = [x for x in spans.get("target", []) if x[0] == "verify"]
            if shared_device:
                overhead = round_overhead_ms(spans)
                if overhead is not None:
                    self.round_overhead.append(overhead)
                target_busy = [x for x in spans.get("target", []) if x[0] in ("prefill", "decode", "verify")]
                draft_busy = [x for x in spans.get("draft", []) if x[0] in ("prefill", "draft_step", "rebase")]
                draft_steps = [x for x in draft_steps if not _overlaps(x, target_busy)]
                verifies = [x for x in verifies if not _overlaps(x, draft_busy)]
            self.draft_step.extend((e - s) / 1e6 for _, s, e, _ in draft_steps)
            self.verify.extend((int(a.get("k", 0)), (e - s) / 1e6) for _, s, e, a in verifies)
            self.prefill_beside.extend(ms("target", "prefill"))
            if free_drafts is not None:
                self.free.append(free_drafts)
            if hits + misses:
                self.acceptance.setdefault(key, deque(maxlen=4)).append((hits, hits + misses))
            if shared_device and mode == "speculative" and tokens:
                speedup = decode_speedup(spans, tokens, _median(list(self.target_step)))
                if speedup is not None:
                    self.outcome[key] = speedup
        else:
            self.target_step.extend(ms("target", "decode"))
            self.prefill_alone.extend(ms("target", "prefill"))

    def alpha(self, key: str) -> float | None:
        rounds = self.acceptance.get(key)
        if not rounds:
            return None
        return sum(a for a, _ in rounds) / sum(d for _, d in rounds)

    def costs(self) -> Costs:
        c = Costs(target_step_ms=_median(list(self.target_step)), draft_step_ms=_median(list(self.draft_step)),
                  free_drafts=_median(list(self.free)), round_overhead_ms=_median(list(self.round_overhead)) or 0.0)
        if self.verify:
            ks = [k for k, _ in self.verify]
            if len(set(ks)) > 1:                       # least squares V(k) = a + b k
                mean_k = statistics.fmean(ks)
                mean_v = statistics.fmean(v for _, v in self.verify)
                var = sum((k - mean_k) ** 2 for k in ks)
                slope = max(0.0, sum((k - mean_k) * (v - mean_v) for k, v in self.verify) / var)
                c.verify_base_ms, c.verify_per_draft_ms = mean_v - slope * mean_k, slope
            else:
                c.verify_base_ms = _median([v for _, v in self.verify])
        alone, beside = _median(list(self.prefill_alone)), _median(list(self.prefill_beside))
        if alone is not None and beside is not None:
            c.prefill_slowdown_ms = max(0.0, beside - alone)
        return c

    def decide(self, key: str, *, mode: str, pipelined: bool, k_max: int, max_new_tokens: int) -> Plan:
        decision = plan(self.costs(), self.alpha(key), mode=mode, pipelined=pipelined, k_max=k_max,
                        max_new_tokens=max_new_tokens)
        lost = self.outcome.get(key)
        if (decision.draft and decision.predicted_speedup is not None and mode == "speculative" and not pipelined
                and lost is not None and lost < 1.0):
            # near break-even the model is optimistic: a window whose rounds commit fewer tokens than it pays
            # for is paused inside the request, and each re-probe then catches the draft up first (measured on
            # an H200 at alpha 0.9: predicted 1.03-1.04x, measured 0.90-0.95x). The last measured outcome decides.
            decision = Plan(False, f"drafting lost in this strategy's last drafting request on this GPU (measured "
                                   f"{lost:.2f}x over its decode phase; the model now predicts "
                                   f"{decision.predicted_speedup:.3f}x)", decision.k, decision.predicted_speedup,
                            decision.min_mean_len)
        aside = self._aside.setdefault(key, [0, self.reprobe_after])
        if decision.draft:
            aside[:] = [0, self.reprobe_after]
            return decision
        aside[0] += 1
        if aside[0] > aside[1]:                         # re-measure: acceptance may have changed
            aside[0], aside[1] = 0, aside[1] * 2
            return Plan(True, f"re-measuring acceptance after {aside[1] // 2} requests without drafting; "
                              f"last plan: {decision.reason}", decision.k, decision.predicted_speedup,
                        decision.min_mean_len)
        return decision
