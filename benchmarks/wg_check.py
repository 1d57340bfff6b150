"""`nf4_cuda.Config.wg` (warpgroup MMAs) on one GPU: the relative error of its partials against the float64
reference per variant (descriptor strides as built and swapped, two 8-row groups as two MMAs or one), 1 and 9
rows, so a wrong shared-memory layout shows which part is wrong; prints one JSON line per variant.

    python benchmarks/wg_check.py --configs "wg=1;wg=1,wswap=1;wg=1,wn16=1"
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.engine import nf4  # noqa: E402
from workers.engine.kernels import nf4_cuda  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="wg=1;wg=1,wswap=1;wg=1,wn16=1")
    parser.add_argument("--shape", default="256,4096")
    args = parser.parse_args(argv)
    n, k = (int(v) for v in args.shape.split(","))
    gen = torch.Generator().manual_seed(11)
    packed, absmax = nf4.quantize(torch.randn(n, k, generator=gen))
    code = nf4.code_tensor("cuda")
    weight, tiles = nf4_cuda.tile_packed(packed.cuda(), n, k), nf4_cuda.tile_absmax(absmax.cuda(), n, k)
    pairs = nf4_cuda.pair_table(code, torch.bfloat16)
    q = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1).long()
    w = (code.cpu().to(torch.bfloat16).double()[q].reshape(-1, 64) * absmax.double()[:, None]).reshape(n, k)
    x = torch.randn(16, k, generator=gen).to(torch.bfloat16)
    for text in args.configs.split(";"):
        config = nf4_cuda.parse_config(text)
        splits, per = nf4_cuda.splits_for(n, k, config=config)
        for rows in (1, 9, 16):
            ref = x[:rows].double() @ w.T
            try:
                out = torch.full((splits, rows, n), float("nan"), device="cuda")
                nf4_cuda.partials(x[:rows].cuda(), weight, tiles, pairs, n, k, out, per, config)
                torch.cuda.synchronize()
                got = out.sum(0).cpu().double()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                rows_err = ((got - ref).abs().amax(1) / ref.abs().max()).tolist()
                print(json.dumps(dict(config=text, rows=rows, rel_err=err, per_row=[f"{e:.1e}" for e in rows_err])), flush=True)
            except Exception as exc:  # noqa: BLE001 - a variant that fails is reported, the others still run
                print(json.dumps(dict(config=text, rows=rows, error=f"{type(exc).__name__}: {exc}"[:400])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
