"""Helpers shared by the kernels (imports Triton)."""
import os

import triton
import triton.language as tl


@triton.jit
def cast(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """x.to(dtype), rounding to nearest even. Triton's interpreter truncates float32 → bfloat16, so there
    (EMULATE) the rounding is done on the bits; the GPU's own conversion gives the same result."""
    if EMULATE and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def rms_normalize(h, w_ptr, col, ok, n, eps):
    """RMSNorm of one row in float32: h · 1/sqrt(mean(h²) + eps) · w (h is zero past n). The exact step's
    first norm (`elementwise.py`) and every later one (`linear._finish_kernel`) share this arithmetic."""
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / n + eps)
    w = tl.load(w_ptr + col, mask=ok, other=0.0).to(tl.float32)
    return h * rstd * w


_EMULATED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def dot_f32(a, b):
    """a @ b for float32 operands with float32 sums. On the GPU `tl.dot` (IEEE); under the interpreter a
    broadcast product summed over K, because the interpreter's `tl.dot` is numpy's BLAS matmul, whose result
    for a row depends on the row's position in the tile (OpenBLAS 0.3.31 micro-kernels), which would break
    the very property the CPU tests check."""
    if _EMULATED:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """At a kernel's entry when it is launched with programmatic dependent launch (`kernels.pdl_mode`: PDL 1
    or 2): wait until the kernel ahead of it has finished and its writes are visible, and let the next kernel
    be scheduled, after the wait (1) or before it (2). Before this call a kernel reads nothing a kernel of
    the step writes and writes nothing."""
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL > 0:
        tl.extra.cuda.gdc_wait()
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines holding `ptrs` (a hint: nothing reaches registers, nothing is waited
    for). GPU only: Triton's interpreter runs no inline assembly."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
