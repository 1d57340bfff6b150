"""A scripted stand-in model for protocol, coordinator and input tests. Imports no torch.

The target's "greedy" answer is a token script derived from the sample id and question, so both fake
workers agree on it without talking. The draft follows the script with a chosen quality (all right, all
wrong, right for a prefix, or right with probability alpha per position). Per-step sleeps stand in for
GPU time. Bookkeeping goes through the real TokenEngine, so the position convention is exercised too.
"""
from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

from workers.backends.base import Backend, Prepared
from workers.engine.core import StepOutput, TokenEngine

VOCAB = 32000
EOS = 2


def script_for(sample_id: str, question: str, length: int | None, ignore_eos: bool, max_len: int) -> list[int]:
    seed = int.from_bytes(hashlib.sha256(f"{sample_id}\0{question}".encode()).digest()[:8], "little")
    rng = random.Random(seed)
    n = length if length else rng.randint(12, 60)
    tokens = [rng.randrange(3, VOCAB) for _ in range(max(n, max_len + 1) if ignore_eos else n)]
    return tokens if ignore_eos else tokens + [EOS]


def wrong_token(token: int) -> int:
    return 3 + (token - 3 + 1) % (VOCAB - 3)


class ScriptedModel:
    """StepModel whose choice at answer position p is choose(p), after sleeping like a GPU would."""

    def __init__(self, prefill_s: float, step_s: float, per_token_s: float):
        self.prefill_s, self.step_s, self.per_token_s = prefill_s, step_s, per_token_s
        self.kv_len = 0
        self.prompt_len = 0
        self.choose = None

    def prefill(self, prompt) -> StepOutput:
        self.choose, self.prompt_len = prompt
        time.sleep(self.prefill_s)
        self.kv_len = self.prompt_len
        return StepOutput(greedy=[self.choose(0)])

    def forward(self, token_ids) -> StepOutput:
        n = len(token_ids)
        time.sleep(self.step_s + self.per_token_s * max(0, n - 1))
        first = self.kv_len - self.prompt_len          # answer position of token_ids[0]
        self.kv_len += n
        return StepOutput(greedy=[self.choose(first + i + 1) for i in range(n)])

    def crop(self, kv_len: int) -> None:
        if kv_len > self.kv_len:
            raise RuntimeError(f"cannot crop a cache of {self.kv_len} to {kv_len}")
        self.kv_len = kv_len


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
        self.engine = TokenEngine(self.model)
        self.vocab_size, self.eos_id = VOCAB, EOS
        return {"model_id": f"fake-{self.role}", "vocab_size": VOCAB, "eos_id": EOS,
                "tokenizer_checksum": opts.get("tokenizer_checksum", "fake-vocab-32000"),
                "device": opts.get("device", "cpu"), "synthetic": True,
                "info": {"quality": opts.get("quality", "perfect"),
                         "mps_pipe": os.environ.get("CUDA_MPS_PIPE_DIRECTORY"),
                         "mps_sm_percent": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")}}

    def prepare(self, sample: dict, question: str, options: dict) -> Prepared:
        info = self._load_inputs(sample, options)
        script = script_for(sample.get("sample_id", ""), question, self.options.get("length"),
                            bool(options.get("ignore_eos")), int(options.get("max_new_tokens", 50)))
        if self.role == "target":
            def choose(pos):
                return script[min(pos, len(script) - 1)]
        else:
            right = self._quality(sample.get("sample_id", ""))

            def choose(pos):
                token = script[min(pos, len(script) - 1)]
                return token if right(pos) else wrong_token(token)
        prompt_len = int(self.options.get("prompt_len", 600 if self.role == "draft" else 2000))
        return Prepared(prompt=(choose, prompt_len), info=info)

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

