"""Launch time against bytes read, from a `kernel_probe.py --sweep nf4-cuda` output: for each kernel variant
at one row count, a least-squares line over the LLaMA-7B shapes (µs = fixed + bytes ÷ marginal rate) and the
four shapes' sum, one layer's matmuls:

    python benchmarks/kernel_fit.py benchmarks/2026-12-03e-h200/layout/kernel_probe-layout.json [--rows 1]

A small fixed part and a low marginal rate mean the loads stream slowly, not that launches, waves or cold
rings cost the time (BENCHMARKS.md, fifth session).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

VARIANT_KEYS = ("depth", "xring", "minb", "programs", "tiles", "layout", "probe", "persist", "bulk", "slots")


def variant(record: dict) -> str:
    if record["kind"] != "nf4-cuda":
        return record["kind"]
    return ",".join(f"{k}={record[k]}" for k in VARIANT_KEYS if k in record)


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(fixed µs, marginal TB/s) of the least-squares line through (MB read, µs) points."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx       # µs per MB
    return my - slope * mx, 1.0 / slope


def table(results: list[dict], rows: int) -> list[dict]:
    groups = defaultdict(list)
    for r in results:
        if r.get("rows") == rows and isinstance(r.get("ms"), float) and isinstance(r.get("gbs"), float):
            groups[variant(r)].append((r["ms"] * r["gbs"], r["ms"] * 1e3))      # (MB read, µs)
    out = []
    for name, points in groups.items():
        if len({x for x, _ in points}) < 2:
            continue
        fixed, rate = fit(points)
        out.append({"variant": name, "shapes": len(points), "layer_us": sum(y for _, y in points),
                    "fixed_us": fixed, "marginal_tbs": rate})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("probe_json")
    parser.add_argument("--rows", type=int, default=1)
    args = parser.parse_args()
    with open(args.probe_json) as f:
        results = json.load(f)["results"]
    print("| variant | shapes | sum of the shapes µs | fixed µs | marginal TB/s |\n|---|---|---|---|---|")
    for row in table(results, args.rows):
        print(f"| {row['variant']} | {row['shapes']} | {row['layer_us']:.1f} | {row['fixed_us']:.1f} | "
              f"{row['marginal_tbs']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
