"""Row-count-invariant skinny matmuls `y = x @ W.T` for decode and verification steps (1–33 rows), from a
16-bit weight or a bitsandbytes NF4 weight dequantized in registers, with the layer's elementwise work
fused into their epilogues.
Longer than most modules because the three matmul kernels share one accumulation routine whose exact arithmetic is what makes them row-invariant.

Why invariant: the row tile (`BLOCK_M` = 32), column tile, K tile, split-K count and the order in which
split partial sums are added are functions of the weight's shape alone; the row count is a runtime argument
that only masks loads and stores (`do_not_specialize`, so M = 1 runs the same compiled kernel as M = 9). An
MMA computes each output row from its own input row, so a row's arithmetic is the same whatever rows run
beside it. No atomics: split partials go to a workspace and `_finish_kernel` adds them in split order.

`PROBE` and `FMA` are measurement switches for `benchmarks/kernel_probe.py` (a variant without the codebook
lookup or the absmax, and one with float32 FMAs instead of MMAs); the step never sets them.

Kernels (one layer = qkv · attention · o · gate/up · down):
- `_single_kernel`: one weight, optional split-K; writes the output (no split) or split partials.
- `_dual_kernel`: two row sets of one stacked weight per program, no split, so the epilogue sees both:
  `silu(gate) · up` (gate/up), or RoPE of the pair (i, i + D/2) of a head plus the K/V cache write (qkv).
  A dense weight whose `balanced_splits` on the GPU is more than one (qkv and gate/up on an H200: 192 and
  344 unsplit programs left SMs idle) runs `_single_kernel`'s partials and `_dual_finish_kernel` instead.
- `_finish_kernel`: one program per row adds the split partials and the residual, stores the new hidden
  state, and RMS-normalises it for the next matmul (or the head).

NF4 (bitsandbytes' format, what users load): on a CUDA GPU the step's NF4 matmuls run `nf4_cuda.py`'s
tensor-core kernel, which writes split partials; `_finish_kernel` (o, down) and `_dual_finish_kernel`
(qkv, gate/up: the same epilogues) add them in split order. Elsewhere (the CPU interpreter, no NVRTC, or
`EVENTSPEC_NF4_KERNEL=triton`) they run `nf4_rows.py`'s one-row kernels (`_single`, `_dual_rows_kernel`).
The path is chosen per weight when it is built, never by the row count. The MMA path below still takes NF4 (`NF4=True`: the weight `[N, K]` flattened row-major, blocks
of 64, two 4-bit codes per byte, the first value in the high nibble, dequantized to bitsandbytes' bf16
values, high nibbles against the even columns of x and low nibbles against the odd ones) only for
`benchmarks/kernel_probe.py`'s sweeps, which measured it at 0.15–0.25 TB/s.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from . import INTERPRET, nf4_cuda, pdl_mode
from .common import cast, dot_f32, prefetch_l2, rms_normalize, wait_for_inputs
from .nf4_rows import _rows_kernel, ROWS_BLOCK_K, ROWS_BLOCK_N, ROWS_DUAL_N, ROWS_LOOKUP, ROWS_PROGRAMS, ROWS_WARPS, row_dot

BLOCK_M = 32
BLOCK_N = 64          # single kernel; the dual kernel takes 32 rows of each of its two row sets
DUAL_N = 32
BLOCK_K = 128
NF4_BLOCK = 64
TARGET_PROGRAMS = 256          # enough CTAs to keep every SM of an H200 (132) streaming weights
STAGES = 4                     # pipeline depth of the dense tiles, best on an H200 (benchmarks/kernel_probe.py)
NF4_KERNEL = os.environ.get("EVENTSPEC_NF4_KERNEL", "auto")     # auto | cuda | triton (measurements)
DENSE_DUAL = os.environ.get("EVENTSPEC_DENSE_DUAL", "split")    # split | fused (measured: 4.33 vs 4.57 ms)
# K tiles of its weight rows a dense program asks L2 for before it waits for its inputs (GPU only; with
# programmatic dependent launch, while the kernel ahead still runs)
DENSE_PREFETCH = 0 if INTERPRET else int(os.environ.get("EVENTSPEC_DENSE_PREFETCH", "0"))
# A weight built with `l2_ahead` (the exact step's o projection, EVENTSPEC_L2_AHEAD) asks L2 for its whole weight
# range before it waits for its input, i.e. while the attention ahead of it runs, which reads little and waits
# on latency: 1 a prefetch a line, 2 (NF4 only) 4 KB bulk prefetches. GPU with PDL only
L2_AHEAD = 0 if INTERPRET else int(os.environ.get("EVENTSPEC_L2_AHEAD", "0"))
if L2_AHEAD not in (0, 1, 2):
    raise ValueError(f"EVENTSPEC_L2_AHEAD must be 0, 1 or 2; got {L2_AHEAD}")
RESIDENT = 2                   # dense MMA programs resident per SM (STAGES × 24 KB of shared memory each)
MAX_SPLITS = 8


def balanced_splits(tiles: int, k_blocks: int, sms: int, resident: int = RESIDENT) -> int:
    """Split-K count of a dense weight on a GPU of `sms` SMs: the fewest splits whose programs fill the
    resident slots most evenly (the last round of programs idles the fewest SMs). A function of the shape
    and the GPU only. On an H200 (132 SMs) it keeps o, down and the head at 4, 4 and 1 split and gives
    qkv 4 (192 programs unsplit: 60 SMs ran two, 72 one) and gate/up 3."""
    slots = sms * resident
    best_waste, best = None, 1
    for splits in range(1, min(MAX_SPLITS, k_blocks) + 1):
        programs = tiles * splits
        waste = -(-programs // slots) * slots / programs
        if best_waste is None or waste < best_waste - 1e-9:
            best_waste, best = waste, splits
    return best


@triton.jit
def _mma(acc, w, x, UPCAST: tl.constexpr, WA: tl.constexpr):
    """acc += x @ w.T, as acc[rows of x, rows of w], or (WA) acc.T += w @ x.T: the weight tile is then the
    MMA's A operand, which Triton feeds from registers without a shared-memory round trip (what makes a
    tile dequantized in registers cheap); a column of the result still depends on its own row of x only."""
    if UPCAST:
        w = w.to(tl.float32)
        x = x.to(tl.float32)
        if WA:
            acc += dot_f32(w, tl.trans(x))
        else:
            acc += dot_f32(x, tl.trans(w))
    else:
        if WA:
            acc += tl.dot(w, tl.trans(x))
        else:
            acc += tl.dot(x, tl.trans(w))
    return acc


@triton.jit
def _fma_rows(acc, w, x_ptr, cols, cols_ok, rm, M, K, BLOCK_M: tl.constexpr, STRIDE: tl.constexpr, OFFSET: tl.constexpr):
    """acc[i, :] += W_tile @ x[rm[i], cols·STRIDE + OFFSET] for each real row, with float32 FMAs and one
    reduction per row; rows beyond M are skipped, so M = 1 pays for one row. A row's sum has the same
    order whatever M is: the same compiled code runs for every row."""
    row0 = tl.min(rm, 0)
    for i in tl.static_range(BLOCK_M):
        if row0 + i < M:
            xv = tl.load(x_ptr + (row0 + i) * K + cols * STRIDE + OFFSET, mask=cols_ok, other=0.0).to(tl.float32)
            part = tl.sum(w * xv[None, :], axis=1)
            acc += tl.where((tl.arange(0, BLOCK_M) == i)[:, None], part[None, :], 0.0)
    return acc


@triton.jit
def _accumulate(acc, x_ptr, w_ptr, absmax_ptr, code_ptr, rm, rows, row_ok, k0, M, K,
                NF4: tl.constexpr, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr, WA: tl.constexpr,
                PROBE: tl.constexpr = 0, FMA: tl.constexpr = False, BLOCK_M: tl.constexpr = 16):
    """acc += x[rm, k0:k0+BLOCK_K] @ W[rows, k0:k0+BLOCK_K].T (transposed when WA, never with FMA)"""
    m_ok = rm < M
    if FMA:
        if NF4:
            rj = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            j_ok = rj < K // 2
            wmask = row_ok[:, None] & j_ok[None, :]
            packed = tl.load(w_ptr + rows[:, None] * (K // 2) + rj[None, :], mask=wmask, other=0).to(tl.int32)
            scale = tl.load(absmax_ptr + rows[:, None] * (K // 64) + (rj // 32)[None, :], mask=wmask, other=0.0)
            dtype = x_ptr.dtype.element_ty
            w_high = cast(tl.load(code_ptr + (packed >> 4)) * scale, dtype, UPCAST).to(tl.float32)
            acc = _fma_rows(acc, w_high, x_ptr, rj, j_ok, rm, M, K, BLOCK_M, 2, 0)
            w_low = cast(tl.load(code_ptr + (packed & 15)) * scale, dtype, UPCAST).to(tl.float32)
            acc = _fma_rows(acc, w_low, x_ptr, rj, j_ok, rm, M, K, BLOCK_M, 2, 1)
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            w = tl.load(w_ptr + rows[:, None] * K + rk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _fma_rows(acc, w.to(tl.float32), x_ptr, rk, k_ok, rm, M, K, BLOCK_M, 1, 0)
        return acc
    if NF4:
        rj = k0 // 2 + tl.arange(0, BLOCK_K // 2)              # byte j holds columns 2j (high) and 2j+1
        j_ok = rj < K // 2
        wmask = row_ok[:, None] & j_ok[None, :]
        packed = tl.load(w_ptr + rows[:, None] * (K // 2) + rj[None, :], mask=wmask, other=0).to(tl.int32)
        if PROBE == 2:      # timing probe only: no absmax (wrong values)
            scale = 1.0
        else:
            scale = tl.load(absmax_ptr + rows[:, None] * (K // 64) + (rj // 32)[None, :], mask=wmask, other=0.0)
        xmask = m_ok[:, None] & j_ok[None, :]
        x_even = tl.load(x_ptr + rm[:, None] * K + 2 * rj[None, :], mask=xmask, other=0.0)
        x_odd = tl.load(x_ptr + rm[:, None] * K + 2 * rj[None, :] + 1, mask=xmask, other=0.0)
        if PROBE == 1:      # timing probe only: no codebook lookup (wrong values)
            w_high = cast((packed >> 4).to(tl.float32) * scale, x_even.dtype, UPCAST)
            w_low = cast((packed & 15).to(tl.float32) * scale, x_even.dtype, UPCAST)
        else:
            w_high = cast(tl.load(code_ptr + (packed >> 4)) * scale, x_even.dtype, UPCAST)
            w_low = cast(tl.load(code_ptr + (packed & 15)) * scale, x_even.dtype, UPCAST)
        acc = _mma(acc, w_high, x_even, UPCAST, WA)
        acc = _mma(acc, w_low, x_odd, UPCAST, WA)
    else:
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rows[:, None] * K + rk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(acc, w, x, UPCAST, WA)
    return acc


@triton.jit(do_not_specialize=["M"])
def _single_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, out_ptr, M, N, K, K_SPLIT,
                   SPLITS: tl.constexpr, NF4: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WA: tl.constexpr = True,
                   PROBE: tl.constexpr = 0, FMA: tl.constexpr = False, PDL: tl.constexpr = 0,
                   PREFETCH: tl.constexpr = 0):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    if PREFETCH > 0 and not NF4:        # the first PREFETCH K tiles of the program's weight rows into L2
        lines = pid_s * K_SPLIT + tl.arange(0, PREFETCH * BLOCK_K // 64) * 64      # 64 16-bit values a line
        rows = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
        prefetch_l2(w_ptr + rows[:, None] * K + tl.minimum(lines, K - 1)[None, :])
    wait_for_inputs(PDL)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = rn < N
    if WA and not FMA:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_s * K_SPLIT
    for k0 in range(k_begin, k_begin + K_SPLIT, BLOCK_K):
        acc = _accumulate(acc, x_ptr, w_ptr, absmax_ptr, code_ptr, rm, rn, col_ok, k0, M, K, NF4, UPCAST, BLOCK_K,
                          WA, PROBE, FMA, BLOCK_M)
    if WA and not FMA:
        acc = tl.trans(acc)
    mask = (rm < M)[:, None] & col_ok[None, :]
    if SPLITS == 1:
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=mask)
    else:
        tl.store(out_ptr + pid_s * M * N + rm[:, None] * N + rn[None, :], acc, mask=mask)


@triton.jit
def _dual_epilogue(acc_a, acc_b, rm, m_ok, offset, ok, rows_a, rows_b, group, x_ptr, out_ptr, k_cache_ptr,
                   v_cache_ptr, start_ptr, inv_freq_ptr, scaling, Q_HEADS, KV_HEADS, SLOTS, GROUP, HALF,
                   ROPE: tl.constexpr, UPCAST: tl.constexpr):
    """The dual kernels' epilogue on [rows of x, BLOCK_N] sums of row sets a and b: RoPE of q/k heads and
    the K/V cache write (ROPE), or silu(gate) · up. Shared by the MMA and the NF4 one-row kernels."""
    mask = m_ok[:, None] & ok[None, :]
    dtype = x_ptr.dtype.element_ty
    if ROPE:
        pos = tl.load(start_ptr) + rm                                           # [BLOCK_M]
        if group < Q_HEADS + KV_HEADS:                                           # q and k heads rotate
            angle = pos.to(tl.float32)[:, None] * tl.load(inv_freq_ptr + offset, mask=ok, other=0.0)[None, :]
            cos = tl.cos(angle) * scaling
            sin = tl.sin(angle) * scaling
            y_a = acc_a * cos - acc_b * sin
            y_b = acc_b * cos + acc_a * sin
        else:
            y_a = acc_a
            y_b = acc_b
        if group < Q_HEADS:
            tl.store(out_ptr + rm[:, None] * (Q_HEADS * GROUP) + rows_a[None, :], cast(y_a, dtype, UPCAST), mask=mask)
            tl.store(out_ptr + rm[:, None] * (Q_HEADS * GROUP) + rows_b[None, :], cast(y_b, dtype, UPCAST), mask=mask)
        else:
            kv = group - Q_HEADS
            cache = k_cache_ptr
            if kv >= KV_HEADS:
                kv = kv - KV_HEADS
                cache = v_cache_ptr
            dest = cache + (kv * SLOTS + pos[:, None]) * GROUP
            tl.store(dest + offset[None, :], cast(y_a, dtype, UPCAST), mask=mask)
            tl.store(dest + HALF + offset[None, :], cast(y_b, dtype, UPCAST), mask=mask)
    else:
        y = acc_a / (1.0 + tl.exp(-acc_a)) * acc_b                             # silu(gate) · up
        tl.store(out_ptr + rm[:, None] * HALF + rows_a[None, :], cast(y, dtype, UPCAST), mask=mask)


@triton.jit
def _dual_rows(PER_GROUP, GROUP, HALF, BLOCK_N: tl.constexpr):
    """This program's weight rows in both dual kernels: group g = program // PER_GROUP, rows a = g·GROUP +
    p·BLOCK_N + i and b = a + HALF; ok masks offsets past HALF."""
    pid = tl.program_id(0)
    group = pid // PER_GROUP
    offset = (pid % PER_GROUP) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_a = group * GROUP + offset
    return group, offset, rows_a, rows_a + HALF, offset < HALF


@triton.jit(do_not_specialize=["M"])
def _dual_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, out_ptr, M, K, GROUP, HALF, PER_GROUP,
                 k_cache_ptr, v_cache_ptr, start_ptr, inv_freq_ptr, scaling, Q_HEADS, KV_HEADS, SLOTS,
                 ROPE: tl.constexpr, NF4: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WA: tl.constexpr = True,
                 FMA: tl.constexpr = False):
    """Rows a = g·GROUP + p·BLOCK_N + i and b = a + HALF of group g (a head, or the whole gate/up stack)."""
    group, offset, rows_a, rows_b, ok = _dual_rows(PER_GROUP, GROUP, HALF, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    if WA and not FMA:
        acc_a = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc_a = _accumulate(acc_a, x_ptr, w_ptr, absmax_ptr, code_ptr, rm, rows_a, ok, k0, M, K, NF4, UPCAST, BLOCK_K,
                            WA, 0, FMA, BLOCK_M)
        acc_b = _accumulate(acc_b, x_ptr, w_ptr, absmax_ptr, code_ptr, rm, rows_b, ok, k0, M, K, NF4, UPCAST, BLOCK_K,
                            WA, 0, FMA, BLOCK_M)
    if WA and not FMA:
        acc_a = tl.trans(acc_a)
        acc_b = tl.trans(acc_b)
    _dual_epilogue(acc_a, acc_b, rm, rm < M, offset, ok, rows_a, rows_b, group, x_ptr, out_ptr, k_cache_ptr,
                   v_cache_ptr, start_ptr, inv_freq_ptr, scaling, Q_HEADS, KV_HEADS, SLOTS, GROUP, HALF, ROPE, UPCAST)


@triton.jit
def _dual_rows_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, out_ptr, M, K, GROUP, HALF, PER_GROUP,
                      k_cache_ptr, v_cache_ptr, start_ptr, inv_freq_ptr, scaling, Q_HEADS, KV_HEADS, SLOTS,
                      ROPE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      LOOKUP: tl.constexpr, XPAIR: tl.constexpr):
    """`_dual_kernel` for an NF4 weight, one row of x per program (`nf4_rows.row_dot`), same epilogue."""
    group, offset, rows_a, rows_b, ok = _dual_rows(PER_GROUP, GROUP, HALF, BLOCK_N)
    row = tl.program_id(1)
    acc_a = row_dot(x_ptr, row, w_ptr, absmax_ptr, code_ptr, rows_a, ok, 0, K, K, BLOCK_N, BLOCK_K, LOOKUP, XPAIR)
    acc_b = row_dot(x_ptr, row, w_ptr, absmax_ptr, code_ptr, rows_b, ok, 0, K, K, BLOCK_N, BLOCK_K, LOOKUP, XPAIR)
    rm = row + tl.arange(0, 1)
    _dual_epilogue(acc_a[None, :], acc_b[None, :], rm, rm < M, offset, ok, rows_a, rows_b, group, x_ptr, out_ptr,
                   k_cache_ptr, v_cache_ptr, start_ptr, inv_freq_ptr, scaling, Q_HEADS, KV_HEADS, SLOTS, GROUP, HALF,
                   ROPE, UPCAST)


@triton.jit
def _dual_finish_kernel(part_ptr, x_ptr, out_ptr, M, N, GROUP, HALF, PER_GROUP,
                        k_cache_ptr, v_cache_ptr, start_ptr, inv_freq_ptr, scaling, Q_HEADS, KV_HEADS, SLOTS,
                        SPLITS: tl.constexpr, ROPE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                        PDL: tl.constexpr = 0):
    """`_dual_kernel`'s epilogue on float32 split partials [SPLITS, M, N] (nf4_cuda.py), one row per program,
    the partials added in split order."""
    wait_for_inputs(PDL)
    group, offset, rows_a, rows_b, ok = _dual_rows(PER_GROUP, GROUP, HALF, BLOCK_N)
    row = tl.program_id(1)
    acc_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc_a += tl.load(part_ptr + (s * M + row) * N + rows_a, mask=ok, other=0.0)
        acc_b += tl.load(part_ptr + (s * M + row) * N + rows_b, mask=ok, other=0.0)
    rm = row + tl.arange(0, 1)
    _dual_epilogue(acc_a[None, :], acc_b[None, :], rm, rm < M, offset, ok, rows_a, rows_b, group, x_ptr, out_ptr,
                   k_cache_ptr, v_cache_ptr, start_ptr, inv_freq_ptr, scaling, Q_HEADS, KV_HEADS, SLOTS, GROUP, HALF,
                   ROPE, UPCAST)


@triton.jit(do_not_specialize=["M"])
def _finish_kernel(part_ptr, res_ptr, hidden_ptr, norm_w_ptr, normed_ptr, M, N, eps,
                   SPLITS: tl.constexpr, BLOCK: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr = 0):
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    col = tl.arange(0, BLOCK)
    ok = col < N
    y = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        y += tl.load(part_ptr + (s * M + row) * N + col, mask=ok, other=0.0)
    y += tl.load(res_ptr + row * N + col, mask=ok, other=0.0).to(tl.float32)
    hidden = cast(y, hidden_ptr.dtype.element_ty, EMULATE)
    tl.store(hidden_ptr + row * N + col, hidden, mask=ok)
    h = hidden.to(tl.float32)
    tl.store(normed_ptr + row * N + col, cast(rms_normalize(h, norm_w_ptr, col, ok, N, eps),
                                              normed_ptr.dtype.element_ty, EMULATE), mask=ok)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Weight:
    """A linear layer's weight as the kernels read it: `dense` [N, K], or NF4 `packed` uint8 [N·K/2] with
    float32 `absmax` [N·K/64] (re-laid out by `nf4_cuda.tile_absmax` for the tensor-core kernel, or, with
    `scale_bytes` and double-quantized modules, bitsandbytes' scale bytes by `tile_scale_bytes` and `dq`) and
    `code` [16]. The split of K depends on (N, K) and the kernel only; the
    NF4 kernel (CUDA tensor cores for 16-bit inputs where NVRTC runs, else the Triton rows kernel) is
    chosen here, once."""

    n: int
    k: int
    dense: torch.Tensor | None = None
    packed: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    code: torch.Tensor | None = None
    nf4_kernel: str = "auto"        # "rows": nf4_rows.py even where nf4_cuda.py could run (float32 inputs)
    l2_ahead: int = 0               # ask L2 for the whole weight before waiting for x (`L2_AHEAD`); speed only
    nested: list | None = None      # the stacked modules' double-quantized scales (`nf4.Nested` each), if any
    scale_bytes: bool = False       # the NF4 CUDA kernel reads `nested` as bytes (also EVENTSPEC_NF4_CUDA=dq=1)

    def __post_init__(self):
        if self.packed is not None and self.k % NF4_BLOCK:
            raise ValueError(f"NF4 weights need K divisible by {NF4_BLOCK}; got K = {self.k}")
        self.tensor_cores = False           # NF4 on nf4_cuda.py's kernel
        self.dq = None                      # nf4_cuda.DoubleQuant: `absmax` holds the scale bytes, read as such
        # the scales' bytes as bitsandbytes stores them (a byte a block and a float32 per 256 where double-quantized)
        blocks = self.n * self.k // NF4_BLOCK
        if self.nf4 and self.nested and all(p is not None for p in self.nested):
            self.format_scale_bytes = blocks + 4 * sum(p.absmax2.numel() for p in self.nested)
        else:
            self.format_scale_bytes = 4 * blocks
        self.tile_major = False             # NF4 bytes re-laid out by nf4_cuda.tile_packed
        self.nf4_kernel_note = None         # why not, when an NF4 weight could not use it
        if self.nf4:
            self._choose_nf4_kernel()
        if self.tensor_cores:
            self.splits, per_split = nf4_cuda.splits_for(self.n, self.k)
            self.k_split = per_split * NF4_BLOCK
            return
        if self.nf4:        # the one-row kernels (nf4_rows.py): their own tiles and programs per row
            block_k, block_n, programs = ROWS_BLOCK_K, ROWS_BLOCK_N, ROWS_PROGRAMS
        else:
            block_k, block_n, programs = BLOCK_K, BLOCK_N, TARGET_PROGRAMS
        k_blocks = _cdiv(self.k, block_k)
        if self.nf4 or INTERPRET or self.dense.device.type != "cuda":
            splits = max(1, min(k_blocks, round(programs / _cdiv(self.n, block_n))))
        else:
            sms = torch.cuda.get_device_properties(self.dense.device).multi_processor_count
            splits = balanced_splits(_cdiv(self.n, block_n), k_blocks, sms)
        self.k_split = _cdiv(k_blocks, splits) * block_k
        self.splits = _cdiv(self.k, self.k_split)

    def _choose_nf4_kernel(self) -> None:
        if NF4_KERNEL == "triton" or self.nf4_kernel == "rows":
            self.nf4_kernel_note = "EVENTSPEC_NF4_KERNEL=triton" if NF4_KERNEL == "triton" else "asked for the rows kernel"
            return
        reason = "Triton's interpreter" if INTERPRET else nf4_cuda.unavailable_reason(self.packed.device)
        if reason is not None:
            if NF4_KERNEL == "cuda":
                raise RuntimeError(f"EVENTSPEC_NF4_KERNEL=cuda, but the NF4 CUDA kernel cannot run: {reason}")
            self.nf4_kernel_note = reason
            return
        self.tensor_cores = True
        self.pairs = {dtype: nf4_cuda.pair_table(self.code, dtype) for dtype in (torch.bfloat16, torch.float16)}
        # only the kernel's tiled layout is kept: bitsandbytes' double-quantized bytes where the kernel can read
        # them (`nf4_cuda.Config.dq`, `tile_scale_bytes`: a quarter of the float32 scales' bytes, the same
        # values), else the float32 absmax (`tile_absmax`); `absmax` then holds that
        config = nf4_cuda.CONFIG
        stacked = None
        if (config.dq or self.scale_bytes) and config.layout and not (config.persist or config.xring):
            stacked = nf4_cuda.double_quant(self.nested or [], self.k)
        if stacked is not None:
            q, self.dq = stacked
            self.absmax = nf4_cuda.tile_scale_bytes(q, self.n, self.k)
        else:
            self.absmax = nf4_cuda.tile_absmax(self.absmax, self.n, self.k)
        self.nested = None
        # and, where `nf4_cuda.Config.layout` says so (the default), the bytes tile-major (`tile_packed`): a
        # warp's load is 256 contiguous bytes. Whoever else reads them (transformers' prefill through
        # bitsandbytes) must then read the tile-major form: `exact._stack` re-points the modules
        self.tile_major = bool(nf4_cuda.CONFIG.layout)
        if self.tile_major:
            self.packed = nf4_cuda.tile_packed(self.packed, self.n, self.k)

    @property
    def nf4(self) -> bool:
        return self.packed is not None

    @property
    def kernel(self) -> str:
        """Which kernel family reads this weight: dense-mma, nf4-cuda or nf4-rows."""
        if not self.nf4:
            return "dense-mma"
        return "nf4-cuda" if self.tensor_cores else "nf4-rows"

    @property
    def split_dual(self) -> bool:
        """qkv and gate/up as split partials plus `_dual_finish_kernel`'s epilogue (NF4 on tensor cores, or a
        dense weight that splits K), else the fused `_dual_kernel`/`_dual_rows_kernel`."""
        return self.tensor_cores or (not self.nf4 and self.splits > 1 and DENSE_DUAL == "split")

    def partials(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 split partials [splits, M, N] of x @ W.T: the NF4 CUDA kernel, or the dense MMA tiles."""
        if out is None:
            out = torch.empty((self.splits, x.shape[0], self.n), dtype=torch.float32, device=x.device)
        if not self.nf4:
            _single(x, self, out, max(2, self.splits))
            return out
        if x.dtype not in self.pairs:
            raise ValueError(f"the NF4 CUDA kernel takes bf16 or fp16 inputs; got {x.dtype}")
        config = nf4_cuda.CONFIG
        if self.l2_ahead and config.layout and pdl_mode(x.device):
            config = replace(config, prefetch=self.l2_ahead)
        return nf4_cuda.partials(x, self.packed, self.absmax, self.pairs[x.dtype], self.n, self.k, out, config=config,
                                 dq=self.dq)

    def pointers(self, x: torch.Tensor):
        if self.nf4:
            return self.packed, self.absmax, self.code
        return self.dense, x, x          # unused pointers

    def dense_rows(self, row0: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows row0 .. row0 + rows - 1 as a dense weight of `dtype` (a tile-major NF4 weight; prefill)."""
        from .nf4_dequant import dequantize_tiled
        if self.dq is None:
            return dequantize_tiled(self.packed, self.absmax, self.code, row0, rows, self.k, dtype)
        t0, t1 = row0 // 16, -(-(row0 + rows) // 16)        # the float32 scales of these rows' tiles only
        scales = self.dq.expand_tiles(self.absmax, self.k, t0, t1)
        return dequantize_tiled(self.packed[t0:t1], scales, self.code, row0 - 16 * t0, rows, self.k, dtype)

    def format_bytes(self) -> int:
        """The weight's bytes as its format stores them (NF4: bitsandbytes' codes and scales, which the
        kernel may read in another form): the floor's bytes for the format, whatever the kernel reads."""
        if self.nf4:
            return self.n * self.k // 2 + self.format_scale_bytes
        return self.dense.numel() * self.dense.element_size()

    def bytes_read(self) -> int:
        if self.nf4:        # the weight's own bytes (a tile-major copy's padding rows are not the weight's)
            if self.dq is not None:         # the scale bytes, and the second level a program reads
                return (self.n * self.k // 2 + self.absmax.numel()
                        + 4 * (self.dq.absmax2.numel() + self.dq.tile_offset.numel() + self.dq.code2.numel()))
            return self.n * self.k // 2 + 4 * self.absmax.numel()
        return self.dense.numel() * self.dense.element_size()


def _check(x: torch.Tensor, weight: Weight) -> None:
    if x.dim() != 2 or x.shape[1] != weight.k or not x.is_contiguous():
        raise ValueError(f"expected a contiguous [M, {weight.k}] input; got {tuple(x.shape)}")


def _upcast(x: torch.Tensor) -> bool:
    return INTERPRET or x.dtype == torch.float32


def _single(x: torch.Tensor, weight: Weight, out: torch.Tensor, splits: int) -> None:
    """`x @ W.T` into out [M, N] (splits == 1) or float32 partials [splits, M, N]: NF4 weights on tensor
    cores (nf4_cuda.py, always partials of the weight's own split) or one row of x per program
    (nf4_rows.py), dense weights by the MMA tiles."""
    m = x.shape[0]
    if weight.tensor_cores:
        weight.partials(x, out)             # always partials [splits, M, N]: the callers add them
    elif weight.nf4:
        grid = (_cdiv(weight.n, ROWS_BLOCK_N), weight.splits, m)
        _rows_kernel[grid](x, *weight.pointers(x), out, m, weight.n, weight.k, weight.k_split, SPLITS=splits,
                           BLOCK_N=ROWS_BLOCK_N, BLOCK_K=ROWS_BLOCK_K, LOOKUP=ROWS_LOOKUP, EMULATE=INTERPRET,
                           XPAIR=_xpair(x), num_warps=ROWS_WARPS)
    else:
        grid = (_cdiv(weight.n, BLOCK_N), weight.splits, _cdiv(m, BLOCK_M))
        pdl = pdl_mode(x.device)
        _single_kernel[grid](x, *weight.pointers(x), out, m, weight.n, weight.k, weight.k_split, SPLITS=splits,
                             NF4=False, UPCAST=_upcast(x), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                             PDL=pdl, PREFETCH=_dense_prefetch(weight, pdl), num_warps=4, num_stages=STAGES,
                             launch_pdl=pdl > 0)


def _dense_prefetch(weight: Weight, pdl: int) -> int:
    """K tiles of its rows a dense program asks L2 for before it waits: its whole split for an `l2_ahead` weight
    under PDL (a power of two: the kernel's arange), else EVENTSPEC_DENSE_PREFETCH's."""
    if weight.l2_ahead and pdl:
        tiles = weight.k_split // BLOCK_K
        return 1 << (tiles.bit_length() - 1) if tiles > 0 else 0
    return DENSE_PREFETCH


def _xpair(x: torch.Tensor) -> bool:
    # 16-bit x is read as 32-bit pairs of columns (nf4_rows._load_tile)
    return x.element_size() == 2


def linear(x: torch.Tensor, weight: Weight, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`x` [M, K] → [M, N] (split partials summed by `linear_residual_norm` when the weight splits K)."""
    _check(x, weight)
    m = x.shape[0]
    if weight.tensor_cores:            # not on the step's path (the head is dense); splits added in order
        part = weight.partials(x)
        total = part[0].clone()
        for s in range(1, weight.splits):
            total += part[s]
        return total.to(out_dtype or x.dtype)
    if weight.splits == 1:
        out = torch.empty((m, weight.n), dtype=out_dtype or x.dtype, device=x.device)
    else:
        out = torch.empty((weight.splits, m, weight.n), dtype=torch.float32, device=x.device)
    _single(x, weight, out, weight.splits)
    if weight.splits == 1:
        return out
    return out.sum(0).to(out_dtype or x.dtype)      # not on the step's path: see linear_residual_norm


def linear_residual_norm(x: torch.Tensor, weight: Weight, residual: torch.Tensor, norm_weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden = residual + x @ W.T; returns (hidden, rmsnorm(hidden) · norm_weight)."""
    _check(x, weight)
    m, n = x.shape[0], weight.n
    part = torch.empty((weight.splits, m, n), dtype=torch.float32, device=x.device)
    # SPLITS=2 forces the partial store even for an unsplit weight (the finish kernel adds the residual)
    _single(x, weight, part, max(2, weight.splits))
    hidden = torch.empty((m, n), dtype=residual.dtype, device=x.device)
    normed = torch.empty_like(hidden)
    pdl = pdl_mode(x.device)
    _finish_kernel[(m,)](part, residual, hidden, norm_weight, normed, m, n, eps, SPLITS=weight.splits,
                         BLOCK=triton.next_power_of_2(n), EMULATE=INTERPRET, PDL=pdl, num_warps=8, launch_pdl=pdl > 0)
    return hidden, normed


def _dual_from_partials(x: torch.Tensor, weight: Weight, out: torch.Tensor, group: int, half: int, groups: int,
                        rope_args: tuple, *, rope: bool) -> None:
    """The split path of both dual matmuls (`Weight.split_dual`): partials, then `_dual_finish_kernel`'s epilogue
    over `groups` row groups of `group` rows (rows a < half, rows b = a + half); `rope_args` are the cache,
    position, frequency and head arguments (placeholders for gate/up)."""
    block = min(256, triton.next_power_of_2(half))
    per_group = _cdiv(half, block)
    pdl = pdl_mode(x.device)
    _dual_finish_kernel[(groups * per_group, x.shape[0])](
        weight.partials(x), x, out, x.shape[0], weight.n, group, half, per_group, *rope_args,
        SPLITS=weight.splits, ROPE=rope, UPCAST=_upcast(x), BLOCK_N=block, PDL=pdl, num_warps=4, launch_pdl=pdl > 0)


def gate_up_silu(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """`weight` stacks gate [I, K] over up [I, K]; returns silu(x @ gate.T) · (x @ up.T), [M, I]."""
    _check(x, weight)
    m, half = x.shape[0], weight.n // 2
    out = torch.empty((m, half), dtype=x.dtype, device=x.device)
    if weight.split_dual:
        _dual_from_partials(x, weight, out, weight.n, half, 1, (out, out, out, out, 1.0, 0, 0, 0), rope=False)
        return out
    if weight.nf4:
        per_group = _cdiv(half, ROWS_DUAL_N)
        _dual_rows_kernel[(per_group, m)](
            x, *weight.pointers(x), out, m, weight.k, weight.n, half, per_group,
            out, out, out, out, 1.0, 0, 0, 0, ROPE=False, UPCAST=_upcast(x), BLOCK_N=ROWS_DUAL_N,
            BLOCK_K=ROWS_BLOCK_K, LOOKUP=ROWS_LOOKUP, XPAIR=_xpair(x), num_warps=ROWS_WARPS)
        return out
    per_group = _cdiv(half, DUAL_N)
    _dual_kernel[(per_group, _cdiv(m, BLOCK_M))](
        x, *weight.pointers(x), out, m, weight.k, weight.n, half, per_group,
        out, out, out, out, 1.0, 0, 0, 0,
        ROPE=False, NF4=weight.nf4, UPCAST=_upcast(x),
        BLOCK_M=BLOCK_M, BLOCK_N=DUAL_N, BLOCK_K=BLOCK_K, num_warps=4, num_stages=STAGES)
    return out


def qkv_rope_store(x: torch.Tensor, weight: Weight, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor,
                   inv_freq: torch.Tensor, scaling: float, heads: int) -> torch.Tensor:
    """`weight` stacks q [H·D, K], k [KVH·D, K], v [KVH·D, K]. Rotates q and k at positions start + row,
    writes k and v into the cache slots of those positions ([KVH, SLOTS, D] each); returns q [M, H·D]."""
    _check(x, weight)
    m = x.shape[0]
    kv_heads, slots, d = keys.shape
    if weight.n != (heads + 2 * kv_heads) * d:
        raise ValueError(f"a qkv weight of {weight.n} rows does not fit {heads}+2·{kv_heads} heads of {d}")
    q = torch.empty((m, heads * d), dtype=x.dtype, device=x.device)
    if weight.split_dual:
        _dual_from_partials(x, weight, q, d, d // 2, heads + 2 * kv_heads,
                            (keys, values, start, inv_freq, float(scaling), heads, kv_heads, slots), rope=True)
        return q
    if weight.nf4:
        per_group = _cdiv(d // 2, ROWS_DUAL_N)
        _dual_rows_kernel[((heads + 2 * kv_heads) * per_group, m)](
            x, *weight.pointers(x), q, m, weight.k, d, d // 2, per_group,
            keys, values, start, inv_freq, float(scaling), heads, kv_heads, slots,
            ROPE=True, UPCAST=_upcast(x), BLOCK_N=ROWS_DUAL_N, BLOCK_K=ROWS_BLOCK_K, LOOKUP=ROWS_LOOKUP,
            XPAIR=_xpair(x), num_warps=ROWS_WARPS)
        return q
    per_group = _cdiv(d // 2, DUAL_N)
    _dual_kernel[((heads + 2 * kv_heads) * per_group, _cdiv(m, BLOCK_M))](
        x, *weight.pointers(x), q, m, weight.k, d, d // 2, per_group,
        keys, values, start, inv_freq, float(scaling), heads, kv_heads, slots,
        ROPE=True, NF4=weight.nf4, UPCAST=_upcast(x),
        BLOCK_M=BLOCK_M, BLOCK_N=DUAL_N, BLOCK_K=BLOCK_K, num_warps=4, num_stages=STAGES)
    return q
