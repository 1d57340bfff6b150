"""The target: Video-LLaVA-7B through transformers' VideoLlavaForConditionalGeneration."""
from __future__ import annotations

from workers.backends.hf_backend import HFBackend


class VideoLlavaBackend(HFBackend):
    name = "videollava"
    kind = "videollava"

    def _load_checkpoint(self, path: str):
        from workers.models.loading import load_videollava
        return load_videollava(path, precision=self.precision, device=self.device)

    def _prefill_inputs(self, loaded: dict, question: str):
        from workers.models.loading import videollava_prefill_inputs
        return videollava_prefill_inputs(self.lm, loaded["video_frames"], question)
