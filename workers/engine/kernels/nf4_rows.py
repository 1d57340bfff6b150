"""NF4 matmuls one input row per program: `y[m] = W · x[m]` with W in bitsandbytes' NF4 format, read as
packed bytes and looked up in registers, float32 FMAs (no tensor cores).

Why a second NF4 path: the MMA path of `linear.py` must turn every looked-up weight into an MMA operand,
and on an H200 it streams 0.15–0.25 TB/s (`benchmarks/kernel_probe.py --sweep mma`), 40× the floor of a
decode step. Decode and a draft's steps have one row; here a program owns one row of x and a tile of W
rows, so nothing is converted and the work per weight is a nibble shift, a lookup and an FMA.

Row-invariant by construction: the grid has one program column per input row, and a row's arithmetic (its
tiles, its split of K, the order of its sums) depends on the weight's shape only. More rows cost more
programs, each looking the weights up again (the bytes come from L2): verifying k drafts costs about k + 1
decode steps' lookups (measured on an H200: 5× a decode step for k = 8).

Arithmetic: a weight value is code[q] · absmax[block]; the kernel multiplies x by code[q] and the product
by the block's absmax, in float32 — the same quantized weights bitsandbytes reads, without its rounding of
each dequantized value to bf16 (so this path agrees with bitsandbytes' dequantization to rounding; with a
one-hot x it reproduces it bit for bit, which the GPU test checks).

Variants, measured by `benchmarks/kernel_probe.py --sweep nf4-rows` (BENCHMARKS.md); the step uses the
`ROWS_*` constants below. `LOOKUP`: 0 a load from the 16-entry table (L1), 1 `tl.gather` from a register
copy, 2 a select tree, 4/5 one lookup per byte in a 256-entry table of bf16/float32 pairs, 3 a timing
probe without a lookup (wrong values). `XPAIR` reads a 16-bit x as 32-bit words of two columns;
`PREFETCH` loads the next tile before computing the current one (slower: more registers, less occupancy).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import cast

# The step's configuration, from `benchmarks/kernel_probe.py --sweep nf4-rows` on an H200: 0.71–1.07 TB/s
# of packed bytes for one row at the LLaMA-7B shapes (bitsandbytes' one-row kernel: 0.22–0.85 in the same
# run). Not bandwidth-bound: Nsight Compute (`benchmarks/ncu_rows.py`) counts ~17 instructions per packed
# byte issued at 0.59 per cycle per scheduler, 31 % occupancy (96 registers), DRAM 17.5 % busy, and the
# variant without a lookup reaches only 1.1–1.2 TB/s.
ROWS_BLOCK_N = 32
ROWS_DUAL_N = 16          # the dual kernel holds two accumulators
ROWS_BLOCK_K = 256
ROWS_LOOKUP = 1
ROWS_WARPS = 4
ROWS_PROGRAMS = 512       # programs per row a split-K weight aims at


@triton.jit
def _select_tree(q, code_ptr):
    """code[q] for q in 0..15 by 15 selects on the bits of q (no memory access)."""
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    b3 = (q & 8) != 0
    c0 = tl.load(code_ptr + 0)
    c1 = tl.load(code_ptr + 1)
    c2 = tl.load(code_ptr + 2)
    c3 = tl.load(code_ptr + 3)
    c4 = tl.load(code_ptr + 4)
    c5 = tl.load(code_ptr + 5)
    c6 = tl.load(code_ptr + 6)
    c7 = tl.load(code_ptr + 7)
    c8 = tl.load(code_ptr + 8)
    c9 = tl.load(code_ptr + 9)
    c10 = tl.load(code_ptr + 10)
    c11 = tl.load(code_ptr + 11)
    c12 = tl.load(code_ptr + 12)
    c13 = tl.load(code_ptr + 13)
    c14 = tl.load(code_ptr + 14)
    c15 = tl.load(code_ptr + 15)
    low = tl.where(b2, tl.where(b1, tl.where(b0, c7, c6), tl.where(b0, c5, c4)),
                   tl.where(b1, tl.where(b0, c3, c2), tl.where(b0, c1, c0)))
    high = tl.where(b2, tl.where(b1, tl.where(b0, c15, c14), tl.where(b0, c13, c12)),
                    tl.where(b1, tl.where(b0, c11, c10), tl.where(b0, c9, c8)))
    return tl.where(b3, high, low)


@triton.jit
def _lookup(q, code_ptr, table, LOOKUP: tl.constexpr):
    if LOOKUP == 0:
        return tl.load(code_ptr + q)
    elif LOOKUP == 1:
        return tl.gather(table, q, 2)
    elif LOOKUP == 2:
        return _select_tree(q, code_ptr)
    else:
        return q.to(tl.float32)          # timing probe only


@triton.jit
def _load_tile(x_ptr, row, w_ptr, absmax_ptr, rows, rows_ok, k0, k_end, K,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, XPAIR: tl.constexpr):
    """The packed bytes [BLOCK_N, NB, 32] (int32), absmax [BLOCK_N, NB] and x (even, odd columns) [NB, 32]
    of the K tile at k0; zeros past k_end."""
    NB: tl.constexpr = BLOCK_K // 64
    b = k0 // 64 + tl.arange(0, NB)                           # NF4 block index along the row
    b_ok = b < k_end // 64
    j = b[:, None] * 32 + tl.arange(0, 32)[None, :]           # byte index along the row; columns 2j, 2j+1
    w_mask = rows_ok[:, None, None] & b_ok[None, :, None]
    packed = tl.load(w_ptr + rows[:, None, None] * (K // 2) + j[None, :, :], mask=w_mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + rows[:, None] * (K // 64) + b[None, :], mask=rows_ok[:, None] & b_ok[None, :],
                    other=0.0)
    if XPAIR:       # columns 2j and 2j+1 of a 16-bit x as one 32-bit word (low half = column 2j)
        words = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + row * (K // 2) + j, mask=b_ok[:, None], other=0)
        if x_ptr.dtype.element_ty == tl.bfloat16:
            x_even = (words << 16).to(tl.float32, bitcast=True)
            x_odd = (words & -65536).to(tl.float32, bitcast=True)
        else:
            dtype = x_ptr.dtype.element_ty
            x_even = (words & 65535).to(tl.uint16).to(dtype, bitcast=True).to(tl.float32)
            x_odd = ((words >> 16) & 65535).to(tl.uint16).to(dtype, bitcast=True).to(tl.float32)
    else:
        x_even = tl.load(x_ptr + row * K + 2 * j, mask=b_ok[:, None], other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + row * K + 2 * j + 1, mask=b_ok[:, None], other=0.0).to(tl.float32)
    return packed, scale, x_even, x_odd


@triton.jit
def _tile_update(acc, packed, scale, x_even, x_odd, code_ptr, table, pair_ptr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LOOKUP: tl.constexpr):
    NB: tl.constexpr = BLOCK_K // 64
    if LOOKUP >= 4:     # one lookup per byte in a 256-entry table of pairs: bf16 in int32 (4), float32 in int64 (5)
        pairs = tl.gather(tl.load(pair_ptr + tl.arange(0, 256)), tl.reshape(packed, (BLOCK_N * NB * 32,)), 0)
        pairs = tl.reshape(pairs, (BLOCK_N, NB, 32))
        if LOOKUP == 4:
            w_high = (pairs & -65536).to(tl.float32, bitcast=True)
            w_low = (pairs << 16).to(tl.float32, bitcast=True)
        else:
            w_high = (pairs >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            w_low = pairs.to(tl.int32).to(tl.float32, bitcast=True)
    else:
        w_high = _lookup(packed >> 4, code_ptr, table, LOOKUP)
        w_low = _lookup(packed & 15, code_ptr, table, LOOKUP)
    return acc + (w_high * x_even[None, :, :] + w_low * x_odd[None, :, :]) * scale[:, :, None]


@triton.jit
def row_dot(x_ptr, row, w_ptr, absmax_ptr, code_ptr, rows, rows_ok, k_begin, k_end, K,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LOOKUP: tl.constexpr, XPAIR: tl.constexpr = False,
            pair_ptr=None, PREFETCH: tl.constexpr = False):
    """sum over k in [k_begin, k_end) of W[rows, k] · x[row, k], float32 [BLOCK_N]. BLOCK_K is a multiple
    of 64, so a tile holds whole NF4 blocks: [BLOCK_N rows, BLOCK_K / 64 blocks, 32 bytes]. PREFETCH loads
    the next tile before computing the current one (more bytes in flight per warp)."""
    NB: tl.constexpr = BLOCK_K // 64
    if LOOKUP == 1:
        table = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[None, None, :], (BLOCK_N, NB, 16))
    else:
        table = 0
    acc = tl.zeros((BLOCK_N, NB, 32), dtype=tl.float32)
    if PREFETCH:
        packed, scale, x_even, x_odd = _load_tile(x_ptr, row, w_ptr, absmax_ptr, rows, rows_ok, k_begin, k_end, K,
                                                  BLOCK_N, BLOCK_K, XPAIR)
        for k0 in range(k_begin, k_end, BLOCK_K):
            n_packed, n_scale, n_even, n_odd = _load_tile(x_ptr, row, w_ptr, absmax_ptr, rows, rows_ok,
                                                          k0 + BLOCK_K, k_end, K, BLOCK_N, BLOCK_K, XPAIR)
            acc = _tile_update(acc, packed, scale, x_even, x_odd, code_ptr, table, pair_ptr, BLOCK_N, BLOCK_K,
                               LOOKUP)
            packed, scale, x_even, x_odd = n_packed, n_scale, n_even, n_odd
    else:
        for k0 in range(k_begin, k_end, BLOCK_K):
            packed, scale, x_even, x_odd = _load_tile(x_ptr, row, w_ptr, absmax_ptr, rows, rows_ok, k0, k_end, K,
                                                      BLOCK_N, BLOCK_K, XPAIR)
            acc = _tile_update(acc, packed, scale, x_even, x_odd, code_ptr, table, pair_ptr, BLOCK_N, BLOCK_K,
                               LOOKUP)
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _rows_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, out_ptr, M, N, K, K_SPLIT,
                 SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LOOKUP: tl.constexpr,
                 EMULATE: tl.constexpr, XPAIR: tl.constexpr = False, pair_ptr=None,
                 PREFETCH: tl.constexpr = False):
    """One program = one input row × BLOCK_N weight rows × one K split. SPLITS == 1 writes out[row, n] in
    out's dtype; otherwise float32 partials out[split, row, n], added in split order by the caller."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    row = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    k_begin = pid_s * K_SPLIT
    y = row_dot(x_ptr, row, w_ptr, absmax_ptr, code_ptr, rows, ok, k_begin, tl.minimum(k_begin + K_SPLIT, K), K,
                BLOCK_N, BLOCK_K, LOOKUP, XPAIR, pair_ptr, PREFETCH)
    if SPLITS == 1:
        tl.store(out_ptr + row * N + rows, cast(y, out_ptr.dtype.element_ty, EMULATE), mask=ok)
    else:
        tl.store(out_ptr + (pid_s * M + row) * N + rows, y, mask=ok)


def pair_table(code, wide: bool = False):
    """256 entries, byte b → (code[b >> 4], code[b & 15]): int32 of two bf16 halves (high, low), or (wide)
    int64 of two float32 halves."""
    import torch
    b = torch.arange(256, device=code.device)
    if wide:
        bits = code.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        return (bits[b >> 4] << 32) | bits[b & 15]
    bits = code.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return ((bits[b >> 4] << 16) | bits[b & 15]).to(torch.int32)
