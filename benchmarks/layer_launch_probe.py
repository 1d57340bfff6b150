"""What a layer's NF4 kernel boundaries cost: a LLaMA-7B layer's four NF4 matmuls (qkv 12288×4096, o 4096×4096,
gate/up 22016×4096, down 4096×11008) as four launches back to back, against one launch over a weight of the same
bytes (49,408 × 4096: the four shapes' rows with down's K folded in), on the GPU:

    python benchmarks/layer_launch_probe.py [--rows 1,9] [--configs ";probe=6"] > layer.json

Each figure is µs per layer: the median over replays of a CUDA graph of `copies` layers in a row, each on its own
copy of the weights (together larger than L2), divided by `copies`, as `kernel_probe.graph_ms` times launches.
The one-launch figure is what the four matmuls would cost if nothing stopped and restarted the weight stream
between them (a persistent whole-layer kernel's best case for its matmuls); `probe=6` (the weight loads alone,
wrong sums) separates the loads from the arithmetic. Used for the twelfth session (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.kernel_probe import graph_ms  # noqa: E402
from workers.engine import nf4  # noqa: E402
from workers.engine.kernels import nf4_cuda  # noqa: E402

LAYER = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))


def merged_shape(shapes=LAYER, k: int = 4096) -> tuple[int, int]:
    """One weight [n, k] of as many values as `shapes` together (each shape's k a multiple of `k`)."""
    values = sum(n * kk for n, kk in shapes)
    if values % k:
        raise ValueError(f"the shapes' {values} values do not fold into rows of {k}")
    return values // k, k


def quantized(n: int, k: int, copies: int):
    """`copies` tile-major NF4 copies of one random [n, k] weight, their tile scales and the pair tables."""
    packed, absmax = nf4.quantize(torch.randn(n, k, device="cuda") / 64)
    tiles = nf4_cuda.tile_absmax(absmax, n, k)
    packs = [nf4_cuda.tile_packed(packed, n, k) for _ in range(copies)]     # each call makes a new tensor
    return packs, [tiles.clone() for _ in range(copies)]


def probe(rows_list, configs, copies: int = 3) -> list[dict]:
    pairs = nf4_cuda.pair_table(nf4.code_tensor("cuda"), torch.bfloat16)
    layer = [(n, k, *quantized(n, k, copies)) for n, k in LAYER]
    big_n, big_k = merged_shape()
    big = (big_n, big_k, *quantized(big_n, big_k, copies))
    results = []
    for rows in rows_list:
        for text in configs:
            config = replace(nf4_cuda.CONFIG, **nf4_cuda.parse_changes(text, allow_probe=True))
            for label, weights in (("four launches", layer), ("one launch", [big])):
                runs = []
                for n, k, packs, scales in weights:
                    splits, per = nf4_cuda.splits_for(n, k, config.programs)
                    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                    out = torch.empty((splits, rows, n), dtype=torch.float32, device="cuda")
                    runs.append((n, k, packs, scales, per, x, out))

                def launch(c, runs=runs, config=config):
                    for n, k, packs, scales, per, x, out in runs:
                        nf4_cuda.partials(x, packs[c], scales[c], pairs, n, k, out, per, config)

                us = 1000 * graph_ms(launch, copies)
                results.append(dict(rows=rows, config=text or "default", layout=label, us_per_layer=us,
                                    launches=len(runs), shapes=[[r[0], r[1]] for r in runs]))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,9", help="rows of x, comma-separated")
    parser.add_argument("--configs", default=";probe=6", help="EVENTSPEC_NF4_CUDA changes separated by ';' "
                                                              "('' = the step's kernel)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("layer_launch_probe needs a CUDA GPU", file=sys.stderr)
        return 2
    results = probe([int(r) for r in args.rows.split(",")], args.configs.split(";"))
    print(json.dumps(dict(device=torch.cuda.get_device_name(), results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
