"""GPU fast path of `HFStepModel`: a static KV cache, bucketed step sizes and one CUDA graph per bucket.
Longer than most modules because the static cache, the bucketed steps and the graph capture share buffers that must not be split across files.

Design. Prefill stays eager and unchanged (HFStepModel's multimodal forward into a DynamicCache); its K/V are
then copied into static per-layer buffers `[1, kv_heads, slots, head_dim]`, and the DynamicCache is dropped.
Every later step drives the LLaMA decoder directly (embed_tokens → layers → norm → lm_head), so none of the
multimodal wrapper's logic is inside a graph. A step of n tokens runs the smallest bucket b ≥ n (1, 2, 4, 8,
16, 32): the fed ids are padded to b, row i sits at position kv_len + i, its K/V are written into slot
kv_len + i, and an additive mask lets row i see slots ≤ kv_len + i only. Padded rows therefore write slots
beyond the committed length, which no real row can see and the next step overwrites; `slots` is
max_cache_len + the largest bucket (rounded up to 64), so even a padded row never writes out of bounds.
`crop` only moves `kv_len`. Steps longer than the largest bucket run as several chunks.

The only per-step host→device traffic is one copy of [kv_len, ids...] into a static input buffer; the mask,
the positions and the RoPE angles are computed inside the graph from it. Graphs are captured in the
constructor (nothing is committed then, so the capture's writes are harmless), largest bucket first, all in one
memory pool. A bucket whose capture fails (e.g. a bitsandbytes kernel that is not capturable) runs eagerly
with a logged warning. The same code runs eagerly on the CPU (`use_graphs=False`), which is how it is tested.

The decoder layers see a small object with an `update(k, v, layer_idx, ...)` method instead of a transformers
Cache: LLaMA attention calls only that, in transformers 5.17 and 5.23 alike, whereas StaticCache's write
position moved from `cache_position` to an internal counter between those versions.

What to measure on the GPU (tests/test_engine_fast.py, GPU tests): graphs vs eager greedy tokens equal; wall
ms per target decode step (goal: bf16 ≤ 6.5, NF4 ≤ 4.5 on an H100) and per verification of 16 drafts (goal:
≤ 1.3× a decode step in bf16); which buckets fell back to eager (`eager_buckets`); the constructor's capture
time. Attention reads all `slots` positions every step (masked), so keep max_cache_len near prompt + answer.

Measured once on an H100 (random-weight Video-LLaVA-7B, 2,076-token prompt, max_cache_len prompt + 512; HF
eager ~110 ms per decode step there): graphs alone give bf16 8.8 ms per decode step and 11.2 ms per
16-draft verification (1.25×), NF4 6.9 ms, capture ~4 s; all buckets captured, NF4 included. A profile of the
bf16 step: 8.0 ms of GPU time, 5.1 of it in the GEMVs, 0.6 in attention (cuDNN SDPA), ~2 ms in ~1,500 small
elementwise kernels (RMSNorm, RoPE, SiLU, residuals). `compile=True` fuses those with torch.compile before
capture: bf16 6.9 ms, NF4 5.1 ms, but ~50 s of compilation per bucket.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .core import StepOutput
from .hf import HFStepModel

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)
WARMUP_RUNS = 2           # eager runs on a side stream before a capture (cuBLAS handles, lazy inits)
SLOT_ALIGN = 64           # the mask's last dimension stays aligned for the memory-efficient SDPA kernel


@dataclass
class Decoder:
    """The parts of a LLaMA-style causal LM that one decode step needs."""

    embed_tokens: nn.Module
    layers: Sequence[nn.Module]
    rotary_emb: nn.Module
    norm: nn.Module
    lm_head: nn.Module
    config: Any


def decoder_and_head(model: nn.Module) -> Decoder:
    """Find the LLaMA decoder and output head of LlamaForCausalLM, EventGPTForCausalLM (`model.model`) or
    VideoLlavaForConditionalGeneration (`model.model.language_model` in transformers 5)."""
    inner = getattr(model, "model", None)
    candidates = []
    for holder in (inner, model):
        language_model = getattr(holder, "language_model", None) if holder is not None else None
        if language_model is not None:
            candidates += [language_model, getattr(language_model, "model", None)]
    candidates.append(inner)
    for decoder in candidates:
        if decoder is not None and all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
            break
    else:
        raise TypeError(f"{type(model).__name__}: no LLaMA-style decoder (embed_tokens, layers, norm, rotary_emb) found")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if head is not None else getattr(model, "lm_head", None)
    if head is None:
        raise TypeError(f"{type(model).__name__}: no output head (lm_head) found")
    config = decoder.config
    layers = list(decoder.layers)[: getattr(config, "num_hidden_layers", len(decoder.layers))]
    return Decoder(decoder.embed_tokens, layers, decoder.rotary_emb, decoder.norm, head, config)


class _StaticKV:
    """What the decoder layers see as `past_key_values`: writes the new K/V at `write_pos` in place and
    returns the whole static buffers (the attention mask hides the slots that are not in use)."""

    def __init__(self, n_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.write_pos: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.write_pos, key_states.to(keys.dtype))
        values.index_copy_(2, self.write_pos, value_states.to(values.dtype))
        return keys, values


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class CudaGraphStepModel(HFStepModel):
    """StepModel with a static KV cache of `max_cache_len` positions; steps padded to `buckets`, each bucket
    replayed from a CUDA graph when `use_graphs` (CUDA only), else run eagerly (the CPU reference).
    `compile` runs the step through torch.compile first (slow to start, faster steps)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_cache_len: int,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        want_hidden: bool = False,
        use_graphs: bool = True,
        compile: bool = False,
    ):
        super().__init__(model, want_hidden=want_hidden)
        buckets = tuple(sorted({int(b) for b in buckets}))
        if not buckets or buckets[0] < 1:
            raise ValueError(f"buckets must be positive step sizes; got {buckets}")
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len must be positive; got {max_cache_len}")
        if use_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {self.device}: pass use_graphs=False")
        self.decoder = decoder_and_head(self.model)
        attn = getattr(self.decoder.config, "_attn_implementation", None)
        if attn not in (None, "sdpa", "eager"):
            raise ValueError(
                f"attention implementation {attn!r} takes no explicit 4-D mask: load the model with "
                "attn_implementation='sdpa' (or 'eager') to use the static-cache step model"
            )
        self.max_cache_len = int(max_cache_len)
        self.buckets = buckets
        self.use_graphs = use_graphs
        self.eager_buckets: set[int] = set()     # buckets whose capture failed
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple]] = {}

        config = self.decoder.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # activations (and so K/V) have the embedding's dtype; NF4 layers compute in it and return it
        self.dtype = self.decoder.embed_tokens.weight.dtype
        slots = _round_up(self.max_cache_len + buckets[-1], SLOT_ALIGN)
        with torch.inference_mode():
            self.kv = _StaticKV(len(self.decoder.layers), (1, kv_heads, slots, head_dim), self.dtype, self.device)
            self._valid = torch.ones(slots, dtype=torch.bool, device=self.device)   # prompt padding → False
            self._slot_ids = torch.arange(slots, device=self.device)
            self._row_offsets = torch.arange(buckets[-1], device=self.device)
            self._inputs = torch.zeros(buckets[-1] + 1, dtype=torch.long, device=self.device)   # [kv_len, ids...]
        self._staging = torch.zeros(buckets[-1] + 1, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self._staging_np = self._staging.numpy()
        self._prefilled = False
        self._setup()
        # torch.compile fuses the ~40 small elementwise kernels per layer (RMSNorm, RoPE, SiLU, residuals)
        # that dominate the GPU time left once launches are gone; the graphs then capture inductor's kernels
        self._body = torch.compile(self._compute, dynamic=False) if compile else self._compute
        if use_graphs:
            self._capture_all()

    def _setup(self) -> None:
        """What a subclass prepares before the graphs are captured (ExactStepModel: its weights)."""

    # --- StepModel -------------------------------------------------------------------------------------

    def prefill(self, prompt: Mapping[str, Any]) -> StepOutput:
        """Eager prefill (HFStepModel's), then the prompt's K/V move into the static buffers."""
        self._prefilled = False
        out = super().prefill(prompt)
        try:
            length = self.kv_len
            if length > self.max_cache_len:
                raise ValueError(
                    f"the prompt fills {length} cache positions but max_cache_len is {self.max_cache_len}: "
                    "construct the step model with a larger max_cache_len"
                )
            layers = self.cache.layers
            if len(layers) != len(self.kv.keys):
                raise RuntimeError(f"prefill cached {len(layers)} layers, the decoder has {len(self.kv.keys)}")
            with torch.inference_mode():
                for layer, keys, values in zip(layers, self.kv.keys, self.kv.values):
                    if layer.keys.shape[:2] != keys.shape[:2] or layer.keys.shape[-1] != keys.shape[-1]:
                        raise RuntimeError(f"prefill K/V of shape {tuple(layer.keys.shape)} do not fit {tuple(keys.shape)}")
                    keys[:, :, :length].copy_(layer.keys)
                    values[:, :, :length].copy_(layer.values)
                self._valid.fill_(True)
                self._valid[:length].copy_(self._mask[0].bool())
        finally:
            self.cache = None       # the DynamicCache's memory goes back now
            self._mask = None
        self._prefilled = True
        return out

    def forward(self, token_ids: Sequence[int]) -> StepOutput:
        """Feed `token_ids` at positions kv_len .. kv_len + n - 1; one output row per token."""
        token_ids = [int(t) for t in token_ids]
        n = len(token_ids)
        if n == 0:
            raise ValueError("forward needs at least one token")
        if not self._prefilled:
            raise RuntimeError("forward before prefill")
        if self.kv_len + n > self.max_cache_len:
            raise ValueError(
                f"{self.kv_len} cached + {n} new positions exceed max_cache_len={self.max_cache_len}: "
                "construct the step model with a larger max_cache_len"
            )
        largest = self.buckets[-1]
        parts = [self._step(token_ids[i: i + largest]) for i in range(0, n, largest)]
        if len(parts) == 1:
            return parts[0]
        return StepOutput(
            greedy=[t for p in parts for t in p.greedy],
            logits=torch.cat([p.logits for p in parts]),
            hidden=torch.cat([p.hidden for p in parts]) if self.want_hidden else None,
        )

    def crop(self, kv_len: int) -> None:
        """Forget every cached position from `kv_len` on: the mask hides them and later steps overwrite them."""
        if not 0 <= kv_len <= self.kv_len:
            raise ValueError(f"cannot crop a cache of {self.kv_len} positions to {kv_len}")
        self.kv_len = kv_len

    @property
    def graph_buckets(self) -> list[int]:
        return sorted(self._graphs)

    # --- one padded step --------------------------------------------------------------------------------

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _stage(self, kv_len: int, token_ids: Sequence[int], bucket: int) -> None:
        # The previous step ended in a device sync (greedy .tolist()), so its copy from staging is done.
        n = len(token_ids)
        self._staging_np[0] = kv_len
        self._staging_np[1: 1 + n] = token_ids
        self._staging_np[1 + n: 1 + bucket] = 0       # padded rows: any valid id
        self._inputs[: bucket + 1].copy_(self._staging[: bucket + 1], non_blocking=True)

    def _step(self, token_ids: Sequence[int]) -> StepOutput:
        n = len(token_ids)
        bucket = self._bucket(n)
        with torch.inference_mode():
            self._stage(self.kv_len, token_ids, bucket)
            if bucket in self._graphs:
                graph, outputs = self._graphs[bucket]
                graph.replay()
            else:
                outputs = self._body(bucket)
            logits, greedy, hidden = outputs
            # graph outputs are overwritten by the next replay: hand out copies of the real rows
            logits = logits[:n].clone()
            hidden = hidden[:n].clone() if hidden is not None else None
            greedy = greedy[:n].tolist()
        self.kv_len += n
        return StepOutput(greedy=greedy, logits=logits, hidden=hidden)

    def _compute(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The captured body: reads only static buffers, writes K/V in place, returns (logits, greedy, hidden)."""
        d = self.decoder
        inputs = self._inputs[: bucket + 1]
        positions = inputs[0] + self._row_offsets[:bucket]                        # [b]
        visible = (self._slot_ids[None, :] <= positions[:, None]) & self._valid[None, :]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask = mask.masked_fill(~visible, torch.finfo(self.dtype).min)[None, None]  # [1, 1, b, slots]
        self.kv.write_pos = positions
        position_ids = positions[None]
        hidden = d.embed_tokens(inputs[1:][None])
        position_embeddings = d.rotary_emb(hidden, position_ids)
        for layer in d.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=self.kv,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        hidden = d.norm(hidden)[0]
        logits = d.lm_head(hidden).float()
        return logits, logits.argmax(dim=-1), hidden.float() if self.want_hidden else None

    # --- CUDA graphs -------------------------------------------------------------------------------------

    def _capture_all(self) -> None:
        """One graph per bucket, largest first, sharing one memory pool (they never run concurrently).
        Nothing is committed yet, so the K/V the captures write at slots 0..b-1 are garbage nobody reads."""
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            try:
                self._graphs[bucket] = self._capture(bucket, pool)
            except Exception as exc:  # noqa: BLE001 - any capture failure leaves this bucket eager
                self.eager_buckets.add(bucket)
                log.warning("CUDA graph capture failed for bucket %d; running it eagerly: %s", bucket, exc)
                torch.cuda.synchronize(self.device)   # a sticky device error surfaces here, not later
        if self._graphs:
            log.info("CUDA graphs captured for buckets %s", self.graph_buckets)

    def _capture(self, bucket: int, pool) -> tuple[torch.cuda.CUDAGraph, tuple]:
        with torch.inference_mode():
            self._stage(0, [0] * bucket, bucket)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self._body(bucket)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outputs = self._body(bucket)
            torch.cuda.synchronize(self.device)
        return graph, outputs


def make_step_model(
    model: nn.Module,
    *,
    device: str | torch.device,
    max_cache_len: int,
    cuda_graphs: bool,
    want_hidden: bool = False,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    compile: bool = False,
    exact: bool = True,
    nf4_scales: str = "float32",
) -> HFStepModel:
    """On a CUDA device with `cuda_graphs`: ExactStepModel (row-invariant kernels, bit-identical decode and
    verification) when `exact` and Triton is there (`nf4_scales`: how its NF4 kernel reads the scales,
    `ExactStepModel`), else CudaGraphStepModel; otherwise the eager HFStepModel."""
    if cuda_graphs and torch.device(device).type == "cuda":
        if exact:
            from .exact import ExactStepModel
            from .kernels import triton_available
            if not triton_available():
                raise ValueError("the exact step needs Triton (pip install triton); pass exact=0 for the "
                                 "cuBLAS/SDPA step, which is not bit-exact between decode and verification")
            return ExactStepModel(
                model, max_cache_len=max_cache_len, buckets=buckets, want_hidden=want_hidden, use_graphs=True,
                nf4_scales=nf4_scales,
            )
        return CudaGraphStepModel(
            model, max_cache_len=max_cache_len, buckets=buckets, want_hidden=want_hidden, use_graphs=True,
            compile=compile,
        )
    return HFStepModel(model, want_hidden=want_hidden)
