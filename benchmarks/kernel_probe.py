"""Kernel probes on one GPU: read bandwidth of the skinny-matmul kernel (workers/engine/kernels/linear.py)
over tile configurations, for the three sweeps BENCHMARKS.md quotes:

    python benchmarks/kernel_probe.py --sweep mma > mma.json         # the tiles of the step (weight = MMA A operand)
    python benchmarks/kernel_probe.py --sweep nf4-probes > nf4.json  # NF4 without the codebook lookup / the absmax
    python benchmarks/kernel_probe.py --sweep fma > fma.json         # float32 FMAs instead of MMAs
    python benchmarks/kernel_probe.py --sweep nf4-rows > rows.json   # NF4 one row per program (kernels/nf4_rows.py)
    python benchmarks/kernel_probe.py --sweep nf4-cuda > cuda.json   # NF4 on tensor cores (kernels/nf4_cuda.py)
    python benchmarks/kernel_probe.py --sweep nf4-cuda --rows 1 --configs "probe=1;depth=4,minb=3"
                                                                     # chosen nf4_cuda.Config changes only

Shapes: LLaMA-7B qkv (12288×4096) and down_proj (4096×11008). Times from triton.testing.do_bench (median,
ms); GB/s = weight bytes read ÷ time. The last line on stderr per (kind, shape, rows) is the best config.
The probe variants (`PROBE`, `FMA`, `WA=False`, `nf4_cuda.Config.probe`) compute wrong or slower results on
purpose: timing only.
The H200 outputs of 2026-11-30 are in benchmarks/2026-11-30-h200/kernel_probe-*.json.
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.engine import nf4  # noqa: E402
from workers.engine.kernels import linear as L  # noqa: E402
from workers.engine.kernels import nf4_rows  # noqa: E402

SHAPES = ((12288, 4096), (4096, 11008))

# (label, weight kind, rows, configs of (wa, fma, probe, bm, bn, bk, warps, stages, splits)), do_bench rep
SWEEPS = {
    "mma": ((1, 17), 60, [
        ("bf16", c) for c in itertools.product((True,), (False,), (0,), (16, 32), (32, 64, 128), (128, 256), (4, 8),
                                               (3, 4), (1, 2, 4))] + [
        ("bf16", (False, False, 0, 16, 64, 128, 4, 3, 2))] + [
        ("nf4", c) for c in itertools.product((True,), (False,), (0,), (16,), (32, 64, 128), (128, 256), (4, 8),
                                              (2, 3), (1, 4))]),
    "nf4-probes": ((1,), 60, [
        ("nf4", c) for c in itertools.product((False,), (False,), (0, 1, 2), (16,), (32, 64), (64, 128), (4, 8),
                                              (3,), (1, 4))]),
    "fma": ((1, 9, 17), 25, [
        (kind, c) for kind in ("bf16", "nf4")
        for c in itertools.product((True,), (True,), (0,), (16,), (16, 32, 64), (128, 256, 512), (4, 8),
                                   (3,) if kind == "bf16" else (2,), (1, 2, 4))]),
}


def run(weight, x, wa, fma, probe, block_m, block_n, block_k, warps, stages, splits, rep):
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
    ms = triton.testing.do_bench(call, warmup=5, rep=rep)
    return ms, weight.bytes_read() / ms / 1e6


# nf4-rows: (lookup, xpair, prefetch, block_n, block_k, warps, stages, splits); lookup 3 is the no-lookup
# timing probe
ROWS_SWEEP = (list(itertools.product((1, 3), (True,), (False, True), (16, 32, 64), (128, 256), (2, 4, 8), (1,),
                                     (2, 4, 8)))
              + list(itertools.product((4, 5), (True,), (True,), (32, 64), (128, 256), (4, 8), (1,), (4,))))


def run_rows(weight, x, lookup, xpair, prefetch, block_n, block_k, warps, stages, splits, rep):
    n, k = weight.n, weight.k
    k_blocks = -(-k // block_k)
    k_split = -(-k_blocks // splits) * block_k
    splits = -(-k // k_split)
    out = torch.empty((splits, x.shape[0], n), dtype=torch.float32, device="cuda")
    grid = (-(-n // block_n), splits, x.shape[0])

    def call():
        nf4_rows._rows_kernel[grid](x, *weight.pointers(x), out, x.shape[0], n, k, k_split, SPLITS=splits,
                                    BLOCK_N=block_n, BLOCK_K=block_k, LOOKUP=lookup, EMULATE=False,
                                    XPAIR=xpair, pair_ptr=pairs, PREFETCH=prefetch, num_warps=warps,
                                    num_stages=stages)
    pairs = nf4_rows.pair_table(weight.code, wide=lookup == 5)
    ms = triton.testing.do_bench(call, warmup=5, rep=rep)
    return ms, weight.bytes_read() / ms / 1e6


def bnb_reference(n, k, w, rows, rep):
    """bitsandbytes' own NF4 matmul of `rows` rows (its one-row GEMV kernel for 1), same bytes counted."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except ImportError as exc:
        return {"kind": "bitsandbytes", "n": n, "k": k, "rows": rows, "ms": None, "gbs": str(exc)[:80]}
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state), warmup=5, rep=rep)
    return {"kind": "bitsandbytes", "n": n, "k": k, "rows": rows, "ms": ms, "gbs": (n * k // 2 + n * k // 64) / ms / 1e6}


def rows_sweep(rep=25):
    results = []
    for n, k in SHAPES + ((22016, 4096), (4096, 4096)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64
        packed, absmax = nf4.quantize(w.float())
        weight = L.Weight(n, k, packed=packed, absmax=absmax, code=nf4.code_tensor("cuda"))
        for rows in (1, 9):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            configs = ROWS_SWEEP if (rows == 1 and (n, k) in SHAPES) else [
                c for c in ROWS_SWEEP if c[0] == 1 and c[4] == 256 and c[3] in (32, 64) and c[5] == 4 and c[7] == 4]
            for lookup, xpair, prefetch, bn, bk, warps, stages, splits in configs:
                try:
                    ms, gbs = run_rows(weight, x, lookup, xpair, prefetch, bn, bk, warps, stages, splits, rep)
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                    ms, gbs = None, str(exc)[:80]
                results.append(dict(kind="nf4-rows", lookup=lookup, xpair=xpair, prefetch=prefetch, n=n, k=k, rows=rows, bn=bn,
                                    bk=bk, warps=warps, stages=stages, splits=splits, ms=ms, gbs=gbs))
            for lookup, prefetch in itertools.product((1, 3, 4, 5), (False, True)):
                done = [r for r in results if r.get("lookup") == lookup and r.get("prefetch") == prefetch
                        and r["n"] == n and r["k"] == k and r["rows"] == rows and r["ms"]]
                if done:
                    print(json.dumps({**min(done, key=lambda r: r["ms"]), "configs": len(done)}), file=sys.stderr,
                          flush=True)
            ref = bnb_reference(n, k, w, rows, rep)
            print(json.dumps(ref), file=sys.stderr, flush=True)
            results.append(ref)
    return results


def graph_ms(launch, copies: int, replays: int = 20) -> float:
    """Median time of one launch among `copies` back-to-back launches (each on its own copy of the weight,
    together larger than L2) captured in one CUDA graph, as the step runs them; no Python between launches."""
    import statistics
    import time
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in range(copies):
            launch(c)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in range(copies):
            launch(c)
    samples = []
    for _ in range(replays):
        torch.cuda.synchronize()
        t0 = time.monotonic_ns()
        graph.replay()
        torch.cuda.synchronize()
        samples.append((time.monotonic_ns() - t0) / 1e6 / copies)
    return statistics.median(samples)


CUDA_CONFIGS = ([dict(depth=d, minb=m) for d in (2, 3, 4, 6, 8) for m in (2, 3, 4) if (d, m) != (3, 4)]
                + [dict(depth=d, tiles=2, minb=3) for d in (4, 6)]
                + [dict(depth=d, xring=1, minb=3) for d in (4, 6)]
                + [dict(depth=6, minb=3, programs=p) for p in (256, 1024)]
                + [dict(probe=1), dict(probe=2)])      # the loads alone; loads and lookups (wrong sums)


def cuda_sweep(configs_list=None, rows_list=(1, 2, 5, 9, 16, 17)):
    """nf4_cuda.py's kernel under each `CUDA_CONFIGS` entry (or `configs_list`) beside the step's Triton rows kernel, the dense
    bf16 kernel and bitsandbytes, on the LLaMA-7B shapes, 1 and 9 rows (plus 2, 5, 16, 17 for the step's
    config); timed as back-to-back launches in a CUDA graph over weight copies larger than L2."""
    from dataclasses import replace
    from workers.engine.kernels import nf4_cuda
    results = []
    for n, k in SHAPES + ((22016, 4096), (4096, 4096)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64
        packed, absmax = nf4.quantize(w.float())
        code = nf4.code_tensor("cuda")
        copies = max(2, -(-160 * 2**20 // (packed.numel() + 4 * absmax.numel())))
        packs = [packed.clone() for _ in range(copies)]
        scales = [nf4_cuda.tile_absmax(absmax, n, k) for _ in range(copies)]
        cores = L.Weight(n, k, packed=packed, absmax=absmax, code=code)
        rows_ws = [L.Weight(n, k, packed=p, absmax=absmax.clone(), code=code, nf4_kernel="rows") for p in packs]
        tiled = None
        dense_copies = max(2, -(-160 * 2**20 // (2 * n * k)))
        denses = [L.Weight(n, k, dense=w.clone()) for _ in range(dense_copies)]
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            configs = [{}] + ((CUDA_CONFIGS if configs_list is None else configs_list) if rows in (1, 9) else [])
            for change in configs:
                config = replace(nf4_cuda.CONFIG, **change)
                splits, per = nf4_cuda.splits_for(n, k, config.programs)
                if config.layout and tiled is None:       # the same weights, tile-major
                    tiled = [nf4_cuda.tile_packed(p, n, k) for p in packs]
                weights = tiled if config.layout else packs
                out = torch.empty((splits, rows, n), dtype=torch.float32, device="cuda")
                try:
                    ms = graph_ms(lambda c: nf4_cuda.partials(x, weights[c], scales[c], cores.pairs[x.dtype], n, k, out,
                                                              per, config), copies)
                    gbs = cores.bytes_read() / ms / 1e6
                except Exception as exc:  # noqa: BLE001 - a config that fails is reported, not fatal
                    ms, gbs = None, str(exc)[:120]
                results.append(dict(kind="nf4-cuda", n=n, k=k, rows=rows, splits=splits, step=not change,
                                    **config.__dict__, ms=ms, gbs=gbs))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            for label, weights in (("nf4-rows", rows_ws), ("bf16-mma", denses)):
                out = torch.empty((weights[0].splits, rows, n), dtype=torch.float32, device="cuda")
                ms = graph_ms(lambda c: L._single(x, weights[c], out, max(2, weights[c].splits)), len(weights))
                results.append(dict(kind=label, n=n, k=k, rows=rows, ms=ms, gbs=weights[0].bytes_read() / ms / 1e6))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            results.append(bnb_reference(n, k, w, rows, 25))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=sorted(SWEEPS) + ["nf4-rows", "nf4-cuda"], required=True)
    parser.add_argument("--configs", help="nf4-cuda: ';'-separated configs instead of CUDA_CONFIGS, e.g. "
                                          "'probe=1;depth=4,minb=3'")
    parser.add_argument("--rows", default="1,2,5,9,16,17", help="nf4-cuda: rows of x to time")
    args = parser.parse_args()
    if args.sweep == "nf4-rows":
        results = rows_sweep()
        rows_list, grid = (), ()
    elif args.sweep == "nf4-cuda":
        from workers.engine.kernels import nf4_cuda
        configs = None if args.configs is None else [
            nf4_cuda.parse_changes(part, allow_probe=True) for part in args.configs.split(";") if part]
        results = cuda_sweep(configs, tuple(int(r) for r in args.rows.split(",")))
        rows_list, grid = (), ()
    else:
        rows_list, rep, grid = SWEEPS[args.sweep]
        results = []
    for n, k in SHAPES if grid else ():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64
        packed, absmax = nf4.quantize(w.float())
        weights = {"bf16": L.Weight(n, k, dense=w),
                   "nf4": L.Weight(n, k, packed=packed, absmax=absmax, code=nf4.code_tensor("cuda"))}
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            for kind, (wa, fma, probe, bm, bn, bk, warps, stages, splits) in grid:
                if bn * bk > 128 * 128:
                    continue
                try:
                    ms, gbs = run(weights[kind], x, wa, fma, probe, bm, bn, bk, warps, stages, splits, rep)
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                    ms, gbs = None, str(exc)[:80]
                results.append(dict(kind=kind, wa=wa, fma=fma, probe=probe, n=n, k=k, rows=rows, bm=bm, bn=bn,
                                    bk=bk, warps=warps, stages=stages, splits=splits, ms=ms, gbs=gbs))
            for label in sorted({(r["kind"], r["probe"], r["wa"]) for r in results}):
                done = [r for r in results if (r["kind"], r["probe"], r["wa"]) == label and r["n"] == n
                        and r["rows"] == rows and r["ms"]]
                if done:
                    best = max(done, key=lambda r: r["gbs"])
                    print(json.dumps({**best, "configs": len(done)}), file=sys.stderr, flush=True)
    copy_src = torch.empty(1 << 30, dtype=torch.uint16, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    ms = triton.testing.do_bench(lambda: copy_dst.copy_(copy_src))
    print(json.dumps({"sweep": args.sweep, "copy_gbs": 4 * (1 << 30) / ms / 1e6, "results": results}))


if __name__ == "__main__":
    main()
