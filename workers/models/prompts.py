"""Prompt templates and the event-embedding splice for both models.

Owns the exact prompt text of EventGPT (Vicuna v1) and Video-LLaVA, the split of the EventGPT prompt
at `<event>` into token ids with one placeholder, and the replacement of that placeholder by the
event embeddings. Pure functions over a tokenizer and tensors: never loads files or models.
"""

from __future__ import annotations

import torch
from torch import nn

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
EVENT_TOKEN = "<event>"
EV_START_TOKEN = "<ev_start>"
EV_END_TOKEN = "<ev_end>"
EV_PATCH_TOKEN = "<ev_patch>"
EVENT_PLACEHOLDER_ID = -200
VIDEO_TOKEN = "<video>"
REFERENCE_QUESTION = "What are the key elements in this scene?"


def eventgpt_prompt(question: str) -> str:
    # <ev_start>/<ev_end> are always in the text; whether they become one special token each or
    # several ordinary pieces depends on the tokenizer (see eventgpt_loading.py, which follows the config).
    return f"{SYSTEM} USER: {EV_START_TOKEN}{EVENT_TOKEN}{EV_END_TOKEN}\n{question} ASSISTANT:"


def videollava_prompt(question: str) -> str:
    return f"USER: {VIDEO_TOKEN}\n{question} ASSISTANT:"


def eventgpt_prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids of the EventGPT prompt with one EVENT_PLACEHOLDER_ID where `<event>` was.

    Each chunk is tokenized on its own (as the released code does); only the first chunk keeps its BOS.
    """
    chunks = eventgpt_prompt(question).split(EVENT_TOKEN)
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        chunk_ids = list(tokenizer.encode(chunk))
        if i > 0:
            if chunk_ids and chunk_ids[0] == bos:
                chunk_ids = chunk_ids[1:]
            ids.append(EVENT_PLACEHOLDER_ID)
        ids.extend(chunk_ids)
    return ids


def spliced_length(ids_with_placeholder, n_event_positions: int) -> int:
    """Sequence length once each placeholder is replaced by `n_event_positions` embeddings."""
    ids = torch.as_tensor(ids_with_placeholder).reshape(-1)
    n_placeholders = int((ids == EVENT_PLACEHOLDER_ID).sum())
    return ids.numel() - n_placeholders + n_placeholders * n_event_positions


def splice_event_embeddings(
    embed_tokens: nn.Embedding, ids_with_placeholder, event_embeds: torch.Tensor
) -> torch.Tensor:
    """Embed the prompt ids and put `event_embeds` [t+N, H] where the single placeholder is: [1, L, H]."""
    ids = torch.as_tensor(ids_with_placeholder, device=embed_tokens.weight.device)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"the event splice handles batch size 1, got input_ids of shape {tuple(ids.shape)}")
        ids = ids[0]
    positions = (ids == EVENT_PLACEHOLDER_ID).nonzero().flatten()
    if positions.numel() != 1:
        raise ValueError(
            f"expected exactly one event placeholder ({EVENT_PLACEHOLDER_ID}) in the prompt ids, found {positions.numel()}"
        )
    at = int(positions[0])
    before = embed_tokens(ids[:at])
    after = embed_tokens(ids[at + 1 :])
    event_embeds = event_embeds.to(device=before.device, dtype=before.dtype)
    return torch.cat([before, event_embeds, after], dim=0).unsqueeze(0)
