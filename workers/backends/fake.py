"""A scripted stand-in model for protocol, coordinator and input tests. Imports no torch.

The fake model's choice at every position is a hash of its seed (from the sample id and question) and of
*every token fed before it*, so the fake target's answer depends on its whole history exactly as a real
model's does: a verification that commits the wrong tokens, or a cache cropped to the wrong length, changes
everything after it and shows up as a mismatch with the baseline. Both fake workers build the same model,
so the draft's own choice equals the target's wherever their histories agree; the draft's scripted quality
(all right, all wrong, right for a prefix, right with probability alpha per position) is a proposer
(`ScriptQuality`) that replaces its token with a wrong one where the script says so. Per-step sleeps stand
in for GPU time. Bookkeeping goes through the real TokenEngine, so the position convention is exercised too.
"""
from __future__ import annotations

import hashlib
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from workers.backends.base import Backend, Prepared
from workers.engine.core import StepOutput, TokenEngine
from workers.proposers import Proposer

VOCAB = 32000
EOS = 2
_M64 = (1 << 64) - 1


def _mix(state: int, token: int) -> int:
    """The model's state after feeding `token`: a 64-bit hash of the state before and the token."""
    z = (state * 6364136223846793005 + token + 1442695040888963407) & _M64
    z = ((z ^ (z >> 33)) * 0xFF51AFD7ED558CCD) & _M64
    return z ^ (z >> 33)


def wrong_token(token: int) -> int:
    return 3 + (token - 3 + 1) % (VOCAB - 3)


@dataclass
class FakePrompt:
    seed: int                   # the state after the prompt
    prompt_len: int
    eos_at: int | None          # answer position of EOS (None: never)


def fake_prompt(sample_id: str, question: str, length: int | None, ignore_eos: bool, prompt_len: int) -> FakePrompt:
    seed = int.from_bytes(hashlib.sha256(f"{sample_id}\0{question}".encode()).digest()[:8], "little")
    n = length if length else random.Random(seed).randint(12, 60)
    return FakePrompt(seed=seed, prompt_len=prompt_len, eos_at=None if ignore_eos else n)


class ScriptedModel:
    """StepModel whose choice at answer position p is a hash of every token fed before p (and EOS from the
    prompt's length on), after sleeping like a GPU would."""

    def __init__(self, prefill_s: float, step_s: float, per_token_s: float):
        self.prefill_s, self.step_s, self.per_token_s = prefill_s, step_s, per_token_s
        self.prompt = FakePrompt(0, 0, None)
        self.states: list[int] = []     # states[i]: after the prompt and i answer tokens (the cache)

    @property
    def kv_len(self) -> int:
        return self.prompt.prompt_len + len(self.states) - 1 if self.states else 0

    def _choice(self, position: int, state: int) -> int:
        if self.prompt.eos_at is not None and position >= self.prompt.eos_at:
            return EOS
        return 3 + state % (VOCAB - 3)

    def prefill(self, prompt: FakePrompt) -> StepOutput:
        time.sleep(self.prefill_s)
        self.prompt, self.states = prompt, [prompt.seed]
        return StepOutput(greedy=[self._choice(0, prompt.seed)])

    def forward(self, token_ids) -> StepOutput:
        time.sleep(self.step_s + self.per_token_s * max(0, len(token_ids) - 1))
        greedy = []
        for token in token_ids:
            self.states.append(_mix(self.states[-1], int(token)))
            greedy.append(self._choice(len(self.states) - 1, self.states[-1]))
        return StepOutput(greedy=greedy)

    def crop(self, kv_len: int) -> None:
        if kv_len > self.kv_len:
            raise RuntimeError(f"cannot crop a cache of {self.kv_len} to {kv_len}")
        del self.states[kv_len - self.prompt.prompt_len + 1:]


class ScriptQuality(Proposer):
    """The fake draft's strategy: its own (= the target's, on the same history) token where `right(position)`,
    a different one elsewhere."""

    def __init__(self, right):
        self.right = right

    def propose(self, prefix, model):
        token = int(model.token)
        return (token if self.right(len(prefix)) else wrong_token(token)), model.q


class StaleCacheEngine(TokenEngine):
    """A deliberately broken verifier (option fault=stale_cache): the accepted drafts are committed and
    counted in the cache length, but their cache entries hold other tokens (the class of bug where accepted
    tokens never really enter the target's cache). Every length check passes; only a model whose answer
    depends on its history shows it. Tests use it to prove the fake target catches a wrong verification."""

    def verify(self, drafts, draft_probs=None):
        fed_before = len(self.model.states)
        accepted, nxt = super().verify(drafts, draft_probs)
        states = self.model.states
        for j in range(accepted):       # states[fed_before] holds the pending token, then the drafts
            states[fed_before + 1 + j] = _mix(states[fed_before + j], wrong_token(int(drafts[j])))
        return accepted, nxt


class FakeBackend(Backend):
    name = "fake"

    def load(self) -> dict:
        opts = self.options
        time.sleep(float(opts.get("startup_delay_s", 0)))
        crash = opts.get("crash_on_load")
        if crash:
            raise RuntimeError(f"fake backend told to fail while loading: {crash}")
        ms = 1e-3
        self.model = ScriptedModel(float(opts.get("prefill_ms", 30 if self.role == "target" else 10)) * ms,
                                   float(opts.get("step_ms", 3)) * ms,
                                   float(opts.get("per_token_ms", 0.2)) * ms)
        fault = opts.get("fault")
        if fault not in (None, "stale_cache"):
            raise ValueError(f"fake fault {fault!r}: the only one is stale_cache")
        self.engine = (StaleCacheEngine if fault else TokenEngine)(self.model)
        self.vocab_size, self.eos_id = VOCAB, EOS
        return {"model_id": f"fake-{self.role}", "vocab_size": VOCAB, "eos_id": EOS,
                "tokenizer_checksum": opts.get("tokenizer_checksum", "fake-vocab-32000"),
                "device": opts.get("device", "cpu"), "synthetic": True,
                "info": {"quality": opts.get("quality", "perfect"),
                         "mps_pipe": os.environ.get("CUDA_MPS_PIPE_DIRECTORY"),
                         "mps_sm_percent": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")}}

    def prepare(self, sample: dict, question: str, options: dict) -> Prepared:
        info = self._load_inputs(sample, options)
        prompt_len = int(self.options.get("prompt_len", 600 if self.role == "draft" else 2000))
        prompt = fake_prompt(sample.get("sample_id", ""), question, self.options.get("length"),
                             bool(options.get("ignore_eos")), prompt_len)
        if self.role == "draft":
            self._quality(sample.get("sample_id", ""))     # a bad quality option fails the request, oracle or not
        return Prepared(prompt=prompt, info=info)

    def hf_generate(self, prepared: Prepared, max_new_tokens: int, eos_id: int) -> list[int]:
        """Like transformers' generate(): its own model state, the worker's engine is left alone."""
        own = TokenEngine(ScriptedModel(self.model.prefill_s, self.model.step_s, self.model.per_token_s))
        out = [own.start(prepared.prompt)]
        while len(out) < max_new_tokens and out[-1] != eos_id:
            out.append(own.step())
        return out

    def proposer(self, sample: dict, options: dict):
        return ScriptQuality(self._quality(sample.get("sample_id", "")))

    def _quality(self, sample_id: str):
        quality = str(self.options.get("quality", "perfect"))
        if quality == "perfect":
            return lambda pos: True
        if quality == "wrong":
            return lambda pos: False
        kind, _, value = quality.partition(":")
        if kind == "prefix":
            n = int(value)
            return lambda pos: pos < n
        if kind == "alpha":
            alpha = float(value)
            rng = random.Random(sample_id)
            draws = [rng.random() < alpha for _ in range(4096)]
            return lambda pos: draws[pos % len(draws)]
        raise ValueError(f"fake quality {quality!r}: use perfect, wrong, prefix:N or alpha:A")

    def _load_inputs(self, sample: dict, options: dict) -> dict:
        """Load what a real backend of this role would (so loaders run in a real worker), report shapes."""
        if sample.get("events") or sample.get("video"):
            from workers.inputs import load_sample_inputs
            loaded = load_sample_inputs(sample, self.role, event_frames=int(options.get("event_frames", 5)),
                                        event_window_ms=options.get("event_window_ms"))
            return loaded.get("info", {})
        path = Path(sample.get("path", ""))
        if path.is_dir():
            return {"files": sum(1 for p in path.rglob("*") if p.is_file())}
        return {"files": 1 if path.is_file() else 0}

    def step_bytes(self) -> dict | None:
        """Stand-in step geometry (options weight_bytes, kv_bytes_per_position) so the bench's floor
        columns can be tested without a model."""
        if self.options.get("weight_bytes") is None:
            return None
        return {"weight_bytes": int(self.options["weight_bytes"]),
                "kv_bytes_per_position": int(self.options.get("kv_bytes_per_position", 0))}

    def decode_text(self, token_ids):
        return " ".join(f"w{t}" for t in token_ids)

