"""The benchmark oracle: replaces the draft's token ids with the target's known answer at a controlled
acceptance rate, while the draft model still runs every forward pass (so timings and contention are real).

Each answer position is right with probability alpha (i.i.d.), or with the rate of a per-position
profile indexed by distance from the committed prefix. Draws are a pure function of (seed, sample,
position[, window start]) so re-drafting a position after a rebase gives the same answer. No torch.

A `workers.proposers.Proposer`. Its token is a deterministic function of the prefix, so under sampling its
q is one-hot at that token: rejection sampling then keeps the target's output distribution exactly
(lossless), and a right token is accepted with probability p_target(token) (acceptance is alpha only with
greedy verification).
"""
from __future__ import annotations

import hashlib

from workers.proposers import Proposer, one_hot

# per-position match rates of the draft window measured in the research repository, then a flat tail
SEED_PROFILE = (0.94, 0.97, 0.80, 0.89, 0.76, 0.72, 0.54, 0.48, 0.39, 0.38)
SEED_TAIL = 0.3
PROFILES = {"seed": (SEED_PROFILE, SEED_TAIL)}


def _uniform(*parts) -> float:
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def wrong_token(token: int, vocab_size: int) -> int:
    """A token guaranteed to differ from `token` (and never a special id below 3)."""
    return 3 + (token - 3 + 1) % (vocab_size - 3)


class Oracle(Proposer):
    def __init__(self, answer: list[int], *, alpha: float | None = None, profile: str | None = None,
                 seed: int = 0, key: str = "", vocab_size: int = 32000, eos_id: int = 2):
        if (alpha is None) == (profile is None):
            raise ValueError("oracle: give exactly one of alpha or profile")
        if profile is not None and profile not in PROFILES:
            raise ValueError(f"oracle profile {profile!r}: choose one of {sorted(PROFILES)}")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"oracle alpha {alpha} is not in [0, 1]")
        self.answer = [int(t) for t in answer]
        self.alpha, self.profile = alpha, profile
        self.seed, self.key = seed, key
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.committed_len = 0          # kept current by observe() (every REBASE)

    @classmethod
    def from_options(cls, spec: dict, *, key: str, vocab_size: int, eos_id: int) -> "Oracle":
        """From a request's `oracle` option: {answer, alpha | profile, seed}."""
        if not isinstance(spec, dict) or not isinstance(spec.get("answer"), list):
            raise ValueError("the oracle option needs {'answer': [token ids], 'alpha' or 'profile': ...}")
        return cls(spec["answer"], alpha=spec.get("alpha"), profile=spec.get("profile"),
                   seed=int(spec.get("seed", 0)), key=key, vocab_size=vocab_size, eos_id=eos_id)

    def rate(self, position: int) -> float:
        if self.alpha is not None:
            return self.alpha
        rates, tail = PROFILES[self.profile]
        distance = max(0, position - self.committed_len)
        return rates[distance] if distance < len(rates) else tail

    def is_right(self, position: int) -> bool:
        window = "iid" if self.alpha is not None else self.committed_len
        return _uniform(self.seed, self.key, position, window) < self.rate(position)

    def token_at(self, position: int) -> int:
        truth = self.answer[position] if position < len(self.answer) else self.eos_id
        return truth if self.is_right(position) else wrong_token(truth, self.vocab_size)

    def propose(self, prefix, model) -> tuple[int, object]:
        token = self.token_at(len(prefix))
        return token, one_hot(token, model.q)

    def observe(self, committed) -> None:
        self.committed_len = len(committed)

    def reset(self) -> None:
        self.committed_len = 0
