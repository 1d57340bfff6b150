"""Row-count-invariant attention of 1–33 new query rows over a static KV cache (flash-decoding style), one
kernel launch per layer.

The cache is split into fixed chunks of `SPLIT_LEN` slots; a program handles one head, one chunk and one
tile of 32 query rows with an online softmax and writes the chunk's partial (max, sum, weighted values) to
scratch. The last program of a (head, row tile) to finish merges that tile's chunks, in chunk order, into
the output. Nothing depends on the row count: the tiles are fixed, a tile's loop ends at the last position
its 32 rows could see (cache start + 32 per tile), not at the last real row, and the chunks a tile merges
are the ones that position reaches; slots a row cannot see get weight exactly 0, so they add exact zeros.
Row i sits at position `start + i` and sees slots ≤ its position that are `valid` (prompt padding is not).
The grid covers the whole cache, so a CUDA graph captured once serves every cache length; programs of
chunks beyond the tile's reach do nothing.

Who merges is decided by a ticket: each program of a (head, row tile) adds 1 to that tile's counter after
its partial is stored, and the one that draws the last number merges. Only *who* merges depends on timing;
the merge reads every partial (its own included) back from memory and sums them in chunk order with fixed
arithmetic, so the bits do not. The memory ordering is cooperative groups' grid sync: a CTA barrier (every
thread's partial stores issued before the ticket), one thread's acq_rel atomic at GPU scope (release
publishes the CTA's stores, acquire on the merging side sees every earlier ticket holder's), then loads
that bypass L1 (`.cg`), which is not coherent across SMs. The merger sets the counter back to 0, so the
next launch (next layer, next step, a graph replay) starts clean.

`EVENTSPEC_ATTENTION=two-pass` selects the earlier two launches (the same partials, then a combine kernel,
grid rows × heads, with the same sums, so the same bits) for same-run measurements. Two-pass took 0.29 ms of
partials + 0.10 ms of combine a step on an H200 (BENCHMARKS.md, "Attention chunk length", before V's load
moved up beside K's); the one-launch figure is not measured yet.
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
MODES = ("fused", "two-pass")


def _split_len() -> int:
    """Cache slots per chunk (one program each): 128, or EVENTSPEC_ATTENTION_SPLIT (a multiple of BLOCK_N) for
    measurements. On an H200 (EventGPT, a 641-token prompt, `step_bench.py --profile`, two-pass) the
    attention took 0.49 ms a step at 256 (128 programs, one per SM), 0.40 ms at 128 and 0.39 ms at 64, whose
    merge costs more. A row's sum depends on this value, never on the row count."""
    value = int(os.environ.get("EVENTSPEC_ATTENTION_SPLIT", "128"))
    if value < BLOCK_N or value % BLOCK_N:
        raise ValueError(f"EVENTSPEC_ATTENTION_SPLIT must be a positive multiple of {BLOCK_N}; got {value}")
    return value


def _mode() -> str:
    """EVENTSPEC_ATTENTION: `fused` (one launch, the step's) or `two-pass` (partials, then a combine launch),
    kept to measure the one against the other in the same run."""
    value = os.environ.get("EVENTSPEC_ATTENTION", "fused")
    if value not in MODES:
        raise ValueError(f"EVENTSPEC_ATTENTION must be one of {', '.join(MODES)}; got {value!r}")
    return value


SPLIT_LEN = _split_len()
MODE = _mode()

# Per device, every ticket buffer ever allocated, the newest (largest) last. Older ones stay alive because a
# CUDA graph captured while they were the newest holds their address.
_TICKETS: dict[torch.device, list[torch.Tensor]] = {}


@triton.jit
def _partial(q_ptr, k_ptr, v_ptr, valid_ptr, po_ptr, pm_ptr, pl_ptr, h, s, mt, start, M, H, SLOTS, sm_scale,
             GROUP: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr):
    """Online softmax of row tile `mt`, head `h` over chunk `s`, stored to scratch slot (s, row, h). V's load
    is issued with K's, so their latencies overlap instead of following each other."""
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
        v = tl.load(v_ptr + kv_base + rn[:, None] * D + rd[None, :], mask=in_cache[:, None], other=0.0)
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


@triton.jit
def _written_by_others(ptr, offsets, ok):
    """A load of values other SMs stored in this launch: `.cg` reads L2, never a stale L1 line."""
    return tl.load(ptr + offsets, mask=ok, other=0.0, cache_modifier=".cg")


@triton.jit
def _merge_tile(po_ptr, pm_ptr, pl_ptr, out_ptr, mt, h, M, H, n_chunks,
                D: tl.constexpr, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr):
    """`_combine_kernel`'s arithmetic, chunk by chunk in the same order, for the rows of tile `mt` at once."""
    rm = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, D)
    ok = rm < M
    first = rm * H + h
    m = _written_by_others(pm_ptr, first, ok)
    for s in range(1, n_chunks):
        m = tl.maximum(m, _written_by_others(pm_ptr, (s * M + rm) * H + h, ok))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.exp(_written_by_others(pm_ptr, first, ok) - m_safe)
    denom = _written_by_others(pl_ptr, first, ok) * weight
    acc = _written_by_others(po_ptr, first[:, None] * D + rd[None, :], ok[:, None]) * weight[:, None]
    for s in range(1, n_chunks):
        slot = (s * M + rm) * H + h
        weight = tl.exp(_written_by_others(pm_ptr, slot, ok) - m_safe)
        denom += _written_by_others(pl_ptr, slot, ok) * weight
        acc += _written_by_others(po_ptr, slot[:, None] * D + rd[None, :], ok[:, None]) * weight[:, None]
    out = cast(acc / denom[:, None], out_ptr.dtype.element_ty, EMULATE)
    tl.store(out_ptr + rm[:, None] * (H * D) + h * D + rd[None, :], out, mask=ok[:, None])


@triton.jit(do_not_specialize=["M"])
def _fused_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, start_ptr, po_ptr, pm_ptr, pl_ptr, out_ptr, ticket_ptr,
                  M, H, SLOTS, sm_scale,
                  GROUP: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr, EMULATE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr):
    """Program (head, chunk, row tile): the chunk's partial, then the tile's merge if it draws the last ticket."""
    h = tl.program_id(0)
    s = tl.program_id(1)
    mt = tl.program_id(2)
    start = tl.load(start_ptr)
    # the chunks some row of this tile can see: a function of start and mt, never of M
    n_active = tl.minimum(tl.cdiv(start + (mt + 1) * BLOCK_M, SPLIT_LEN), tl.cdiv(SLOTS, SPLIT_LEN))
    if s < n_active:
        _partial(q_ptr, k_ptr, v_ptr, valid_ptr, po_ptr, pm_ptr, pl_ptr, h, s, mt, start, M, H, SLOTS, sm_scale,
                 GROUP, D, UPCAST, BLOCK_M, BLOCK_N, SPLIT_LEN)
        tl.debug_barrier()                     # every thread's partial stores issued before the ticket
        ticket = ticket_ptr + mt * H + h
        if tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") == n_active - 1:
            _merge_tile(po_ptr, pm_ptr, pl_ptr, out_ptr, mt, h, M, H, n_active, D, EMULATE, BLOCK_M)
            tl.store(ticket, 0)                # every other holder has drawn: nobody touches it until the next launch


@triton.jit(do_not_specialize=["M"])
def _partial_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, start_ptr, po_ptr, pm_ptr, pl_ptr,
                    M, H, SLOTS, sm_scale,
                    GROUP: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr):
    """Two-pass, first launch: every chunk's partial, those beyond a tile's reach included (empty)."""
    _partial(q_ptr, k_ptr, v_ptr, valid_ptr, po_ptr, pm_ptr, pl_ptr,
             tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.load(start_ptr), M, H, SLOTS, sm_scale,
             GROUP, D, UPCAST, BLOCK_M, BLOCK_N, SPLIT_LEN)


@triton.jit(do_not_specialize=["M"])
def _combine_kernel(po_ptr, pm_ptr, pl_ptr, out_ptr, M, H, NSPLIT, D: tl.constexpr, EMULATE: tl.constexpr):
    """Two-pass, second launch: one row of one head, its chunks merged in chunk order."""
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


def ticket_buffer(device: torch.device, count: int) -> torch.Tensor:
    """The device's int32 ticket counters (all zero between launches), at least `count` of them. Launches on
    one stream run one after another and each leaves its counters at zero, so one buffer serves every call.
    Growing allocates, which a CUDA graph capture must not do (the step model runs every bucket eagerly
    before capturing it, so the buffer is there by then)."""
    held = _TICKETS.setdefault(device, [])
    if held and held[-1].numel() >= count:
        return held[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"attention needs {count} ticket counters on {device} and none were allocated before "
                           "this CUDA graph capture: run the step eagerly with this many rows and heads first")
    held.append(torch.zeros(count, dtype=torch.int32, device=device))
    return held[-1]


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
    out = torch.empty_like(q)
    grid = (h, nsplit, -(-m // BLOCK_M))
    common = dict(GROUP=h // kvh, D=d, UPCAST=INTERPRET or q.dtype == torch.float32,
                  BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SPLIT_LEN=SPLIT_LEN, num_warps=4, num_stages=2)
    scale = 1.0 / math.sqrt(d)
    if MODE == "fused":
        tickets = ticket_buffer(q.device, h * grid[2])
        _fused_kernel[grid](q, keys, values, valid, start, po, pm, pl, out, tickets, m, h, slots, scale,
                            EMULATE=INTERPRET, **common)
        return out
    _partial_kernel[grid](q, keys, values, valid, start, po, pm, pl, m, h, slots, scale, **common)
    _combine_kernel[(m, h)](po, pm, pl, out, m, h, nsplit, D=d, EMULATE=INTERPRET)
    return out
