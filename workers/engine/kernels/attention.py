"""Row-count-invariant attention of 1–33 new query rows over a static KV cache (flash-decoding style).

The cache is split into fixed chunks of `SPLIT_LEN` slots; a program handles one head, one chunk and one
tile of 32 query rows with an online softmax, and `_combine` merges the chunks of a row in chunk order.
Nothing depends on the row count: the tiles are fixed, and a tile's loop ends at the last position its 16
rows could see (cache start + 32 per tile), not at the last real row; slots a row cannot see get weight
exactly 0, so they add exact zeros. Row i sits at position `start + i` and sees slots ≤ its position that
are `valid` (prompt padding is not). The grid covers the whole cache, so a CUDA graph captured once serves
every cache length; chunks beyond the rows' positions exit at once.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .common import cast, dot_f32

BLOCK_M = 32
BLOCK_N = 64


def _split_len() -> int:
    """Cache slots per chunk (one program each): 128, or EVENTSPEC_ATTENTION_SPLIT (a multiple of BLOCK_N) for
    measurements. On an H200 (EventGPT, a 641-token prompt, `step_bench.py --profile`) the attention took
    0.49 ms a step at 256 (128 programs, one per SM), 0.40 ms at 128 and 0.39 ms at 64, whose merge costs
    more. A row's sum depends on this value, never on the row count."""
    value = int(os.environ.get("EVENTSPEC_ATTENTION_SPLIT", "128"))
    if value < BLOCK_N or value % BLOCK_N:
        raise ValueError(f"EVENTSPEC_ATTENTION_SPLIT must be a positive multiple of {BLOCK_N}; got {value}")
    return value


SPLIT_LEN = _split_len()


@triton.jit(do_not_specialize=["M"])
def _partial_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, start_ptr, po_ptr, pm_ptr, pl_ptr,
                    M, H, SLOTS, sm_scale,
                    GROUP: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr):
    h = tl.program_id(0)
    s = tl.program_id(1)
    mt = tl.program_id(2)
    start = tl.load(start_ptr)
    rm = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, D)
    row_ok = rm < M
    pos = start + rm
    q = tl.load(q_ptr + rm[:, None] * (H * D) + h * D + rd[None, :], mask=row_ok[:, None], other=0.0)
    kv_base = (h // GROUP) * SLOTS * D
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    lo = s * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, start + (mt + 1) * BLOCK_M)
    for n0 in range(lo, hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        in_cache = rn < SLOTS
        k = tl.load(k_ptr + kv_base + rn[:, None] * D + rd[None, :], mask=in_cache[:, None], other=0.0)
        if UPCAST:
            scores = dot_f32(q.to(tl.float32), tl.trans(k.to(tl.float32)))
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = scores * sm_scale
        valid = tl.load(valid_ptr + rn, mask=in_cache, other=0) != 0
        see = (rn[None, :] <= pos[:, None]) & valid[None, :]
        scores = tl.where(see, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_base + rn[:, None] * D + rd[None, :], mask=in_cache[:, None], other=0.0)
        if UPCAST:
            pv = dot_f32(cast(p, v.dtype, True).to(tl.float32), v.to(tl.float32))
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    slot = (s * M + rm) * H + h
    tl.store(pm_ptr + slot, m_i, mask=row_ok)
    tl.store(pl_ptr + slot, l_i, mask=row_ok)
    tl.store(po_ptr + slot[:, None] * D + rd[None, :], acc, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["M"])
def _combine_kernel(po_ptr, pm_ptr, pl_ptr, out_ptr, M, H, NSPLIT, D: tl.constexpr, EMULATE: tl.constexpr):
    row = tl.program_id(0)
    h = tl.program_id(1)
    rd = tl.arange(0, D)
    m = tl.load(pm_ptr + row * H + h)
    for s in range(1, NSPLIT):
        m = tl.maximum(m, tl.load(pm_ptr + (s * M + row) * H + h))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.exp(tl.load(pm_ptr + row * H + h) - m_safe)
    denom = tl.load(pl_ptr + row * H + h) * weight
    acc = tl.load(po_ptr + (row * H + h) * D + rd) * weight
    for s in range(1, NSPLIT):
        slot = (s * M + row) * H + h
        weight = tl.exp(tl.load(pm_ptr + slot) - m_safe)
        denom += tl.load(pl_ptr + slot) * weight
        acc += tl.load(po_ptr + slot * D + rd) * weight
    tl.store(out_ptr + row * H * D + h * D + rd, cast(acc / denom, out_ptr.dtype.element_ty, EMULATE))


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
              start: torch.Tensor) -> torch.Tensor:
    """`q` [M, H·D] (rotated), `keys`/`values` [KVH, SLOTS, D] (one layer's cache), `valid` [SLOTS] bool,
    `start` a 1-element device tensor: the position of row 0. Returns [M, H·D] in q's dtype."""
    m = q.shape[0]
    kvh, slots, d = keys.shape
    h = q.shape[1] // d
    if h % kvh or d & (d - 1):
        raise ValueError(f"attention needs heads divisible by KV heads and a power-of-two head size; got {h}/{kvh}, {d}")
    nsplit = -(-slots // SPLIT_LEN)
    po = torch.empty((nsplit, m, h, d), dtype=torch.float32, device=q.device)
    pm = torch.empty((nsplit, m, h), dtype=torch.float32, device=q.device)
    pl = torch.empty((nsplit, m, h), dtype=torch.float32, device=q.device)
    grid = (h, nsplit, -(-m // BLOCK_M))
    _partial_kernel[grid](q, keys, values, valid, start, po, pm, pl, m, h, slots, 1.0 / math.sqrt(d),
                          GROUP=h // kvh, D=d, UPCAST=INTERPRET or q.dtype == torch.float32,
                          BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SPLIT_LEN=SPLIT_LEN, num_warps=4, num_stages=2)
    out = torch.empty_like(q)
    _combine_kernel[(m, h)](po, pm, pl, out, m, h, nsplit, D=d, EMULATE=INTERPRET)
    return out
