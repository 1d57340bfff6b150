"""Rank the NF4 tensor-core kernel's configurations of a `kernel_probe.py --sweep nf4-cuda` output by the
time one layer's four NF4 matmuls would take (qkv + o + gate/up + down, 1 row, plus 9 rows at weight 1/4),
and print the best ones as `EVENTSPEC_NF4_CUDA` strings, one per line (for step_bench to confirm):

    python benchmarks/nf4_cuda_pick.py cuda.json [TOP]
"""
import json
import sys
from collections import defaultdict

KEYS = ("depth", "xring", "minb", "programs", "tiles")


def rank(results: list[dict]) -> list[tuple[float, dict]]:
    layer = defaultdict(float)
    seen = defaultdict(set)
    for r in results:
        if (r.get("kind") != "nf4-cuda" or not isinstance(r.get("ms"), float) or r["rows"] not in (1, 9)
                or r.get("probe") or r.get("stage")):  # a probe computes wrong sums; staging (older files) is gone
            continue
        key = tuple(r.get(k, 0) for k in KEYS)
        layer[key] += r["ms"] * (1.0 if r["rows"] == 1 else 0.25)
        seen[key].add((r["n"], r["k"], r["rows"]))
    full = max((len(v) for v in seen.values()), default=0)
    ranked = [(ms, dict(zip(KEYS, key))) for key, ms in layer.items() if len(seen[key]) == full]
    return sorted(ranked, key=lambda item: item[0])


def main() -> int:
    results = json.load(open(sys.argv[1]))["results"]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    for ms, config in rank(results)[:top]:
        print(",".join(f"{k}={v}" for k, v in config.items()))
        print(f"{ms * 1e3:.1f} us per layer-weighted set", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
