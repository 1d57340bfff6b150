"""The exact step: a LLaMA decoder step from eventspec's own row-invariant kernels, so a position's logits
are bit-identical whether it is computed in a decode step (1 row), in a verification of k drafts (k + 1
rows, any bucket) or as one row of a rebase — the property lossless speculative decoding needs on a GPU.

Owns: reading the decoder's weights once into the form the kernels take (q/k/v and gate/up stacked so each
layer runs four matmuls; NF4 weights stay packed, their double-quantized absmax expanded to float32; the
modules' own parameters become views of the stacked tensors, so no weight is held twice; NF4 bytes that
the tensor-core kernel takes tile-major are read by the modules' prefill through their own dequantization)
and the step
body (`_compute`) that `CudaGraphStepModel` captures per bucket. Prefill stays transformers' path; its K/V
land in the same static cache the step reads, and the first answer token comes from prefill in every mode.

Never depends on the row count: see `kernels/`. Exactness holds for one model on one device and one build of
the kernels; two different GPUs, or this step against transformers' own forward, agree only to rounding.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from . import nf4
from .fast import CudaGraphStepModel
from .kernels import usable_on
from .kernels.attention import attention
from .kernels.elementwise import rmsnorm
from .kernels.linear import L2_AHEAD, Weight, gate_up_silu, linear, linear_residual_norm, qkv_rope_store

log = logging.getLogger(__name__)


@dataclass
class _Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv: Weight
    o: Weight
    gate_up: Weight
    down: Weight


def _is_nf4(module) -> bool:
    return hasattr(getattr(module, "weight", None), "quant_state")


def _stack(modules, nf4_kernel: str = "auto", l2_ahead: int = 0, scale_bytes: bool = False) -> Weight:
    """One Weight over several linear modules stacked along N; the modules then read views of it."""
    for mod in modules:
        if getattr(mod, "bias", None) is not None:
            raise ValueError(f"{type(mod).__name__} has a bias; the exact step supports bias-free LLaMA layers")
    k = modules[0].in_features
    if any(m.in_features != k for m in modules):
        raise ValueError("stacked projections must share their input size")
    n = sum(m.out_features for m in modules)
    if not _is_nf4(modules[0]):
        dense = torch.cat([m.weight.data for m in modules]).contiguous()
        offset = 0
        for mod in modules:
            mod.weight.data = dense[offset: offset + mod.out_features]
            offset += mod.out_features
        return Weight(n, k, dense=dense, l2_ahead=l2_ahead)
    earlier = getattr(modules[0], "_eventspec_tile_major", None)
    if earlier is not None:     # a step model built before over these modules laid their bytes out tile-major
        if earlier.n != n or not all(getattr(m, "_eventspec_tile_major", None) is earlier for m in modules):
            raise ValueError("these NF4 modules were stacked differently by an earlier exact step")
        return earlier
    parts = [nf4.unpack_bnb(m.weight) for m in modules]
    packed = torch.cat([p for p, _, _ in parts]).contiguous()
    absmax = torch.cat([a for _, a, _ in parts]).contiguous()
    offset = 0
    for mod, (p, _, _) in zip(modules, parts):
        # bitsandbytes keeps reading its own parameter (prefill): make it a view of the stacked bytes
        mod.weight.data = packed[offset: offset + p.numel()].view(mod.weight.data.shape)
        offset += p.numel()
    weight = Weight(n, k, packed=packed, absmax=absmax, code=parts[0][2], nf4_kernel=nf4_kernel, l2_ahead=l2_ahead,
                    nested=[nf4.nested_absmax(m.weight) for m in modules], scale_bytes=scale_bytes)
    if weight.tile_major:
        _read_tile_major(modules, weight)
    return weight


def _tile_major_forward(x: torch.Tensor, *, weight: Weight, row0: int, rows: int) -> torch.Tensor:
    """A stacked NF4 module's forward once its bytes are tile-major: its rows dequantized as bitsandbytes
    rounds them, then one dense matmul (what bitsandbytes' 4-bit forward does for more than one row).
    Dequantizing a whole stack once for its modules (4 launches a layer instead of 7) measured no faster
    on an H200: a prefill of 51.6 vs 47.6 ms (BENCHMARKS.md, fifth session)."""
    return torch.nn.functional.linear(x, weight.dense_rows(row0, rows, x.dtype))


def _read_tile_major(modules, weight: Weight) -> None:
    """The step laid the stacked bytes out tile-major (`nf4_cuda.tile_packed`), so bitsandbytes can no longer
    read them: each module's forward (transformers' prefill, `hf-generate`) dequantizes its own rows of the
    stacked weight instead, and its parameter becomes a flat view of the tile-major bytes (no copy is kept)."""
    flat = weight.packed.reshape(-1)
    row0 = 0
    for mod in modules:
        size = mod.weight.data.numel()
        mod.weight.data = flat[:size].view(mod.weight.data.shape)      # same size; its contents are not read
        forward = functools.partial(_tile_major_forward, weight=weight, row0=row0, rows=mod.out_features)
        if hasattr(mod, "_old_forward"):     # accelerate's hooks wrap `forward` and call this one
            mod._old_forward = forward
        else:
            mod.forward = forward
        mod._eventspec_tile_major = weight
        row0 += mod.out_features


class ExactStepModel(CudaGraphStepModel):
    """CudaGraphStepModel whose step runs the row-invariant kernels (CUDA; the CPU under TRITON_INTERPRET).
    `nf4_scales`: "float32" (the NF4 kernel reads each block's absmax expanded once to float32) or "bytes"
    (it reads bitsandbytes' double-quantized bytes and computes each absmax: the same bits, 0.28 GiB less
    for a 7B model, ~2 % slower a decode step and 5 % a verification of 8 on an H200)."""

    NF4_SCALES = ("float32", "bytes")

    def __init__(self, model, *, nf4_scales: str = "float32", **kwargs):
        if nf4_scales not in self.NF4_SCALES:
            raise ValueError(f"nf4_scales must be one of {', '.join(self.NF4_SCALES)}; got {nf4_scales!r}")
        self.nf4_scales = nf4_scales
        super().__init__(model, **kwargs)

    def _setup(self) -> None:
        if not usable_on(self.device):
            raise ValueError(f"the exact step's kernels need a CUDA device (or TRITON_INTERPRET=1); got {self.device}")
        d = self.decoder
        config = d.config
        self.heads = config.num_attention_heads
        self.layers_w: list[_Layer] = []
        # NF4 on tensor cores takes 16-bit inputs; a float32 model keeps the rows kernel
        kernel = "auto" if d.embed_tokens.weight.dtype in (torch.bfloat16, torch.float16) else "rows"
        keep_bytes = self.nf4_scales == "bytes"
        with torch.inference_mode():
            for layer in d.layers:
                attn, mlp = layer.self_attn, layer.mlp
                self.layers_w.append(_Layer(
                    input_norm=layer.input_layernorm.weight.data,
                    post_norm=layer.post_attention_layernorm.weight.data,
                    eps=float(getattr(layer.input_layernorm, "variance_epsilon", config.rms_norm_eps)),
                    qkv=_stack([attn.q_proj, attn.k_proj, attn.v_proj], kernel, scale_bytes=keep_bytes),
                    o=_stack([attn.o_proj], kernel, l2_ahead=L2_AHEAD, scale_bytes=keep_bytes),
                    gate_up=_stack([mlp.gate_proj, mlp.up_proj], kernel, scale_bytes=keep_bytes),
                    down=_stack([mlp.down_proj], kernel, scale_bytes=keep_bytes),
                ))
            self.final_norm = d.norm.weight.data
            self.final_eps = float(getattr(d.norm, "variance_epsilon", config.rms_norm_eps))
            self.head = _stack([d.lm_head])
            self.inv_freq = d.rotary_emb.inv_freq.float().contiguous()
            self.rope_scaling = float(getattr(d.rotary_emb, "attention_scaling", 1.0))
            self._valid_u8 = self._valid.to(torch.uint8)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def prefill(self, prompt):
        out = super().prefill(prompt)
        with torch.inference_mode():
            self._valid_u8.copy_(self._valid)
        return out

    def step_bytes(self, rows: int = 1) -> dict:
        """Bytes one step reads: every weight once, plus the K/V of the cached positions (for the floor)."""
        weights = sum(w.bytes_read() for layer in self.layers_w for w in (layer.qkv, layer.o, layer.gate_up, layer.down))
        weights += self.head.bytes_read()
        stored = sum(w.format_bytes() for layer in self.layers_w for w in (layer.qkv, layer.o, layer.gate_up, layer.down))
        stored += self.head.format_bytes()
        kv_per_position = 2 * sum(k.shape[1] * k.shape[3] * k.element_size() for k in self.kv.keys)   # K and V, [1, kvh, slots, d]
        return {"weights": weights, "weights_as_stored": stored, "kv_per_position": kv_per_position,
                "kernel": self.layers_w[0].qkv.kernel}

    def _compute(self, bucket: int):
        """Per layer: qkv + RoPE + cache write, attention, o + residual + norm, gate/up + silu, down +
        residual + the next norm — eight kernels, each row computed alike whatever the bucket."""
        inputs = self._inputs[: bucket + 1]
        start = inputs[:1]
        hidden = self.decoder.embed_tokens.weight.index_select(0, inputs[1:])          # [b, hidden]
        layers = self.layers_w
        x = rmsnorm(hidden, layers[0].input_norm, layers[0].eps)
        for i, (layer, keys, values) in enumerate(zip(layers, self.kv.keys, self.kv.values)):
            keys, values = keys[0], values[0]                                            # [kvh, slots, d]
            q = qkv_rope_store(x, layer.qkv, keys, values, start, self.inv_freq, self.rope_scaling, self.heads)
            a = attention(q, keys, values, self._valid_u8, start)
            hidden, x = linear_residual_norm(a, layer.o, hidden, layer.post_norm, layer.eps)
            g = gate_up_silu(x, layer.gate_up)
            last = i + 1 == len(layers)
            norm, eps = (self.final_norm, self.final_eps) if last else (layers[i + 1].input_norm, layers[i + 1].eps)
            hidden, x = linear_residual_norm(g, layer.down, hidden, norm, eps)
        logits = linear(x, self.head, out_dtype=torch.float32)
        return logits, logits.argmax(dim=-1), x.float() if self.want_hidden else None
