"""What the cost model predicted for each `parallel`/`speculative` request of a bench run and what the request
then measured, paired with the baseline of the same sample, placement and MPS setting:

    python benchmarks/plan_outcomes.py OUT/bench.json[.gz] [--alpha 0.9]

One line per request: oracle, the plan's decision (its reason up to the colon), predicted speedup, measured
baseline wall ÷ request wall.
"""
from __future__ import annotations

import argparse
import gzip
import json


def outcomes(records: list[dict], alpha: float | None = None) -> list[dict]:
    """The plan's prediction beside the paired measured speedup of every drafting-mode request."""
    base = {(r["sample_id"], r.get("placement"), r.get("mps")): r["wall_ms"] for r in records
            if r.get("mode") == "baseline" and r.get("status") == "ok"}
    rows = []
    for r in records:
        plan = r.get("draft_plan") or {}
        key = (r.get("sample_id"), r.get("placement"), r.get("mps"))
        if r.get("mode") not in ("parallel", "speculative") or key not in base or not r.get("wall_ms"):
            continue
        if alpha is not None and r.get("alpha") != alpha:
            continue
        rows.append({"sample": r["sample_id"], "mode": r["mode"], "oracle": r.get("oracle"),
                     "plan": (plan.get("reason") or "").split(" (")[0].split(":")[0],
                     "predicted": plan.get("predicted_speedup"), "measured": base[key] / r["wall_ms"]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json")
    parser.add_argument("--alpha", type=float, help="only the requests of this oracle acceptance")
    args = parser.parse_args()
    opener = gzip.open if args.bench_json.endswith(".gz") else open
    with opener(args.bench_json, "rt") as f:
        records = json.load(f)["records"]
    for row in outcomes(records, args.alpha):
        predicted = "—" if row["predicted"] is None else f"{row['predicted']:.3f}x"
        print(f"{row['sample']}  {row['mode']:<11} {row['oracle'] or '':<13} {row['plan']:<40} "
              f"predicted {predicted:>7}  measured {row['measured']:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
