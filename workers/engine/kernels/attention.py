"""Row-count-invariant attention of 1–33 new query rows over a static KV cache (flash-decoding style).

The cache is split into fixed chunks of `Config.split` slots; a program handles one head, one chunk and one
tile of `Config.block_m` query rows with an online softmax and writes the chunk's partial (max, sum,
weighted values) to scratch; `_merge_row` then merges a row's chunks. Nothing depends on the row count: the
tiles are fixed, a tile's loop ends at the last position its rows could see (cache start + block_m per
tile), not at the last real row, and the chunks a row's merge reads are the ones its tile reaches (others
are masked to exact zeros); slots a row cannot see get weight exactly 0. Row i sits at position `start + i`
and sees slots ≤ its position that are `valid` (prompt padding is not). The grid covers the whole cache, so
a CUDA graph captured once serves every cache length; programs of chunks beyond the tile's reach do nothing.

Two ways to run the merge, with the same arithmetic (`_merge_row`), so the same bits (a test compares them
bit for bit, on the GPU too):
- ticket (one launch): each program of a (head, row tile) adds 1 to that tile's counter once its partial is
  stored, and the one that draws the last number merges the tile's rows. Only *who* merges depends on
  timing. Memory ordering as in cooperative groups' grid sync: a CTA barrier (every thread's partial stores
  issued before the ticket), one thread's acq_rel atomic at GPU scope, then loads that bypass L1 (`.cg`),
  which is not coherent across SMs. The merger sets the counter back to 0 for the next launch.
- combine (two launches): a second kernel, one program per (row, head).
`Config.merge="auto"` (the step's) takes the ticket for one row (decode) and the combine for more: the ticket
merges its rows one after another (9 rows: 0.70 against 0.41 ms a step).

Measured on an H200 (`benchmarks/attention_sweep.py`, 32 layers, ms a step for 1 / 9 rows;
benchmarks/2026-12-03f-h200): the earlier shape (32-row tiles, combine) 0.387 / 0.413 at EventGPT's 641
cached positions and 0.666 / 0.696 at Video-LLaVA's 2,076; 16-row tiles 0.324 / 0.375 and 0.499 / 0.570
(the ticket's 1-row and the combine's 9-row figures: what `auto` takes); torch's SDPA, which is not
row-invariant, 0.298 / 0.529 and 0.516 / 1.099. None of 15 other shapes (64- or 256-slot chunks, 8 warps,
128-slot loop steps, other pipeline depths) was faster by more than 1 % in any column. In the step the attention went 0.366 → 0.310 ms (EventGPT) and 0.675 → 0.507 ms
(Video-LLaVA) of kernel time (BENCHMARKS.md, sixth session). `Config.prefetch` (the K/V asked into L2 before
the PDL wait) left its share of a step's critical path where it was (0.309 → 0.304 ms; tenth session): off."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import INTERPRET, pdl_mode
from .common import cast, dot_f32, prefetch_l2, wait_for_inputs

CHUNKS_AT_ONCE = 32        # chunks a merge reads in one vector load (more: in fixed groups of this many)


@dataclass(frozen=True)
class Config:
    """Launch shape of the attention; none changes a row's arithmetic with the row count, only speed (and,
    for `split` and `block_n`, the order of a row's sums: every step of one process uses the same config).
    EVENTSPEC_ATTENTION='key=value,...' sets it for a process, e.g. `split=64,merge=combine,warps=8`."""

    split: int = 128          # cache slots a program reads (a chunk); a multiple of block_n
    merge: str = "auto"       # ticket: the last program of a (head, row tile) merges its rows (one launch);
                              # combine: a second launch merges them, one program per (row, head); auto:
                              # ticket for one row (decode), combine for more (the ticket merges its rows one
                              # after another). Both merge alike, so the choice never changes a bit
    block_m: int = 16         # query rows a program holds (a fixed tile; 16 is the MMA's least)
    block_n: int = 64         # cache slots a loop step reads
    warps: int = 4
    stages: int = 2           # Triton's software pipelining of the slot loop
    prefetch: int = 0         # 1 (with PDL, on the GPU): before it waits for the kernel ahead, a program asks L2 for
                              # the K/V lines of its chunk, which earlier steps wrote (the slots of this step's rows
                              # may be in flight: L2 is where their writes land, so a prefetch cannot go stale)

    def __post_init__(self):
        if self.merge not in MERGES:
            raise ValueError(f"attention merge must be one of {', '.join(MERGES)}; got {self.merge!r}")
        if self.block_n < 16 or self.block_n & (self.block_n - 1) or self.split % self.block_n:
            raise ValueError(f"attention block_n must be a power of two >= 16 dividing split; got {self.block_n}, "
                             f"split {self.split}")
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ValueError(f"attention block_m must be a power of two >= 16; got {self.block_m}")
        if self.warps not in (1, 2, 4, 8, 16) or not 1 <= self.stages <= 6:
            raise ValueError(f"attention warps must be a power of two up to 16 and stages 1-6; got {self.warps}, "
                             f"{self.stages}")


MERGES = ("auto", "ticket", "combine")


def parse_config(text: str) -> Config:
    """A `Config` from 'key=value,key=value' (EVENTSPEC_ATTENTION's form), the other fields at their defaults."""
    fields = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in Config.__dataclass_fields__ or not value:
            raise ValueError(f"EVENTSPEC_ATTENTION: expected key=value with keys {sorted(Config.__dataclass_fields__)};"
                             f" got {item!r}")
        if key == "merge":
            fields[key] = value
        elif value.isdigit():
            fields[key] = int(value)
        else:
            raise ValueError(f"EVENTSPEC_ATTENTION: {key} takes a whole number; got {value!r}")
    return Config(**fields)


CONFIG = parse_config(os.environ.get("EVENTSPEC_ATTENTION", ""))

# Per device, every ticket buffer ever allocated, the newest (largest) last. Older ones stay alive because a
# CUDA graph captured while they were the newest holds their address.
_TICKETS: dict[torch.device, list[torch.Tensor]] = {}


@triton.jit
def _chunks_seen(start, mt, SLOTS, BLOCK_M: tl.constexpr, SPLIT_LEN: tl.constexpr):
    """The chunks some row of row tile `mt` can see: a function of the cache start and the tile, never of M."""
    return tl.minimum(tl.cdiv(start + (mt + 1) * BLOCK_M, SPLIT_LEN), tl.cdiv(SLOTS, SPLIT_LEN))


@triton.jit
def _prefetch_chunk(k_ptr, v_ptr, h, s, mt, start, SLOTS, GROUP: tl.constexpr, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, SPLIT_LEN: tl.constexpr, LINE: tl.constexpr):
    """Ask L2 for the K and V lines of the slots `_partial` will read for (head h, chunk s, row tile mt)."""
    lo = s * SPLIT_LEN
    last = tl.minimum(tl.minimum(lo + SPLIT_LEN, start + (mt + 1) * BLOCK_M), SLOTS) - 1
    rn = tl.minimum(lo + tl.arange(0, SPLIT_LEN), last)               # repeats of the last slot: the same lines
    offsets = (h // GROUP) * SLOTS * D + rn[:, None] * D + (tl.arange(0, D // LINE) * LINE)[None, :]
    prefetch_l2(k_ptr + offsets)
    prefetch_l2(v_ptr + offsets)


@triton.jit
def _partial(q_ptr, k_ptr, v_ptr, valid_ptr, po_ptr, pm_ptr, pl_ptr, h, s, mt, start, M, H, SLOTS, sm_scale,
             GROUP: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr):
    """Online softmax of row tile `mt`, head `h` over chunk `s`, stored to scratch slot (s, row, h)."""
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
def _merge_row(po_ptr, pm_ptr, pl_ptr, out_ptr, row, h, M, H, n_chunks, D: tl.constexpr, EMULATE: tl.constexpr,
               CHUNKS: tl.constexpr, CACHE: tl.constexpr):
    """Row `row` of head `h`: its n_chunks partials merged, CHUNKS of them a vector load (CACHE ".cg": loads
    that bypass L1, for partials other SMs stored in this launch). Chunks past n_chunks are masked to what an
    unseen chunk stores (max -inf, sum 0), so their weight is exactly 0. The same arithmetic for every row
    and row count; both merges (ticket, combine) call it, so they give the same bits."""
    rd = tl.arange(0, D)
    c = tl.arange(0, CHUNKS)
    m = tl.full((CHUNKS,), float("-inf"), dtype=tl.float32)
    for s0 in range(0, n_chunks, CHUNKS):
        ok = s0 + c < n_chunks
        m = tl.maximum(m, tl.load(pm_ptr + ((s0 + c) * M + row) * H + h, mask=ok, other=float("-inf"),
                                  cache_modifier=CACHE))
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    denom = tl.sum(tl.zeros((CHUNKS,), dtype=tl.float32), 0)
    acc = tl.zeros((D,), dtype=tl.float32)
    for s0 in range(0, n_chunks, CHUNKS):
        ok = s0 + c < n_chunks
        slot = ((s0 + c) * M + row) * H + h
        weight = tl.exp(tl.load(pm_ptr + slot, mask=ok, other=float("-inf"), cache_modifier=CACHE) - m_safe)
        denom += tl.sum(tl.load(pl_ptr + slot, mask=ok, other=0.0, cache_modifier=CACHE) * weight, 0)
        part = tl.load(po_ptr + slot[:, None] * D + rd[None, :], mask=ok[:, None], other=0.0, cache_modifier=CACHE)
        acc += tl.sum(part * weight[:, None], 0)
    tl.store(out_ptr + row * (H * D) + h * D + rd, cast(acc / denom, out_ptr.dtype.element_ty, EMULATE))


@triton.jit(do_not_specialize=["M"])
def _ticket_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, start_ptr, po_ptr, pm_ptr, pl_ptr, out_ptr, ticket_ptr,
                   M, H, SLOTS, sm_scale,
                   GROUP: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr, EMULATE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr, CHUNKS: tl.constexpr,
                   PDL: tl.constexpr, PREFETCH: tl.constexpr = 0, LINE: tl.constexpr = 64):
    """merge=ticket: partials, then the last program of a (head, row tile) merges the tile's rows."""
    h = tl.program_id(0)
    s = tl.program_id(1)
    mt = tl.program_id(2)
    # the step's host copy wrote `start` before the step's first kernel, so it may be read before the wait
    start = tl.load(start_ptr)
    n_active = _chunks_seen(start, mt, SLOTS, BLOCK_M, SPLIT_LEN)
    if PREFETCH:
        if s < n_active:
            _prefetch_chunk(k_ptr, v_ptr, h, s, mt, start, SLOTS, GROUP, D, BLOCK_M, SPLIT_LEN, LINE)
    wait_for_inputs(PDL)
    if s < n_active:
        _partial(q_ptr, k_ptr, v_ptr, valid_ptr, po_ptr, pm_ptr, pl_ptr, h, s, mt, start, M, H, SLOTS, sm_scale,
                 GROUP, D, UPCAST, BLOCK_M, BLOCK_N, SPLIT_LEN)
        tl.debug_barrier()                     # every thread's partial stores issued before the ticket
        ticket = ticket_ptr + mt * H + h
        if tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") == n_active - 1:
            for row in range(mt * BLOCK_M, tl.minimum(M, (mt + 1) * BLOCK_M)):
                _merge_row(po_ptr, pm_ptr, pl_ptr, out_ptr, row, h, M, H, n_active, D, EMULATE, CHUNKS, ".cg")
            tl.store(ticket, 0)                # every other holder has drawn: nobody touches it until the next launch


@triton.jit(do_not_specialize=["M"])
def _partial_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, start_ptr, po_ptr, pm_ptr, pl_ptr,
                    M, H, SLOTS, sm_scale,
                    GROUP: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr, PDL: tl.constexpr,
                    PREFETCH: tl.constexpr = 0, LINE: tl.constexpr = 64):
    """merge=combine, first launch: the partial of every chunk a row tile can see."""
    h = tl.program_id(0)
    s = tl.program_id(1)
    mt = tl.program_id(2)
    start = tl.load(start_ptr)                  # as in `_ticket_kernel`: readable before the wait
    active = s < _chunks_seen(start, mt, SLOTS, BLOCK_M, SPLIT_LEN)
    if PREFETCH:
        if active:
            _prefetch_chunk(k_ptr, v_ptr, h, s, mt, start, SLOTS, GROUP, D, BLOCK_M, SPLIT_LEN, LINE)
    wait_for_inputs(PDL)
    if active:
        _partial(q_ptr, k_ptr, v_ptr, valid_ptr, po_ptr, pm_ptr, pl_ptr, h, s, mt, start, M, H, SLOTS, sm_scale,
                 GROUP, D, UPCAST, BLOCK_M, BLOCK_N, SPLIT_LEN)


@triton.jit(do_not_specialize=["M"])
def _combine_kernel(po_ptr, pm_ptr, pl_ptr, out_ptr, start_ptr, M, H, SLOTS, D: tl.constexpr,
                    EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_LEN: tl.constexpr, CHUNKS: tl.constexpr,
                    PDL: tl.constexpr):
    """merge=combine, second launch: one row of one head."""
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    n_active = _chunks_seen(tl.load(start_ptr), row // BLOCK_M, SLOTS, BLOCK_M, SPLIT_LEN)
    _merge_row(po_ptr, pm_ptr, pl_ptr, out_ptr, row, tl.program_id(1), M, H, n_active, D, EMULATE, CHUNKS, "")


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
              start: torch.Tensor, config: Config = CONFIG) -> torch.Tensor:
    """`q` [M, H·D] (rotated), `keys`/`values` [KVH, SLOTS, D] (one layer's cache), `valid` [SLOTS] bool,
    `start` a 1-element device tensor: the position of row 0. Returns [M, H·D] in q's dtype. `config`
    overrides the process's (benchmarks/attention_sweep.py)."""
    m = q.shape[0]
    kvh, slots, d = keys.shape
    h = q.shape[1] // d
    if h % kvh or d & (d - 1):
        raise ValueError(f"attention needs heads divisible by KV heads and a power-of-two head size; got {h}/{kvh}, {d}")
    nsplit = -(-slots // config.split)
    po = torch.empty((nsplit, m, h, d), dtype=torch.float32, device=q.device)
    pm = torch.empty((nsplit, m, h), dtype=torch.float32, device=q.device)
    pl = torch.empty((nsplit, m, h), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    grid = (h, nsplit, -(-m // config.block_m))
    chunks = min(CHUNKS_AT_ONCE, triton.next_power_of_2(nsplit))
    pdl = pdl_mode(q.device)
    common = dict(GROUP=h // kvh, D=d, UPCAST=INTERPRET or q.dtype == torch.float32, BLOCK_M=config.block_m,
                  BLOCK_N=config.block_n, SPLIT_LEN=config.split, num_warps=config.warps, num_stages=config.stages,
                  PDL=pdl, launch_pdl=pdl > 0)
    # prefetching needs inline assembly (not in Triton's interpreter) and only pays ahead of a PDL wait
    prefetch = dict(PREFETCH=int(bool(config.prefetch) and pdl > 0 and not INTERPRET),
                    LINE=max(1, min(d, 128 // keys.element_size())))
    scale = 1.0 / math.sqrt(d)
    if config.merge == "ticket" or (config.merge == "auto" and m == 1):
        tickets = ticket_buffer(q.device, h * grid[2])
        _ticket_kernel[grid](q, keys, values, valid, start, po, pm, pl, out, tickets, m, h, slots, scale,
                             EMULATE=INTERPRET, CHUNKS=chunks, **common, **prefetch)
        return out
    _partial_kernel[grid](q, keys, values, valid, start, po, pm, pl, m, h, slots, scale, **common, **prefetch)
    _combine_kernel[(m, h)](po, pm, pl, out, start, m, h, slots, D=d, EMULATE=INTERPRET, BLOCK_M=config.block_m,
                            SPLIT_LEN=config.split, CHUNKS=chunks, PDL=pdl, num_warps=4, launch_pdl=pdl > 0)
    return out
