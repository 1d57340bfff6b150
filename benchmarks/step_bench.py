"""Step-level benchmark of the exact engine on one GPU: exactness, decode and verification times, floors.

    python benchmarks/step_bench.py --out OUT.json [--precisions bf16,nf4] [--kinds videollava,eventgpt]
                                    [--profile] [--prefill] [--no-previous]

For each (model, precision): a full-size random-weight model (`--synthetic-weights 7b` geometry) with its
real prompt length is prefilled once, then
- exactness: 48 greedy decode steps record every position's logits; the same positions are then verified
  in windows of k = 1, 2, 4, 8, 16 drafts (the engine's own tokens) and every row's logits are compared bit
  for bit with the decode step's (and the drafts must all be accepted);
- times (wall, GPU synchronised, `time.monotonic_ns`, median of `--repeats`): one decode step, one
  verification of k drafts, and the same for the previous CUDA-graph step (cuBLAS or bitsandbytes + SDPA);
- floors: bytes one step reads (every weight once + the K/V of the cached positions) at the datasheet
  bandwidth, and at the copy bandwidth the device gives (`workers/bandwidth.py`, as `bench` measures it:
  best of timed groups of device-to-device copies of up to 1 GiB, counted as read + write); and the floor of
  the weights as their format stores them (`floor_as_stored_ms`: NF4 with bitsandbytes' double-quantized
  scales, which the kernel reads expanded to float32 unless asked otherwise);
- `--profile`: GPU time per kernel name of a decode and a verify-8 step, and each kernel's share of the
  step's critical path (`critical_path`).
Needs CUDA (and bitsandbytes for nf4). Prints and writes one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.floor import datasheet_bandwidth  # noqa: E402
from workers.bandwidth import measure_torch  # noqa: E402
from workers.engine.core import TokenEngine  # noqa: E402
from workers.engine.fast import CudaGraphStepModel  # noqa: E402
from workers.engine.exact import ExactStepModel  # noqa: E402
from workers.engine.kernels import env_settings  # noqa: E402
from workers.models.synthetic import synthetic_model, synthetic_prefill_inputs  # noqa: E402

BUCKETS = (1, 2, 3, 5, 9, 17, 33)
KS = (1, 2, 4, 8, 16)


def datasheet_tbs(name: str) -> float | None:
    gbs, _ = datasheet_bandwidth(name)
    return gbs / 1e3 if gbs else None


def measured_copy_tbs(device) -> float:
    """The device's copy bandwidth (read + write) as workers/bandwidth.py measures it for `bench`'s floor."""
    return measure_torch(str(device))["copy_gbs"] / 1e3


def median_ms(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.monotonic_ns()
        fn()                      # every step ends in .tolist() of its greedy ids: a device sync
        samples.append(time.monotonic_ns() - t0)
    return statistics.median(samples) / 1e6


def exactness(step, prompt) -> dict:
    engine = TokenEngine(step)
    engine.start(prompt)
    decoded = []
    for _ in range(48):
        engine.step()
        decoded.append(engine.last_output.logits[0].clone())
    tokens = list(engine.tokens)
    rows = same = accepted = drafted = 0
    for k in KS:
        verify = TokenEngine(step)
        verify.start(prompt)
        pos = 0
        while pos + k < len(tokens) - 1:
            got, _ = verify.verify(tokens[pos + 1: pos + 1 + k])
            accepted += got
            drafted += k
            for row in range(k + 1):
                if pos + row < len(decoded):
                    rows += 1
                    same += bool(torch.equal(verify.last_output.logits[row], decoded[pos + row]))
            if got < k:
                break
            pos += k + 1
    return {"rows_compared": rows, "rows_bit_identical": same, "drafts": drafted, "accepted": accepted}


def timings(step, prompt, repeats: int) -> dict:
    engine = TokenEngine(step)
    engine.start(prompt)
    for _ in range(5):
        engine.step()
    base = step.kv_len
    out = {"decode_ms": median_ms(lambda: (step.crop(base), step.forward([5])), repeats)}
    for k in KS:
        out[f"verify{k}_ms"] = median_ms(lambda: (step.crop(base), step.forward([5] * (k + 1))), repeats)
    step.crop(base)
    return out


def kernels_by_time(prof, per: int, top: int) -> tuple[float, list[dict]]:
    """(GPU ms of every kernel, the `top` kernel names by GPU time) of a torch.profiler run over `per` repeats,
    per repeat."""
    kernels = [(e.key, e.device_time_total / 1e3 / per, e.count / per) for e in prof.key_averages()
               if getattr(e, "device_time_total", 0) > 0]
    kernels.sort(key=lambda item: -item[1])
    return (sum(ms for _, ms, _ in kernels),
            [{"name": name[:90], "ms": ms, "calls": calls} for name, ms, calls in kernels[:top]])


def critical_path(events: list[dict], steps: int) -> dict:
    """Where a run of `steps` steps spends its wall time, kernel by kernel: events (chrome-trace GPU events,
    each with "name", "ts" and "dur" in µs) taken in order of start; a kernel's *marginal* time is how far its
    end moves the latest end so far (what it adds to the step once the kernels before it are done, so with
    programmatic dependent launch the time a kernel sat resident waiting is not counted), and *idle* the time
    before it in which no kernel ran. Per kernel name, ms a step; the marginals plus the idle time add up
    to the span from the first start to the last end."""
    by_name: dict[str, dict] = {}
    latest = None
    first = None
    for event in sorted(events, key=lambda e: (e["ts"], e["ts"] + e["dur"])):
        start, end = float(event["ts"]), float(event["ts"]) + float(event["dur"])
        first = start if first is None else first
        idle = 0.0 if latest is None else max(0.0, start - latest)
        marginal = end - start if latest is None else max(0.0, end - max(latest, start))
        latest = end if latest is None else max(latest, end)
        row = by_name.setdefault(event["name"][:90], {"calls": 0, "marginal_ms": 0.0, "idle_before_ms": 0.0,
                                                      "duration_ms": 0.0})
        row["calls"] += 1
        row["marginal_ms"] += marginal / 1e3
        row["idle_before_ms"] += idle / 1e3
        row["duration_ms"] += (end - start) / 1e3
    kernels = [{"name": name, **{k: (v / steps if k != "calls" else v / steps) for k, v in row.items()}}
               for name, row in by_name.items()]
    kernels.sort(key=lambda r: -r["marginal_ms"])
    span = 0.0 if first is None else (latest - first) / 1e3 / steps
    return {"span_ms": span, "idle_ms": sum(r["idle_before_ms"] for r in kernels), "kernels": kernels}


def gpu_events(prof) -> list[dict]:
    """The GPU kernels and copies of a torch.profiler run, from its chrome trace."""
    import os
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def kernel_profile(step, prompt, rows: int, steps: int = 5, top: int = 12) -> dict:
    """GPU time per kernel name in a step of `rows` rows (torch.profiler over `steps` graph replays): where
    a step's time goes, how much of the wall time no kernel runs (launch gaps), and each kernel's share of
    the critical path (`critical_path`)."""
    from torch.profiler import ProfilerActivity, profile
    engine = TokenEngine(step)
    engine.start(prompt)
    base = step.kv_len
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.monotonic_ns()
        for _ in range(steps):
            step.crop(base)
            step.forward([5] * rows)
        wall_ms = (time.monotonic_ns() - t0) / 1e6 / steps
    step.crop(base)
    busy, kernels = kernels_by_time(prof, steps, top)
    out = {"rows": rows, "wall_ms_profiled": wall_ms, "kernel_ms": busy, "kernels": kernels}
    try:
        out["critical_path"] = critical_path(gpu_events(prof), steps)
    except Exception as exc:  # noqa: BLE001 - the profile above stands without it
        out["critical_path_error"] = repr(exc)
    return out


def prefill_profile(step, prompt, repeats: int = 5, top: int = 15) -> dict:
    """The prefill (vision tower, projector and the language model over the whole prompt, the worker's path):
    median wall ms over `repeats`, then GPU time per kernel name of one more (torch.profiler) and how much
    of its wall time no kernel runs."""
    from torch.profiler import ProfilerActivity, profile

    def once():
        engine = TokenEngine(step)
        engine.start(prompt)              # ends in the first token's .tolist(): a device sync
    once()
    wall = median_ms(once, repeats)
    if not torch.cuda.is_available():     # the CPU dry run: the time only
        return {"prefill_ms": wall}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.monotonic_ns()
        once()
        wall_profiled = (time.monotonic_ns() - t0) / 1e6
    busy, kernels = kernels_by_time(prof, 1, top)
    return {"prefill_ms": wall, "wall_ms_profiled": wall_profiled, "kernel_ms": busy, "kernels": kernels}


def bench_one(kind: str, precision: str, repeats: int, tbs: float | None, copy_tbs: float, size: str = "7b",
              device: str = "cuda", profile: bool = False, previous: bool = True, prefill: bool = False) -> dict:
    lm = synthetic_model(kind, size=size, precision=precision, device=device, seed=0)
    prompt, prompt_len = synthetic_prefill_inputs(lm)
    max_cache = prompt_len + 200 + 33
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.monotonic_ns()
    step = ExactStepModel(lm.model, max_cache_len=max_cache, buckets=BUCKETS, use_graphs=device == "cuda")
    capture_s = (time.monotonic_ns() - t0) / 1e9
    result = {"kind": kind, "precision": precision, "prompt_len": prompt_len, "capture_s": round(capture_s, 1),
              "eager_buckets": sorted(step.eager_buckets)}
    if prefill:
        result["prefill"] = prefill_profile(step, prompt)
    result.update(exactness(step, prompt))
    result.update(timings(step, prompt, repeats))
    if profile and device == "cuda":
        result["profile"] = [kernel_profile(step, prompt, rows) for rows in (1, 9)]
    sizes = step.step_bytes()
    result["matmul_kernel"] = sizes.get("kernel")
    step_bytes = sizes["weights"] + sizes["kv_per_position"] * (prompt_len + 5)
    result.update({
        "weight_bytes": sizes["weights"], "kv_bytes": sizes["kv_per_position"] * (prompt_len + 5),
        "floor_ms": step_bytes / (tbs * 1e9) if tbs else None,
        "floor_measured_bw_ms": step_bytes / (copy_tbs * 1e9),
        # the floor of the weights as their format stores them (NF4: bitsandbytes' double-quantized scales,
        # a byte a block, where the kernel reads float32 ones unless nf4_cuda.Config.dq)
        "weight_bytes_as_stored": sizes.get("weights_as_stored"),
        "floor_as_stored_ms": ((sizes.get("weights_as_stored", sizes["weights"]) + step_bytes - sizes["weights"])
                               / (tbs * 1e9) if tbs else None),
    })
    if result["floor_ms"]:
        result["decode_over_floor"] = result["decode_ms"] / result["floor_ms"]
    result["verify8_over_decode"] = result["verify8_ms"] / result["decode_ms"]
    if device == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del step
    if previous:      # the previous CUDA-graph step (cuBLAS / bitsandbytes + SDPA), for comparison
        lm2 = synthetic_model(kind, size=size, precision=precision, device=device, seed=0)
        old = CudaGraphStepModel(lm2.model, max_cache_len=max_cache, buckets=BUCKETS, use_graphs=device == "cuda")
        old_t = timings(old, prompt, repeats)
        result["previous_step"] = {"decode_ms": old_t["decode_ms"], "verify8_ms": old_t["verify8_ms"],
                                   "verify16_ms": old_t["verify16_ms"]}
        old_x = exactness(old, prompt)
        result["previous_step"].update(old_x)
        del old, lm2
    del lm
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--precisions", default="bf16,nf4")
    parser.add_argument("--kinds", default="videollava,eventgpt")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--size", default="7b", help="7b, or tiny-test for a dry run on the CPU (TRITON_INTERPRET=1)")
    parser.add_argument("--profile", action="store_true", help="GPU time per kernel of a decode and a verify-8 step")
    parser.add_argument("--prefill", action="store_true", help="time and profile the prefill (kernels by GPU time)")
    parser.add_argument("--no-previous", action="store_true", help="skip the previous step (cuBLAS/bitsandbytes)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.size == "7b":
        print("step_bench needs a CUDA GPU (or --size tiny-test with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    tbs = datasheet_tbs(name)
    copy_tbs = measured_copy_tbs(torch.device("cuda")) if device == "cuda" else 1.0
    report = {"device": name, "datasheet_tbs": tbs, "measured_copy_tbs": copy_tbs, "torch": torch.__version__,
              "settings": env_settings(), "runs": []}
    for kind in args.kinds.split(","):
        for precision in args.precisions.split(","):
            t0 = time.monotonic_ns()
            run = bench_one(kind, precision, args.repeats, tbs, copy_tbs, args.size, device, args.profile,
                            not args.no_previous, args.prefill)
            run["wall_s"] = round((time.monotonic_ns() - t0) / 1e9, 1)
            print(json.dumps(run), flush=True)
            report["runs"].append(run)
            args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
