"""RMSNorm of the exact step's first layer input (the others are fused into `linear._finish_kernel`).
Each program owns one row, so a row's result never depends on the rows beside it."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, pdl_mode
from .common import cast, rms_normalize, wait_for_inputs


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, K, eps, BLOCK: tl.constexpr, EMULATE: tl.constexpr,
                    PDL: tl.constexpr = 0):
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    rk = tl.arange(0, BLOCK)
    ok = rk < K
    x = tl.load(x_ptr + row * K + rk, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * K + rk, cast(rms_normalize(x, w_ptr, rk, ok, K, eps), out_ptr.dtype.element_ty, EMULATE),
             mask=ok)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    m, k = x.shape
    out = torch.empty_like(x)
    pdl = pdl_mode(x.device)
    _rmsnorm_kernel[(m,)](x, weight, out, k, eps, BLOCK=triton.next_power_of_2(k), EMULATE=INTERPRET, PDL=pdl,
                          launch_pdl=pdl > 0)
    return out

