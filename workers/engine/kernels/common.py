"""Helpers shared by the kernels (imports Triton)."""
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
