"""The exact step's attention alone, per launch shape (`workers.engine.kernels.attention.Config`), at the two
models' cache lengths: a CUDA graph of one step's 32 layer calls (each layer its own K/V, so nothing is
served from L2 across layers), replayed; wall time per step (GPU synchronised, `time.monotonic_ns`, median),
the K/V bytes the rows can see, the rate that makes, and whether row 0 of 9 rows has the bits of 1 row.
`torch.nn.functional.scaled_dot_product_attention` on the same cache (not row-invariant) is the reference
of what a vendor kernel takes:

    python benchmarks/attention_sweep.py [--configs "split=64;merge=combine;..."] [--repeats 30] > OUT.json

Needs CUDA. Prints one JSON object per (shape, config, rows) line, then a markdown table on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernel_probe import graph_ms  # noqa: E402
from workers.engine.kernels.attention import attention, parse_config  # noqa: E402

LAYERS, HEADS, HEAD_DIM = 32, 32, 128
# (name, cached positions, cache slots) as the step models size them for a 200-token answer
SHAPES = (("eventgpt", 641, 960), ("videollava", 2076, 2368))
DEFAULT_CONFIGS = ("", "merge=combine", "split=64", "split=64,merge=combine", "split=256,merge=combine",
                   "block_m=16", "block_m=16,merge=combine", "stages=1", "stages=3", "warps=8",
                   "block_n=128", "block_n=128,warps=8", "block_n=128,stages=1", "block_n=128,warps=8,stages=1",
                   "split=64,block_m=16", "split=64,block_m=16,merge=combine", "split=64,stages=1",
                   "split=256,block_n=128,warps=8", "block_m=16,block_n=128,warps=8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", help="';'-separated attention configs (default: a sweep)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("attention_sweep needs a CUDA GPU", file=sys.stderr)
        return 2
    configs = DEFAULT_CONFIGS if args.configs is None else tuple(args.configs.split(";"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    table = []
    for name, start, slots in SHAPES:
        caches = [(torch.randn(HEADS, slots, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16),
                   torch.randn(HEADS, slots, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16))
                  for _ in range(LAYERS)]
        valid = torch.ones(slots, dtype=torch.uint8, device="cuda")
        where = torch.tensor([start], device="cuda")
        q = torch.randn(9, HEADS * HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
        seen = (start + 32) * HEADS * HEAD_DIM * 2 * 2 * LAYERS       # K and V a 32-row tile can see
        for rows in (1, 9):
            x = q[:rows].contiguous()

            def sdpa():
                for keys, values in caches:
                    torch.nn.functional.scaled_dot_product_attention(
                        x.view(1, rows, HEADS, HEAD_DIM).transpose(1, 2), keys[None, :, : start + rows],
                        values[None, :, : start + rows], is_causal=False)
            ms = graph_ms(lambda _: sdpa(), 1, args.repeats)
            table.append({"shape": name, "config": "torch sdpa", "rows": rows, "ms": ms, "tbs": seen / ms / 1e9})
            print(json.dumps(table[-1]), flush=True)
            for text in configs:
                config = parse_config(text)
                try:
                    ms = graph_ms(lambda _: [attention(x, k, v, valid, where, config) for k, v in caches], 1,
                                  args.repeats)
                    one = attention(q[:1].contiguous(), *caches[0], valid, where, config)
                    nine = attention(q, *caches[0], valid, where, config)
                    entry = {"shape": name, "config": text or "default", "rows": rows, "ms": ms,
                             "tbs": seen / ms / 1e9, "row0_bits_1_vs_9": bool(torch.equal(one[0], nine[0]))}
                except Exception as exc:  # noqa: BLE001 - a shape that does not compile is reported, not fatal
                    entry = {"shape": name, "config": text or "default", "rows": rows,
                             "error": f"{type(exc).__name__}: {exc}"[:300]}
                table.append(entry)
                print(json.dumps(entry), flush=True)
        del caches
        torch.cuda.empty_cache()
    print("| shape | config | rows | ms a step (32 layers) | TB/s | row 0 bits 1 = 9 |", file=sys.stderr)
    print("|---|---|---|---|---|---|", file=sys.stderr)
    for e in table:
        if "ms" in e:
            print(f"| {e['shape']} | {e['config']} | {e['rows']} | {e['ms']:.3f} | {e['tbs']:.2f} | "
                  f"{e.get('row0_bits_1_vs_9', '—')} |", file=sys.stderr)
        else:
            print(f"| {e['shape']} | {e['config']} | {e['rows']} | failed: {e['error'][:80]} | | |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
