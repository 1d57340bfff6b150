"""Per-row kernels of the exact step: RMSNorm, and RoPE that also writes the new K/V into the cache.
Each program owns one row (and head), so a row's result never depends on the rows beside it."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .common import cast


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, K, eps, BLOCK: tl.constexpr, EMULATE: tl.constexpr):
    row = tl.program_id(0)
    rk = tl.arange(0, BLOCK)
    ok = rk < K
    x = tl.load(x_ptr + row * K + rk, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / K + eps)
    w = tl.load(w_ptr + rk, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * K + rk, cast(x * rstd * w, out_ptr.dtype.element_ty, EMULATE), mask=ok)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    m, k = x.shape
    out = torch.empty_like(x)
    _rmsnorm_kernel[(m,)](x, weight, out, k, eps, BLOCK=triton.next_power_of_2(k), EMULATE=INTERPRET)
    return out


@triton.jit
def _rope_store_kernel(qkv_ptr, q_ptr, k_cache_ptr, v_cache_ptr, start_ptr, inv_freq_ptr, scaling,
                       H, KVH, SLOTS, D: tl.constexpr, EMULATE: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)          # 0..H-1: query heads, H..H+KVH-1: key/value heads
    half = tl.arange(0, D // 2)
    pos = tl.load(start_ptr) + row
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + half)
    cos = tl.cos(angle) * scaling
    sin = tl.sin(angle) * scaling
    width = (H + 2 * KVH) * D
    base = qkv_ptr + row * width + head * D
    x1 = tl.load(base + half).to(tl.float32)
    x2 = tl.load(base + D // 2 + half).to(tl.float32)
    y1 = cast(x1 * cos - x2 * sin, q_ptr.dtype.element_ty, EMULATE)
    y2 = cast(x2 * cos + x1 * sin, q_ptr.dtype.element_ty, EMULATE)
    if head < H:
        tl.store(q_ptr + row * H * D + head * D + half, y1)
        tl.store(q_ptr + row * H * D + head * D + D // 2 + half, y2)
    else:
        kv = head - H
        dest = (kv * SLOTS + pos) * D
        tl.store(k_cache_ptr + dest + half, y1)
        tl.store(k_cache_ptr + dest + D // 2 + half, y2)
        rd = tl.arange(0, D)
        v = tl.load(qkv_ptr + row * width + (H + KVH) * D + kv * D + rd)
        tl.store(v_cache_ptr + dest + rd, v)


def rope_and_store(qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor,
                   inv_freq: torch.Tensor, scaling: float, heads: int) -> torch.Tensor:
    """`qkv` [M, (H + 2·KVH)·D]; rotates q and k at positions start + row, writes k and v into the
    cache slots of those positions, returns the rotated q [M, H·D]."""
    m = qkv.shape[0]
    kvh, slots, d = keys.shape
    q = torch.empty((m, heads * d), dtype=qkv.dtype, device=qkv.device)
    _rope_store_kernel[(m, heads + kvh)](qkv, q, keys, values, start, inv_freq, float(scaling),
                                         heads, kvh, slots, D=d, EMULATE=INTERPRET)
    return q
