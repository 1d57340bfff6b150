"""The bitsandbytes NF4 format as eventspec's kernels read it, without needing bitsandbytes on the CPU.

bitsandbytes stores a 4-bit weight `[N, K]` as uint8 `[N·K/2, 1]`: the weight flattened row-major, cut in
blocks of 64 values, each value the index of the nearest of 16 NormalFloat levels (`CODE`) after dividing
by the block's absmax, two indices per byte with the first value in the high nibble. With double
quantization the absmax values are themselves 8-bit codes: absmax = code2[q] · absmax2[i // 256] + offset.
`unpack_bnb` reads a Params4bit into (packed, float32 absmax, code); `quantize` writes the same format from
a dense tensor (tests on the CPU); `dequantize` is the reference the kernels are checked against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 64

# The 16 NF4 levels (quantiles of a standard normal, normalised to [-1, 1]), as bitsandbytes defines them.
CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def code_tensor(device) -> torch.Tensor:
    return torch.tensor(CODE, dtype=torch.float32, device=device)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [N, K] (K % 64 == 0) → (packed uint8 [N·K/2], float32 absmax [N·K/64]); nearest level."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"NF4 needs K divisible by {BLOCK}; got {k}")
    blocks = weight.detach().float().reshape(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    scaled = (blocks / absmax[:, None]).reshape(-1)
    levels = code_tensor(weight.device)
    q = (scaled[:, None] - levels[None, :]).abs().argmin(dim=1).to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    return packed.contiguous(), absmax.contiguous()


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' dequantization: code[q] · absmax in float32, rounded to `dtype`."""
    flat = packed.reshape(-1)
    q = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1).long()
    values = code_tensor(flat.device)[q].reshape(-1, BLOCK) * absmax.float()[:, None]
    return values.reshape(n, k).to(dtype)


def unpack_bnb(param) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bitsandbytes Params4bit (nf4, blocksize 64, double quant or not) → (packed, absmax fp32, code)."""
    state = param.quant_state
    if getattr(state, "quant_type", "nf4") != "nf4" or int(state.blocksize) != BLOCK:
        raise ValueError(f"only NF4 with block size {BLOCK} is supported; got {state.quant_type}/{state.blocksize}")
    nested = nested_absmax(param)
    absmax = state.absmax if nested is None else nested.expand()
    return param.data.reshape(-1).contiguous(), absmax.float().contiguous(), state.code.float().contiguous()


@dataclass
class Nested:
    """A double-quantized absmax as bitsandbytes keeps it: absmax[i] = code2[q[i]] · absmax2[i // group] +
    offset (float32, the product rounded before the sum; `unpack_bnb` expands it so)."""

    q: torch.Tensor              # uint8 [blocks]
    absmax2: torch.Tensor        # float32 [ceil(blocks / group)]
    code2: torch.Tensor          # float32 [256]
    offset: float
    group: int

    def expand(self) -> torch.Tensor:
        """The float32 absmax [blocks] (what `unpack_bnb` returns)."""
        scales = self.absmax2.repeat_interleave(self.group)[: self.q.numel()]
        return self.code2[self.q.long()] * scales + self.offset


def nested_absmax(param) -> Nested | None:
    """The double-quantized absmax of a bitsandbytes NF4 Params4bit, or None when it is not double-quantized."""
    state = param.quant_state
    if not getattr(state, "nested", False):
        return None
    nested = state.state2
    offset = state.offset
    offset = float(offset.item() if torch.is_tensor(offset) else offset)
    return Nested(state.absmax.reshape(-1).contiguous(), nested.absmax.float().reshape(-1).contiguous(),
                  nested.code.float().reshape(-1).contiguous(), offset, int(nested.blocksize))
