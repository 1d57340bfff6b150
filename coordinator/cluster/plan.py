"""The pure core of a multi-pipeline run: how many pipelines, the shared work queue, progress, resume.

No Ray, no processes, no clock reads here: every function takes what it needs (resource counts, records,
times) as arguments, so the scheduling rules are unit-tested in milliseconds.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

MAX_ATTEMPTS = 3          # a sample whose pipeline died this many times is recorded as failed, not retried


class PlanError(ValueError):
    """A pipeline count the cluster cannot place (names the flag and what to do)."""


def gpus_per_pipeline(devices: list[str | None], gpus_in_cluster: float, placement: str | None = None) -> int:
    """GPUs one pipeline holds. two-gpu: 2; same-gpu: 1; none when the workers run on the CPU or the cluster
    has no GPU. Without a named placement it follows the worker devices: cuda:1 anywhere means two."""
    if placement == "two-gpu":
        return 2
    if any(d == "cpu" for d in devices) and all(d in ("cpu", None) for d in devices):
        return 0
    if not gpus_in_cluster:
        return 0
    if placement == "same-gpu":
        return 1
    indices = [int(d.split(":", 1)[1]) for d in devices if d and d.startswith("cuda:") and d[5:].isdigit()]
    return max(indices, default=0) + 1


def choose_pipelines(requested: int | None, *, cpus: float, gpus: float, gpus_each: int) -> tuple[int, str]:
    """(pipeline count, how it was chosen). On GPUs: one pipeline per `gpus_each` GPUs. On a CPU-only
    cluster each pipeline runs two busy worker processes, so the default is one pipeline per two CPUs (at
    least one), and at most one per CPU (each pipeline's actor reserves one CPU)."""
    if gpus_each:
        fit = int(gpus // gpus_each)
        why = f"{int(gpus)} GPU(s) in the cluster, {gpus_each} per pipeline"
        if fit < 1:
            raise PlanError(f"--ray: the cluster has {int(gpus)} GPU(s), one pipeline needs {gpus_each}; "
                            "add GPUs or use --placement same-gpu / --device cpu")
    else:
        fit = int(cpus)
        why = f"{int(cpus)} CPU(s) in the cluster, no GPU used: one pipeline per 2 CPUs (two worker processes each)"
        if fit < 1:
            raise PlanError("--ray: the cluster reports no CPU to place a pipeline on")
    if requested is None:
        n = fit if gpus_each else max(1, fit // 2)
        return n, f"{n} pipeline(s): {why}"
    if requested > fit:
        unit = f"{gpus_each} GPU(s)" if gpus_each else "1 CPU"
        raise PlanError(f"--pipelines {requested}: each pipeline needs {unit} and the cluster has room for {fit} "
                        f"({why}); ask for at most {fit}")
    return requested, f"{requested} pipeline(s) as asked (--pipelines); room for {fit}: {why}"


@dataclass
class WorkQueue:
    """Samples waiting, running (on which pipeline) and finished. A pipeline takes the next sample only
    when it has none running, so a slow pipeline simply takes fewer. A sample whose pipeline died goes
    back to the front of the queue; after MAX_ATTEMPTS deaths it is given up (`failed`)."""
    pending: deque = field(default_factory=deque)
    running: dict = field(default_factory=dict)       # item -> pipeline
    done: set = field(default_factory=set)
    attempts: dict = field(default_factory=dict)      # item -> pipelines that died running it
    failed: dict = field(default_factory=dict)        # item -> reason

    @classmethod
    def of(cls, items) -> "WorkQueue":
        return cls(pending=deque(items))

    def take(self, pipeline) -> object | None:
        if not self.pending or pipeline in self.running.values():
            return None
        item = self.pending.popleft()
        self.running[item] = pipeline
        return item

    def finish(self, item, pipeline) -> bool:
        """True when this result is the first for the item (a late duplicate is dropped)."""
        if self.running.get(item) == pipeline:
            del self.running[item]
        if item in self.done or item in self.failed:
            return False
        self.done.add(item)
        return True

    def pipeline_died(self, pipeline, reason: str) -> list:
        """Requeue what the pipeline was running; returns the items given up for good."""
        given_up = []
        for item in [i for i, p in self.running.items() if p == pipeline]:
            del self.running[item]
            self.attempts[item] = self.attempts.get(item, 0) + 1
            if self.attempts[item] >= MAX_ATTEMPTS:
                self.failed[item] = f"{self.attempts[item]} pipelines died running this sample; last: {reason}"
                given_up.append(item)
            else:
                self.pending.appendleft(item)
        return given_up

    @property
    def finished(self) -> bool:
        return not self.pending and not self.running


def finished_samples(records: list[dict], modes: list[str]) -> set[str]:
    """Sample ids with an ok record for every mode: what --resume skips (failed samples run again)."""
    have: dict[str, set] = {}
    for r in records:
        if r.get("status") == "ok":
            have.setdefault(r.get("sample_id"), set()).add(r.get("mode"))
    return {s for s, got in have.items() if set(modes) <= got}


def progress_line(done: int, total: int, per_pipeline: dict, now_s: float, started_s: float) -> str:
    """'12/40 samples · p0 0.52/s, p1 0.47/s · ETA 54 s'. per_pipeline: name -> (samples done, since_s).
    The ETA divides what is left by the sum of the pipelines' rates (rates of pipelines still running)."""
    rates = {name: n / max(1e-9, now_s - since) for name, (n, since) in per_pipeline.items()}
    total_rate = sum(rates.values())
    left = total - done
    if left <= 0:
        eta = "done"
    elif total_rate > 0:
        eta = f"ETA {_duration(left / total_rate)}"
    else:
        eta = "ETA —"
    parts = ", ".join(f"{name} {rate:.2f}/s" for name, rate in rates.items())
    return f"{done}/{total} samples · {parts or 'starting'} · {eta} · {_duration(now_s - started_s)} elapsed"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


STAMP_KEYS = ("sent_ns", "recv_ns", "start_ns", "end_ns", "request_start_ns", "request_end_ns")


def shift_stamps(item: dict, offset_ns: int) -> dict:
    """A record or event with its monotonic stamps moved onto the driver's clock (other hosts' monotonic
    clocks have other origins); offset 0 returns it unchanged."""
    if not offset_ns:
        return item
    return {k: (v + offset_ns if k in STAMP_KEYS and isinstance(v, int) else v) for k, v in item.items()}


def trace_events(events: list[dict]) -> list[dict]:
    """Events renamed so each pipeline's processes form their own group in trace.json: proc/src/dst
    'draft' of pipeline 1 becomes 'p1 draft'."""
    out = []
    for e in events:
        p = e.get("pipeline")
        if p is None:
            out.append(e)
            continue
        e = dict(e)
        for key in ("proc", "src", "dst"):
            if e.get(key):
                e[key] = f"p{p} {e[key]}"
        out.append(e)
    return out
