"""Model definitions and loading for the two workers: EventGPT (draft) and Video-LLaVA (target).

Submodules: `eventgpt` (EventGPT config/model, registered with the transformers Auto classes), `prompts`
(templates and the event splice), `loading` (checkpoint folders → LoadedModel + prefill inputs; it re-exports
`checkpoint`, `eventgpt_loading` and `videollava_loading`), `tiny` (offline tiny checkpoints for tests),
`synthetic` (random-weight real-size models for timing).
Names are imported lazily so that `import workers.models.prompts` does not pull in transformers.
"""

from importlib import import_module

_EXPORTS = {
    "EventGPTConfig": "eventgpt",
    "EventGPTForCausalLM": "eventgpt",
    "LoadedModel": "loading",
    "CheckpointError": "loading",
    "load_eventgpt": "loading",
    "load_videollava": "loading",
    "eventgpt_prefill_inputs": "loading",
    "videollava_prefill_inputs": "loading",
    "tokenizer_fingerprint": "loading",
    "lm_head_weight": "loading",
    "embed_tokens": "loading",
    "make_tiny": "tiny",
    "synthetic_model": "synthetic",
    "synthetic_prefill_inputs": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
