"""Row-count-invariant skinny matmul `y = x @ W.T` for decode and verification steps (1–33 rows), from a
16-bit weight or a bitsandbytes NF4 weight dequantized in registers.

Why invariant: the row tile (`BLOCK_M` = 16, the smallest MMA tile), column tile, K tile, split-K count and
the order in which the split partial sums are added are functions of the weight's shape alone; the row
count is a runtime argument that only masks loads and stores (`do_not_specialize`, so M = 1 compiles the
same kernel as M = 9). An MMA computes each output row from its own input row, so a row's arithmetic is the
same whatever rows run beside it. No atomics: split partials go to a workspace and `_finish` adds them in
split order, then applies the epilogue (cast, + residual, or silu(gate) · up).

NF4 (bitsandbytes' format, what users load): the weight `[N, K]` flattened row-major, blocks of 64
consecutive values, two 4-bit codes per byte (the first value in the high nibble); value = code[q] ·
absmax[block] in float32, rounded to the compute dtype — bitsandbytes' own dequantization. The double-
quantized absmax is expanded to float32 once at load (`nf4.unpack_bnb`), +1/16 byte per weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .common import cast

BLOCK_M = 16
BLOCK_N = 64
BLOCK_K = 128
NF4_BLOCK = 64
TARGET_PROGRAMS = 256          # enough CTAs to keep every SM of an H200 (132) streaming weights
FINISH_BLOCK = 1024

EPILOGUES = {"none": 0, "residual": 1, "silu_mul": 2}


@triton.jit(do_not_specialize=["M"])
def _partial_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, part_ptr, M, N, K, K_SPLIT,
                    NF4: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rm < M
    col_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_s * K_SPLIT
    for k0 in range(k_begin, k_begin + K_SPLIT, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if NF4:
            rk2 = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + rn[:, None] * (K // 2) + rk2[None, :],
                             mask=col_ok[:, None] & (rk2 < K // 2)[None, :], other=0).to(tl.int32)
            high = tl.load(code_ptr + (packed >> 4))
            low = tl.load(code_ptr + (packed & 15))
            values = tl.reshape(tl.join(high, low), (BLOCK_N, BLOCK_K))
            rb = k0 // 64 + tl.arange(0, BLOCK_K // 64)
            scale = tl.load(absmax_ptr + rn[:, None] * (K // 64) + rb[None, :],
                            mask=col_ok[:, None] & (rb < K // 64)[None, :], other=0.0)
            values = tl.reshape(tl.reshape(values, (BLOCK_N, BLOCK_K // 64, 64)) * scale[:, :, None],
                                (BLOCK_N, BLOCK_K))
            w = cast(values, x_ptr.dtype.element_ty, UPCAST)
        else:
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    tl.store(part_ptr + pid_s * M * N + rm[:, None] * N + rn[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["M"])
def _finish_kernel(part_ptr, out_ptr, res_ptr, M, N, N_OUT,
                   SPLITS: tl.constexpr, EPILOGUE: tl.constexpr, BLOCK: tl.constexpr, EMULATE: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < M * N_OUT
    row = idx // N_OUT
    col = idx % N_OUT
    y = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        y += tl.load(part_ptr + s * M * N + row * N + col, mask=ok, other=0.0)
    if EPILOGUE == 1:
        y += tl.load(res_ptr + row * N_OUT + col, mask=ok, other=0.0).to(tl.float32)
    if EPILOGUE == 2:
        up = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            up += tl.load(part_ptr + s * M * N + row * N + N_OUT + col, mask=ok, other=0.0)
        y = y / (1.0 + tl.exp(-y)) * up
    tl.store(out_ptr + row * N_OUT + col, cast(y, out_ptr.dtype.element_ty, EMULATE), mask=ok)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Weight:
    """A linear layer's weight as the kernel reads it. `dense` [N, K], or NF4 `packed` uint8 [N·K/2] with
    float32 `absmax` [N·K/64] and `code` [16]. The split of K depends on (N, K) only."""

    n: int
    k: int
    dense: torch.Tensor | None = None
    packed: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    code: torch.Tensor | None = None

    def __post_init__(self):
        if self.packed is not None and self.k % NF4_BLOCK:
            raise ValueError(f"NF4 weights need K divisible by {NF4_BLOCK}; got K = {self.k}")
        k_blocks = _cdiv(self.k, BLOCK_K)
        splits = max(1, min(k_blocks, round(TARGET_PROGRAMS / _cdiv(self.n, BLOCK_N))))
        self.k_split = _cdiv(k_blocks, splits) * BLOCK_K
        self.splits = _cdiv(self.k, self.k_split)

    @property
    def nf4(self) -> bool:
        return self.packed is not None

    def bytes_read(self) -> int:
        if self.nf4:
            return self.packed.numel() + 4 * self.absmax.numel()
        return self.dense.numel() * self.dense.element_size()


def linear(x: torch.Tensor, weight: Weight, *, epilogue: str = "none", residual: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`x` [M, K] contiguous → [M, N] (or [M, N/2] for silu_mul, whose weight stacks gate over up)."""
    if x.dim() != 2 or x.shape[1] != weight.k or not x.is_contiguous():
        raise ValueError(f"linear expects a contiguous [M, {weight.k}] input; got {tuple(x.shape)}")
    m, n = x.shape[0], weight.n
    n_out = n // 2 if epilogue == "silu_mul" else n
    part = torch.empty((weight.splits, m, n), dtype=torch.float32, device=x.device)
    if weight.nf4:
        w, absmax, code = weight.packed, weight.absmax, weight.code
    else:
        w, absmax, code = weight.dense, x, x          # unused pointers
    grid = (_cdiv(n, BLOCK_N), weight.splits, _cdiv(m, BLOCK_M))
    _partial_kernel[grid](x, w, absmax, code, part, m, n, weight.k, weight.k_split,
                          NF4=weight.nf4, UPCAST=INTERPRET or x.dtype == torch.float32,
                          BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4, num_stages=4)
    out = torch.empty((m, n_out), dtype=out_dtype or x.dtype, device=x.device)
    if epilogue == "residual" and (residual is None or residual.shape != out.shape):
        raise ValueError(f"the residual must be [{m}, {n_out}]")
    res = residual if residual is not None else out
    _finish_kernel[(_cdiv(m * n_out, FINISH_BLOCK),)](part, out, res, m, n, n_out, SPLITS=weight.splits,
                                                      EPILOGUE=EPILOGUES[epilogue], BLOCK=FINISH_BLOCK,
                                                      EMULATE=INTERPRET)
    return out
