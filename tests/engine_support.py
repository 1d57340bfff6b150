"""What the engine tests share: a tiny LLaMA, its prompt, the cache check and a greedy speculative loop."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workers.engine.core import TokenEngine

VOCAB = 96
PROMPT = [1, 5, 9, 22, 40, 7]
REF_LEN = 48


def tiny_llama(seed: int, dtype=torch.float32, device="cpu") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval().to(device=device, dtype=dtype)


def prompt_ids() -> dict:
    return {"input_ids": torch.tensor([PROMPT])}


def check_cache(engine: TokenEngine) -> None:
    assert engine.model.kv_len == engine.seq.prompt_len + len(engine.tokens) - 1


def speculative_greedy(make, target_model, draft_model, n: int, k: int) -> tuple[list[int], list[int]]:
    """Draft k, verify, rebase, until n tokens, with step models built by `make(model)`."""
    target, draft = TokenEngine(make(target_model)), TokenEngine(make(draft_model))
    target.start(prompt_ids())
    draft.start(prompt_ids())
    draft.rebase(target.tokens)
    accepted_per_round = []
    while len(target.tokens) < n:
        base = len(target.tokens)
        while len(draft.tokens) < base + k:
            draft.step()
        accepted, _ = target.verify(draft.tokens[base: base + k])
        accepted_per_round.append(accepted)
        draft.rebase(target.tokens)
        assert draft.tokens[: len(target.tokens)] == target.tokens
        check_cache(target)
        check_cache(draft)
    return target.tokens[:n], accepted_per_round
