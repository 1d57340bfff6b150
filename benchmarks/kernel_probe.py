"""Kernel probes on one GPU: read bandwidth of the skinny-matmul kernel over tile configurations and NF4
dequantization variants (`PROBE` switches that remove the codebook lookup or the absmax, timing only).

    python benchmarks/kernel_probe.py > probe.json

Shapes: LLaMA-7B qkv (12288×4096), down (4096×11008), 1 and 17 rows. Times from triton.testing.do_bench
(median, ms); GB/s = weight bytes / time.
"""
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.engine import nf4  # noqa: E402
from workers.engine.kernels import linear as L  # noqa: E402


def run(weight, x, block_m, block_n, block_k, warps, stages, splits, probe=0, wa=True, fma=False):
    n, k = weight.n, weight.k
    k_blocks = -(-k // block_k)
    k_split = -(-k_blocks // splits) * block_k
    splits = -(-k // k_split)
    out = torch.empty((max(2, splits), x.shape[0], n), dtype=torch.float32, device="cuda")
    grid = (-(-n // block_n), splits, -(-x.shape[0] // block_m))

    def call():
        L._single_kernel[grid](x, *weight.pointers(x), out, x.shape[0], n, k, k_split, SPLITS=max(2, splits),
                               NF4=weight.nf4, UPCAST=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                               num_warps=warps, num_stages=stages, PROBE=probe, WA=wa, FMA=fma)
    ms = triton.testing.do_bench(call, warmup=5, rep=25)
    return ms, weight.bytes_read() / ms / 1e6


def main():
    results = []
    for n, k in ((12288, 4096), (4096, 11008)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64
        dense = L.Weight(n, k, dense=w)
        packed, absmax = nf4.quantize(w.float())
        q = L.Weight(n, k, packed=packed, absmax=absmax, code=nf4.code_tensor("cuda"))
        for rows in (1, 9, 17):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            grid = [("bf16", dense, c) for c in itertools.product((True,), (16,), (16, 32, 64), (128, 256, 512), (4, 8), (3,), (1, 2, 4))]
            grid += [("nf4", q, c) for c in itertools.product((True,), (16,), (16, 32, 64), (128, 256, 512), (4, 8), (2,), (1, 2, 4))]
            for kind, weight, (fma, bm, bn, bk, warps, stages, splits) in grid:
                if bn * bk > 64 * 256:
                    continue
                try:
                    ms, gbs = run(weight, x, bm, bn, bk, warps, stages, splits, 0, True, fma)
                except Exception as exc:  # noqa: BLE001
                    ms, gbs = None, str(exc)[:80]
                results.append(dict(kind=kind, fma=fma, n=n, k=k, rows=rows, bm=bm, bn=bn, bk=bk, warps=warps,
                                    stages=stages, splits=splits, ms=ms, gbs=gbs))
    copy_src = torch.empty(1 << 30, dtype=torch.uint16, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    ms = triton.testing.do_bench(lambda: copy_dst.copy_(copy_src))
    print(json.dumps({"copy_gbs": 4 * (1 << 30) / ms / 1e6, "results": results}))


if __name__ == "__main__":
    main()
