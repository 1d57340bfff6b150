"""The best read bandwidth a worker's device gives, measured in the worker process (the coordinator never
imports torch): a reduction over a large buffer (reads it once) and a copy (reads and writes it), each
repeated back to back, best of a few timed groups. On a CUDA device the buffer is min(1 GiB, a quarter of
the free memory), far larger than any L2 cache. The fake backend measures the host with numpy.

`coordinator bench` runs it as its own short process (`python -m workers.bandwidth --device cuda:1`) on each
device before the workers start, one device at a time, so nothing else uses the device while it measures and
its buffers never count towards a model's peak memory. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

GIB = 1 << 30


def _best(run, repeats: int, groups: int, sync) -> float:
    """Seconds of one run, best group of `repeats` back-to-back runs (time.monotonic_ns around syncs)."""
    run()
    sync()
    best = float("inf")
    for _ in range(groups):
        start = time.monotonic_ns()
        for _ in range(repeats):
            run()
        sync()
        best = min(best, (time.monotonic_ns() - start) / 1e9 / repeats)
    return best


def measure_numpy(nbytes: int = 64 << 20, repeats: int = 4, groups: int = 3) -> dict:
    import numpy as np

    x = np.ones(nbytes // 4, dtype=np.float32)
    y = np.empty_like(x)
    read_s = _best(lambda: x.sum(), repeats, groups, lambda: None)
    copy_s = _best(lambda: np.copyto(y, x), repeats, groups, lambda: None)
    return _result("host memory (numpy)", x.nbytes, read_s, copy_s)


def measure_torch(device: str | None, max_bytes: int = GIB, repeats: int = 20, groups: int = 5) -> dict:
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda":
        return measure_numpy()
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    free, _total = torch.cuda.mem_get_info(dev)
    nbytes = max(1 << 20, min(max_bytes, free // 4) // (1 << 20) * (1 << 20))
    result = measure_tensors(dev, nbytes, repeats, groups, lambda: torch.cuda.synchronize(dev))
    torch.cuda.empty_cache()
    return result


def measure_tensors(dev, nbytes: int, repeats: int, groups: int, sync) -> dict:
    """Read (a sum) and copy bandwidth of an `nbytes` float32 buffer on torch device `dev`."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    y = torch.empty_like(x)
    out = torch.empty((), dtype=torch.float32, device=dev)
    read_s = _best(lambda: torch.sum(x, dim=0, out=out), repeats, groups, sync)
    copy_s = _best(lambda: y.copy_(x), repeats, groups, sync)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    return _result(f"{name} (torch sum / copy)", nbytes, read_s, copy_s)


def _result(method: str, nbytes: int, read_s: float, copy_s: float) -> dict:
    read_gbs = nbytes / read_s / 1e9
    copy_gbs = 2 * nbytes / copy_s / 1e9          # a copy reads and writes every byte
    return {"method": method, "bytes": int(nbytes), "read_gbs": read_gbs, "copy_gbs": copy_gbs,
            "best_gbs": max(read_gbs, copy_gbs)}


def measure_read_bandwidth(device: str | None, use_torch: bool) -> dict:
    """{"method", "bytes", "read_gbs", "copy_gbs", "best_gbs"} for `device`; never raises (an error is
    reported in the dict, so a failed probe costs the floor column, not the run)."""
    try:
        return measure_torch(device) if use_torch else measure_numpy()
    except Exception as exc:  # a probe must not stop a worker from starting
        return {"method": "failed", "error": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.bandwidth", description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--numpy", action="store_true", help="measure the host with numpy (no torch)")
    args = p.parse_args(argv)
    print(json.dumps(measure_read_bandwidth(args.device, not args.numpy)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
