"""Tile-major NF4 bytes (`nf4_cuda.tile_packed`) back to a dense 16-bit weight, for the paths that still
multiply whole weights: transformers' prefill (and `hf-generate`) once the exact step has laid a model's NF4
bytes out tile-major. A value is rounded as bitsandbytes rounds it: code[q] · absmax in float32, then to
16 bits; so the prefill reads the weights bitsandbytes' own dequantization gives (the GPU test checks it).

A program writes a block of rows × one 64-column NF4 block: 32 bytes a row, high nibble first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .common import cast

BLOCK_ROWS = 32


@triton.jit
def _dequant_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, row0, rows, K, KB, BLOCK_ROWS: tl.constexpr,
                    INTERPRET: tl.constexpr):
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    b = tl.program_id(1)
    ok = r < rows
    n = row0 + r
    tile, in_tile = n // 16, n % 16
    j = tl.arange(0, 32)
    base = ((tile * KB + b) * 16 + in_tile) * 32                       # the row's 32 bytes of block b
    byte = tl.load(packed_ptr + base[:, None] + j[None, :], mask=ok[:, None], other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + ((tile * KB + b) * 8 + in_tile % 8) * 2 + in_tile // 8, mask=ok, other=0.0)
    high = tl.load(code_ptr + (byte >> 4)) * scale[:, None]
    low = tl.load(code_ptr + (byte & 15)) * scale[:, None]
    values = tl.interleave(high, low)                                 # columns 2j, 2j + 1: one 64-value row
    col = b * 64 + tl.arange(0, 64)
    dst = out_ptr + r[:, None].to(tl.int64) * K + col[None, :]
    tl.store(dst, cast(values, out_ptr.dtype.element_ty, INTERPRET), mask=ok[:, None])


def dequantize_tiled(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, row0: int, rows: int,
                     k: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows row0 .. row0 + rows - 1 of a tile-major NF4 weight (`absmax` from `nf4_cuda.tile_absmax`, `code`
    the 16 float32 levels) as a dense [rows, k] tensor of `dtype`."""
    kb = k // 64
    if packed.dim() != 4 or packed.shape[1:] != (kb, 16, 32) or absmax.shape != (packed.shape[0], kb, 8, 2):
        raise ValueError(f"expected tile-major bytes [T, {kb}, 16, 32] and absmax [T, {kb}, 8, 2]; got "
                         f"{tuple(packed.shape)} and {tuple(absmax.shape)}")
    if row0 < 0 or row0 + rows > packed.shape[0] * 16:
        raise ValueError(f"rows {row0}..{row0 + rows} outside the weight's {packed.shape[0] * 16}")
    out = torch.empty((rows, k), dtype=dtype, device=packed.device)
    grid = (triton.cdiv(rows, BLOCK_ROWS), kb)
    _dequant_kernel[grid](packed, absmax, code.float().contiguous(), out, row0, rows, k, kb, BLOCK_ROWS=BLOCK_ROWS,
                          INTERPRET=INTERPRET)
    return out
