"""Throughput of `coordinator run --ray` with 1..N pipelines on the same samples; prints a table.

    python benchmarks/cluster_scaling.py --pipelines 1,2 --out runs/scaling -- --input DIR [run flags...]

Each count is one `coordinator run --ray local --pipelines N` (a fresh local Ray each time). Throughput is
samples / (last result - first sample dispatched), read from results.json (`run_info.ray.throughput`);
`whole run` also counts the pipelines' start-up (worker and model loading). Scaling = throughput(N) /
throughput(1). With fake backends, per-step sleeps (`--target-option step_ms=...`) make the work bound by
wall time rather than by this machine's cores. Never imports torch.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipelines", default="1,2", help="comma-separated pipeline counts")
    ap.add_argument("--out", default="runs/cluster-scaling", help="one output folder per count inside")
    ap.add_argument("--ray", default="local", help="local, auto or HOST:PORT")
    ap.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: flags for `coordinator run`")
    args = ap.parse_args()
    run_args = [a for a in args.run_args if a != "--"]
    rows = []
    for n in [int(x) for x in args.pipelines.split(",") if x.strip()]:
        out = Path(args.out) / f"pipelines-{n}"
        cmd = [sys.executable, "-m", "coordinator", "run", *run_args, "--ray", args.ray, "--pipelines", str(n),
               "--output-dir", str(out), "--quiet"]
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
        res = json.loads((out / "results.json").read_text())
        ray_info = res["run_info"]["ray"]
        tp = ray_info["throughput"]
        ok = sum(1 for r in res["records"] if r.get("status") == "ok")
        rows.append({"pipelines": n, "samples": tp["items"], "ok_records": ok, "records": len(res["records"]),
                     "seconds": tp["dispatch_to_last_result_s"], "samples_per_s": tp["items_per_s"],
                     "whole_run_s": tp["start_to_last_result_s"],
                     "per_pipeline": ray_info["samples_per_pipeline"]})
    base = rows[0]["samples_per_s"] if rows and rows[0]["pipelines"] == 1 else None
    print("| pipelines | samples | ok records | seconds (dispatch → last) | samples/s | scaling vs 1 | "
          "whole run s (with start-up) | samples per pipeline |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        scale = f"{r['samples_per_s'] / base:.2f}× (≥ {0.9 * r['pipelines']:.1f}× wanted)" if base else "—"
        print(f"| {r['pipelines']} | {r['samples']} | {r['ok_records']}/{r['records']} | {r['seconds']:.2f} | "
              f"{r['samples_per_s']:.3f} | {scale} | {r['whole_run_s']:.2f} | {r['per_pipeline']} |")
    (Path(args.out) / "scaling.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
