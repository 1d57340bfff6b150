"""N pipeline actors fed from one shared WorkQueue, results handed back one item at a time as they arrive.

Used by `run --ray` and `adapter collect --ray`. Owns the dispatch loop: each ready pipeline gets the next
item when it has none running; a pipeline that dies (its actor or node lost, or it raised PipelineBroken)
has its item requeued for another and is replaced (up to MAX_REPLACEMENTS per slot); when no pipeline is
left and none can be started within the startup timeout the run fails with the last reason. Never imports
torch; the caller writes results (this module keeps none).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .plan import WorkQueue, progress_line

MAX_REPLACEMENTS = 2
PROGRESS_EVERY_S = 5.0


class AllPipelinesDied(RuntimeError):
    pass


@dataclass
class Slot:
    index: int
    actor: object = None
    state: str = "starting"            # starting | ready | dead
    since_s: float = 0.0
    info: dict = field(default_factory=dict)
    done: int = 0
    replacements: int = 0
    last_error: str = ""


class PipelinePool:
    def __init__(self, cluster, actor_class, make_args, n: int, *, num_cpus: float, num_gpus: float,
                 startup_timeout_s: float, say, warn, on_started=None):
        self.cluster, self.ray = cluster, cluster.ray
        self.remote_class = self.ray.remote(actor_class).options(num_cpus=num_cpus, num_gpus=num_gpus,
                                                                 max_concurrency=2, max_restarts=0)
        self.make_args = make_args
        self.startup_timeout_s = startup_timeout_s
        self.say, self.warn, self.on_started = say, warn, on_started
        self.slots = [Slot(i) for i in range(n)]
        self.refs: dict = {}            # ObjectRef -> (kind, slot index, item)
        self.started_s = time.monotonic()
        self.first_dispatch_s: float | None = None
        self.ever_ready = False
        self.last_result_s: float | None = None
        for slot in self.slots:
            self._start(slot)

    def _start(self, slot: Slot) -> None:
        slot.actor = self.remote_class.remote(*self.make_args(slot.index))
        self.cluster.actors.append(slot.actor)
        slot.state, slot.since_s = "starting", time.monotonic()
        self.refs[slot.actor.start.remote()] = ("start", slot.index, None)

    def run(self, queue: WorkQueue, method: str, payload, on_result, total: int, done_before: int = 0) -> None:
        """Until the queue is finished: dispatch payload(item) to `method` of ready pipelines, call
        on_result(item, slot, value) for each first result of an item."""
        last_progress = time.monotonic()
        while not queue.finished:
            if not self.refs or all(s.state == "dead" for s in self.slots):
                raise AllPipelinesDied(self._dead_reason())
            ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=1.0)
            for ref in ready:
                kind, index, item = self.refs.pop(ref)
                slot = self.slots[index]
                try:
                    value = self.ray.get(ref)
                except Exception as exc:            # the actor died, its node was lost, or it raised
                    self._lost(slot, queue, _reason(exc), ready_before=kind != "start")
                    continue
                if kind == "start":
                    slot.state, slot.info, slot.since_s = "ready", value, time.monotonic()
                    self.ever_ready = True
                    self.say(f"pipeline {index} ready on {value.get('node')} (pid {value.get('pid')}, "
                             f"CUDA_VISIBLE_DEVICES={value.get('cuda_visible_devices')}, MPS {value.get('mps')})")
                    if self.on_started:
                        self.on_started(slot)
                elif queue.finish(item, index):
                    slot.done += 1
                    self.last_result_s = time.monotonic()
                    on_result(item, slot, value)
            for slot in self.slots:            # requeued samples go to whichever pipeline is idle
                self._dispatch(slot, queue, method, payload)
            self._check_startup()
            if time.monotonic() - last_progress > PROGRESS_EVERY_S or (ready and queue.finished):
                last_progress = time.monotonic()
                self.say(self.progress(done_before + len(queue.done), total))

    def _dispatch(self, slot: Slot, queue: WorkQueue, method: str, payload) -> None:
        if slot.state != "ready":
            return
        item = queue.take(slot.index)
        if item is None:
            return
        if self.first_dispatch_s is None:
            self.first_dispatch_s = time.monotonic()
        self.refs[getattr(slot.actor, method).remote(payload(item))] = ("item", slot.index, item)

    def _lost(self, slot: Slot, queue: WorkQueue, reason: str, ready_before: bool) -> None:
        slot.last_error = reason
        given_up = queue.pipeline_died(slot.index, reason)
        self.warn(f"pipeline {slot.index} lost: {reason}" + (
            f"; its sample goes back to the queue" if not given_up else f"; giving up on {given_up}"))
        for item in given_up:
            self.on_given_up(item, queue.failed[item])
        try:
            self.ray.kill(slot.actor)
        except Exception:
            pass
        # a pipeline that never became ready would fail the same way again: replace only working ones
        if ready_before and slot.replacements < MAX_REPLACEMENTS and not queue.finished:
            slot.replacements += 1
            self.say(f"pipeline {slot.index}: starting a replacement ({slot.replacements}/{MAX_REPLACEMENTS})")
            self._start(slot)
        else:
            slot.state = "dead"

    def on_given_up(self, item, reason: str) -> None:      # set by the caller
        pass

    def _check_startup(self) -> None:
        """No ready pipeline and every starting one waited past the startup timeout: fail."""
        now = time.monotonic()
        if any(s.state == "ready" for s in self.slots):
            return
        starting = [s for s in self.slots if s.state == "starting"]
        if starting and all(now - s.since_s > self.startup_timeout_s for s in starting):
            raise AllPipelinesDied(f"no pipeline became ready within {self.startup_timeout_s:g} s (does the "
                                   "cluster have the free GPUs/CPUs? raise --startup-timeout if loading is slow)"
                                   + (f"; last error: {self._dead_reason()}" if self._dead_reason() else ""))

    def _dead_reason(self) -> str:
        errors = [f"pipeline {s.index}: {s.last_error}" for s in self.slots if s.last_error]
        return "; ".join(errors) or "every pipeline stopped"

    def progress(self, done: int, total: int) -> str:
        per = {f"p{s.index}": (s.done, s.since_s) for s in self.slots if s.state == "ready"}
        return progress_line(done, total, per, time.monotonic(), self.started_s)

    def throughput(self, n_items: int) -> dict:
        """Items per second from the first dispatch to the last result (start-up excluded), and the run."""
        span = (self.last_result_s - self.first_dispatch_s) if self.first_dispatch_s and self.last_result_s else None
        return {"items": n_items, "dispatch_to_last_result_s": span,
                "items_per_s": n_items / span if span else None,
                "start_to_last_result_s": (self.last_result_s - self.started_s) if self.last_result_s else None}


def _reason(exc: Exception) -> str:
    """The actor's own error message when it raised; Ray's summary when the actor or node died."""
    cause = getattr(exc, "cause", None)
    text = str(cause) if cause is not None else str(exc)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if cause is None and lines:
        # Ray's death messages are long; the first lines say what happened
        return " ".join(lines[:3])[:500]
    return text.strip()[:2000]
