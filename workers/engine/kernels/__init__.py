"""Triton kernels of the exact step (`workers.engine.exact`): every kernel computes a row with the same
tiles, the same split of the reduction and the same summation order whatever the number of rows beside it,
so a position's logits are bit-identical in a decode step and in a verification of k drafts.

Owns the kernels only; which weights they read and in what order the layer runs them is `exact.py`'s.
On the CPU they run under Triton's interpreter (`TRITON_INTERPRET=1`), which is how the tests check them;
there `tl.dot` on 16-bit inputs is broken (triton 3.9), so the interpreter path up-casts both operands to
float32 first (the products of 16-bit values are exact in float32, the sums are float32 either way).
"""
from __future__ import annotations

import functools
import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PDL = os.environ.get("EVENTSPEC_PDL", "1")
if PDL not in ("0", "1"):
    raise ValueError(f"EVENTSPEC_PDL must be 0 or 1; got {PDL!r}")
# When a Triton kernel launched with PDL lets the next kernel be scheduled: "after" its wait for the kernel ahead
# (the next one becomes resident once this one's inputs are ready), or "early", before it (the next one may be
# resident, and prefetch what no kernel of the step writes, while the kernel ahead of this one still runs)
PDL_TRIGGER = os.environ.get("EVENTSPEC_PDL_TRIGGER", "after")
if PDL_TRIGGER not in ("after", "early"):
    raise ValueError(f"EVENTSPEC_PDL_TRIGGER must be after or early; got {PDL_TRIGGER!r}")


def env_settings() -> dict:
    """The EVENTSPEC_* variables set in this process (kernel shapes, PDL, spinning), sorted by name: what a
    measurement reports beside its numbers."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("EVENTSPEC_")}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no kernels
        return False
    return True


def usable_on(device) -> bool:
    """Kernels run on CUDA devices, and on the CPU only under the interpreter."""
    if not triton_available():
        return False
    kind = getattr(device, "type", str(device).split(":")[0])
    return kind == "cuda" or (kind == "cpu" and INTERPRET)



@functools.lru_cache(maxsize=None)
def _pdl_on(kind: str, index) -> bool:
    if PDL != "1" or INTERPRET or kind != "cuda":
        return False
    import torch
    try:
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_on(device) -> bool:
    """Whether the step's kernels launch with programmatic dependent launch on `device` (compute capability
    9.0 or newer, unless EVENTSPEC_PDL=0): a kernel may then be resident before the one ahead of it ends.
    The Triton kernels wait at their entry (`common.wait_for_inputs`) until that one's writes are visible;
    the NF4 CUDA kernel first fills its lookup table, which no kernel of the step writes
    (`nf4_cuda.wait_inputs`; ptxas puts the wait ahead of its first weight loads, `nf4_cuda.Config.early`).
    No arithmetic changes, only the gap between launches: on an
    H200 the nf4 draft's decode step 2.61 → 2.45 ms, the bf16 target's 1–2 %, rows bit-identical and a
    forced-drafting bench lossless (BENCHMARKS.md, seventh session)."""
    return _pdl_on(device.type, device.index)


def pdl_mode(device) -> int:
    """The Triton kernels' `PDL` argument on `device` (`common.wait_for_inputs`): 0 launched plainly, 1 with
    programmatic dependent launch, letting the next kernel be scheduled after the wait for the kernel ahead,
    2 before it (EVENTSPEC_PDL_TRIGGER=early)."""
    if not pdl_on(device):
        return 0
    return 2 if PDL_TRIGGER == "early" else 1
