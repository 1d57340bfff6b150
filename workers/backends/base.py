"""The backend interface: what a worker process needs from one model.

A backend loads its model once, turns a sample reference into a prompt (input loading included), and
exposes a TokenEngine for prefill / decode / verify / rebase. It never touches sockets or clocks: the
worker (workers.worker) does the messaging and the timing spans.
"""
from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from workers.engine.core import TokenEngine


@dataclass
class Prepared:
    """A prompt ready for prefill plus what the backend wants reported about its inputs."""

    prompt: Any
    info: dict = field(default_factory=dict)


class Backend(ABC):
    name = ""

    def __init__(self, role: str, options: dict):
        self.role = role
        self.options = options
        self.engine: TokenEngine | None = None
        self.eos_id = 2
        self.vocab_size = 0

    @abstractmethod
    def load(self) -> dict:
        """Load the model; return READY fields: model_id, vocab_size, eos_id, tokenizer_checksum, device,
        synthetic, info."""

    @abstractmethod
    def prepare(self, sample: dict, question: str, options: dict) -> Prepared:
        """Load this role's inputs for `sample` and build the prompt. Raises InputError for bad input."""

    def prefill(self, prepared: Prepared) -> tuple[int, int]:
        """Run the prompt; returns (first answer token, prompt length)."""
        first = self.engine.start(prepared.prompt)
        return first, self.engine.seq.prompt_len

    def hf_generate(self, prepared: Prepared, max_new_tokens: int, eos_id: int) -> list[int]:
        """The target alone the way users run it without eventspec (transformers' generate()); the
        engine's own loop where a backend has no generate()."""
        first = self.engine.start(prepared.prompt)
        out = [first]
        while len(out) < max_new_tokens and out[-1] != eos_id:
            out.append(self.engine.step())
        return out

    def decode_text(self, token_ids: list[int]) -> str:
        return " ".join(str(t) for t in token_ids)

    def sync(self) -> None:
        """Wait for the device so a timing span ends when the work does."""

    def proposer(self, sample: dict, options: dict):
        """This backend's own draft strategy for a request (workers.proposers): the raw model unless an
        adapter (EventGPT) or a scripted quality (fake) says otherwise."""
        from workers.proposers import ModelDraft
        return ModelDraft()

    def reset(self) -> None:
        if self.engine is not None:
            self.engine.proposer = None

    def step_bytes(self) -> dict | None:
        """What one decode step reads (workers.step_bytes.describe_step_bytes), for the bench's floor."""
        return None

    def memory(self) -> dict:
        import psutil
        return {"rss_bytes": psutil.Process(os.getpid()).memory_info().rss, "peak_gpu_bytes": None}


def sampling_seed(seed: int, role: str) -> int:
    """The sampler's seed of one role, derived from --seed: draft and target draw independent streams (the
    same stream in both would correlate the draft's samples with the target's acceptance draws)."""
    digest = hashlib.blake2b(f"{int(seed)}:{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


BACKENDS: dict[str, str] = {
    "fake": "workers.backends.fake:FakeBackend",
    "eventgpt": "workers.backends.eventgpt:EventGPTBackend",
    "videollava": "workers.backends.videollava:VideoLlavaBackend",
}


def make_backend(name: str, role: str, options: dict) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}")
    module_name, cls_name = BACKENDS[name].split(":")
    import importlib
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(role, options)
