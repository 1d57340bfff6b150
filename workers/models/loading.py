"""Load EventGPT and Video-LLaVA checkpoints from local folders and build their prefill inputs: the one
import point for the rest of the code.

The work is split by job: `checkpoint.py` (LoadedModel, precision/NF4 settings, reading and checking weight
files), `eventgpt_loading.py` (EventGPT + its CLIP tower), `videollava_loading.py` (Video-LLaVA). This module
only re-exports their public names. Never downloads anything (no hub access) and never times anything.

Calling contract (both models):
    kwargs, prompt_len = eventgpt_prefill_inputs(lm, images, q)   # or videollava_prefill_inputs
    out = lm.model(**kwargs, past_key_values=cache, use_cache=True)            # prefill
    out = lm.model(input_ids=next_ids, past_key_values=cache, use_cache=True)   # each decode step
"""

from __future__ import annotations

from .checkpoint import (
    EVENTGPT_SKIP_MODULES,
    PRECISIONS,
    VIDEOLLAVA_SKIP_MODULES,
    CheckpointError,
    LoadedModel,
    check_precision,
    checkpoint_keys,
    embed_tokens,
    lm_head_weight,
    nf4_config,
    tokenizer_fingerprint,
)
from .eventgpt_loading import EVENTGPT_TOWER_PREFIX, eventgpt_prefill_inputs, load_eventgpt
from .videollava_loading import (
    load_videollava,
    video_tokens_per_frame,
    videollava_prefill_inputs,
    videollava_prompt_ids,
)

__all__ = [
    "CheckpointError",
    "EVENTGPT_SKIP_MODULES",
    "EVENTGPT_TOWER_PREFIX",
    "LoadedModel",
    "PRECISIONS",
    "VIDEOLLAVA_SKIP_MODULES",
    "check_precision",
    "checkpoint_keys",
    "embed_tokens",
    "eventgpt_prefill_inputs",
    "lm_head_weight",
    "load_eventgpt",
    "load_videollava",
    "nf4_config",
    "tokenizer_fingerprint",
    "videollava_prefill_inputs",
    "videollava_prompt_ids",
    "video_tokens_per_frame",
]
