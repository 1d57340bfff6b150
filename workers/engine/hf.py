"""A `StepModel` over any transformers causal LM: LLaMA-like text models, Video-LLaVA, EventGPT.

Owns one KV cache and its length `kv_len`; feeds tokens at positions kv_len.. and crops the cache back after
a verify pass. The prompt is whatever the model's forward takes (`input_ids` + pixels, or `inputs_embeds`).
Knows nothing of drafts, acceptance or messaging (that is `core.TokenEngine`), and never times anything:
`sync` only lets a caller close a timing span after the device has finished.

The eager path here is the reference on every device. A GPU fast path (static cache, CUDA graphs per
bucket of k) belongs in a subclass that overrides `_new_cache`, `_run` and `_cut_cache` and keeps this class's
positions and outputs.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch
from transformers import DynamicCache

from .core import StepOutput


class HFStepModel:
    """Batch size 1; rows of `StepOutput.logits`/`hidden` are the fed positions, in float32."""

    def __init__(self, model: torch.nn.Module, *, want_hidden: bool = False):
        self.model = model.eval()
        self.want_hidden = want_hidden
        self.device = next(model.parameters()).device
        self.kv_len = 0
        self.cache: Any = None
        self._mask: torch.Tensor | None = None   # [1, kv_len] attention mask over the cache
        accepted = inspect.signature(model.forward).parameters
        self._takes_position_ids = "position_ids" in accepted
        self._takes_logits_to_keep = "logits_to_keep" in accepted

    # --- StepModel -------------------------------------------------------------------------------------

    def prefill(self, prompt: Mapping[str, Any]) -> StepOutput:
        """Run the prompt on a fresh cache; the output has one row, for the prompt's last position."""
        kwargs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in prompt.items()}
        for owned in ("past_key_values", "use_cache", "output_hidden_states", "logits_to_keep"):
            kwargs.pop(owned, None)
        self.cache = self._new_cache()
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1     # a long video prompt would otherwise build [L, vocab] logits
        out = self._run(kwargs)
        self.kv_len = self._cache_len()
        prompt_mask = kwargs.get("attention_mask")
        if torch.is_tensor(prompt_mask) and prompt_mask.shape == (1, self.kv_len):
            self._mask = prompt_mask.to(torch.long)
        else:   # models that expand placeholder tokens inside forward grow the cache beyond the ids
            self._mask = torch.ones(1, self.kv_len, dtype=torch.long, device=self.device)
        return self._output(out, last_only=True)

    def forward(self, token_ids: Sequence[int]) -> StepOutput:
        """Feed `token_ids` at positions kv_len .. kv_len + n - 1; one output row per token."""
        n = len(token_ids)
        if n == 0:
            raise ValueError("forward needs at least one token")
        if self.cache is None:
            raise RuntimeError("forward before prefill")
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        mask = torch.cat([self._mask, torch.ones(1, n, dtype=torch.long, device=self.device)], dim=1)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self._takes_position_ids:
            kwargs["position_ids"] = torch.arange(self.kv_len, self.kv_len + n, device=self.device)[None]
        out = self._run(kwargs)
        self.kv_len += n
        self._mask = mask
        if self._cache_len() != self.kv_len:
            raise RuntimeError(f"cache holds {self._cache_len()} positions after forward, expected {self.kv_len}")
        return self._output(out, last_only=False)

    def crop(self, kv_len: int) -> None:
        """Forget every cached position from `kv_len` on."""
        if not 0 <= kv_len <= self.kv_len:
            raise ValueError(f"cannot crop a cache of {self.kv_len} positions to {kv_len}")
        if kv_len == self.kv_len:
            return
        self._cut_cache(kv_len)
        self.kv_len = kv_len
        self._mask = self._mask[:, :kv_len]
        if self._cache_len() != kv_len:   # e.g. a sliding-window layer cannot give positions back
            raise RuntimeError(f"cache holds {self._cache_len()} positions after crop, expected {kv_len}")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- what a faster subclass replaces ---------------------------------------------------------------

    def _new_cache(self) -> Any:
        return DynamicCache(config=getattr(self.model, "config", None))

    def _run(self, kwargs: dict[str, Any]) -> Any:
        with torch.inference_mode():
            return self.model(
                **kwargs,
                past_key_values=self.cache,
                use_cache=True,
                output_hidden_states=self.want_hidden,
            )

    def _cut_cache(self, kv_len: int) -> None:
        with torch.inference_mode():
            self.cache.crop(kv_len - self._cache_len())   # transformers 5: a negative count removes positions

    def _cache_len(self) -> int:
        return int(self.cache.get_seq_length())

    def _output(self, out: Any, *, last_only: bool) -> StepOutput:
        logits = out.logits[0]
        if last_only:
            logits = logits[-1:]
        logits = logits.float()
        hidden = None
        if self.want_hidden:
            hidden = out.hidden_states[-1][0]
            hidden = (hidden[-1:] if last_only else hidden).float()
        return StepOutput(greedy=logits.argmax(dim=-1).tolist(), logits=logits, hidden=hidden)
