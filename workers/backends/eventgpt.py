"""The draft: EventGPT (CLIP on event images + Vicuna-7B) through workers.models."""
from __future__ import annotations

from workers.backends.hf_backend import HFBackend


class EventGPTBackend(HFBackend):
    name = "eventgpt"
    kind = "eventgpt"

    def _load_checkpoint(self, path: str):
        from workers.models.loading import load_eventgpt
        return load_eventgpt(path, clip_path=self.options.get("clip_path"), precision=self.precision,
                             device=self.device)

    def _prefill_inputs(self, loaded: dict, question: str):
        from workers.models.loading import eventgpt_prefill_inputs
        return eventgpt_prefill_inputs(self.lm, loaded["event_images"], question)
