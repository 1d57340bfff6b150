"""The draft: EventGPT (CLIP on event images + Vicuna-7B) through workers.models."""
from __future__ import annotations

from workers.backends.hf_backend import HFBackend


class EventGPTBackend(HFBackend):
    name = "eventgpt"
    kind = "eventgpt"
    adapter = None

    def load(self) -> dict:
        ckpt = self.options.get("adapter")
        if ckpt:
            from workers.adapters.models import read_adapter_config
            if read_adapter_config(ckpt).kind == "hidden":
                self.options["want_hidden"] = True
        ready = super().load()
        if ckpt:
            from workers.adapters.live import load_live_adapter
            self.adapter = load_live_adapter(ckpt, draft_lm=self.lm, device=self.device)
            self.adapter.attach(self.engine)      # refuses temperature > 0: adapters assume greedy verification
            ready["info"]["adapter"] = {"path": str(ckpt), "kind": self.adapter.config.kind,
                                        "sequences": self.adapter.config.extra.get("sequences")}
        return ready

    def proposer(self, sample: dict, options: dict):
        return self.adapter if self.adapter is not None else super().proposer(sample, options)

    def _load_checkpoint(self, path: str):
        from workers.models.loading import load_eventgpt
        return load_eventgpt(path, clip_path=self.options.get("clip_path"), precision=self.precision,
                             device=self.device)

    def _prefill_inputs(self, loaded: dict, question: str):
        from workers.models.loading import eventgpt_prefill_inputs
        return eventgpt_prefill_inputs(self.lm, loaded["event_images"], question)
