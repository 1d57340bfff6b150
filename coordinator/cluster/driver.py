"""`coordinator run --ray`: the samples of one run spread over N pipelines, one output folder as without Ray.

Owns: discovery (as `run`), resume (`--resume DIR`: samples with an ok record for every mode are kept and
skipped), and the outputs through coordinator.outputs.RunOutputs, as a one-pipeline run writes them: each
sample's records go to records.jsonl and its events to events.jsonl / trace.json the moment they arrive,
results.json every few seconds and at the end, records in sample order and tagged with the pipeline and node
that ran them; trace.json has one process group per pipeline (`p0 draft`, ...). The order and content of
records do not depend on which pipeline ran what (timings aside). Never imports torch.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

from .. import reports
from ..outputs import RunOutputs, json_default
from ..reports.trace import EventFiles
from ..runner import (EXIT_OK, EXIT_SAMPLE_FAILED, EXIT_STARTUP, EXIT_WORKER_DIED, RunConfig, default_output_dir,
                      discover, failed_modes)
from ..session import StartupError
from ..signals import Interrupted, SignalGuard
from .pipeline import Pipeline
from .plan import WorkQueue, choose_pipelines, finished_samples, gpus_per_pipeline, shift_stamps, trace_events
from .pool import AllPipelinesDied, PipelinePool
from .ray_cluster import RayCluster

RECORDS = "records.jsonl"
EVENTS = "events.jsonl"


class SampleFailed(Exception):
    """A sample failed under --on-error fail: the run stops (every pipeline with it)."""


class PipelineEvents(EventFiles):
    """events.jsonl as recorded (proc draft/target/coordinator, tagged with pipeline and node: the timeline
    reads it), trace.json with each pipeline's processes renamed `pN draft` ... so they group."""

    def add(self, events) -> None:
        events = list(events)
        for event in events:
            self.jsonl.write(json.dumps(event, default=json_default) + "\n")
        self.jsonl.flush()
        self.trace.add(trace_events(events))


def read_jsonl(path: Path) -> list[dict]:
    """Lines of a JSONL file; a torn last line (the run was killed while writing it) is ignored."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_jsonl(path: Path, items: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item, default=json_default) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def rewrite_jsonl(path: Path, items: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(i, default=json_default) + "\n" for i in items))
    os.replace(tmp, path)


def previous_results(out_dir: Path, modes: list[str]) -> tuple[list[dict], list[dict], set[str]]:
    """(records, events, finished sample ids) of an earlier run in out_dir that --resume keeps."""
    records = read_jsonl(out_dir / RECORDS)
    if not records and (out_dir / "results.json").is_file():      # records.jsonl lost: results.json has them
        records = json.loads((out_dir / "results.json").read_text()).get("records", [])
    finished = finished_samples(records, modes)
    keep = [r for r in records if r.get("sample_id") in finished]
    events = [e for e in read_jsonl(out_dir / EVENTS) if e.get("sample_id") in finished]
    return keep, events, finished


def run_on_ray(cfg: RunConfig, *, address: str, pipelines: int | None, resume: str | None) -> int:
    guard = SignalGuard().install()     # until Ray is up (then RayCluster's own guard takes over)
    try:
        return _run_on_ray(cfg, address, pipelines, resume, guard)
    except Interrupted as exc:          # while discovering samples: nothing started
        print(f"interrupted by {exc.args[0]} before the run started", file=sys.stderr)
        return 128 + exc.signum
    finally:
        guard.restore()


def _run_on_ray(cfg: RunConfig, address: str, pipelines: int | None, resume: str | None, guard) -> int:
    if resume:
        out_dir = Path(resume)
        if not out_dir.is_dir():
            raise StartupError(f"--resume {resume}: no such folder; give the --output-dir of the run to resume")
    else:
        out_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir()
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    def warn(*a):
        print(*a, file=sys.stderr, flush=True)

    cluster = RayCluster(address)            # before any output: without Ray, say how to install it
    samples, bad = discover(cfg)
    if not samples and not (bad and cfg.on_error == "fail"):
        raise StartupError(f"no usable samples in {cfg.input}" + (f" ({len(bad)} bad)" if bad else ""))
    kept, kept_events, finished = previous_results(out_dir, cfg.modes) if resume else ([], [], set())
    def deferred():                  # the guard in charge: RayCluster's while Ray is up, else this command's
        return (cluster.guard or guard).deferred()
    outputs = RunOutputs(out_dir, cfg.command, defer_signals=deferred, events=PipelineEvents(out_dir))
    for record in kept:                      # first, so a later --resume may trust them again
        outputs.add(record)
    outputs.events.add(kept_events)
    for b in bad:
        warn(f"skipping sample {b['sample_id']}: {b['error']}")
        for mode in cfg.modes:
            outputs.add({"sample_id": b["sample_id"], "mode": mode, "status": "error", "error": b["error"]})
    ray_info: dict = {"address": address, "pipelines": 0}
    outputs.run_info = {"host": platform.node(), "python": platform.python_version(), "modes": cfg.modes,
                        "max_new_tokens": cfg.max_new_tokens}
    if bad and cfg.on_error == "fail":
        warn(f"error: {len(bad)} bad sample(s) and --on-error fail")
        return finish(outputs, ray_info, samples, cfg, "stopped at the first error (--on-error fail)",
                      "input error", EXIT_SAMPLE_FAILED)
    if resume:
        say(f"--resume {out_dir}: {len(finished)} sample(s) finished before, skipped")
    todo = [i for i, s in enumerate(samples) if s["sample_id"] not in finished]
    if not todo:
        say("nothing left to run")
        return finish(outputs, ray_info, samples, cfg, "completed (nothing left to run)", None, EXIT_OK)
    ended, failure, exit_code = "completed", None, EXIT_OK
    pool = None
    started = time.monotonic()
    guard.raising = False               # from here a signal before Ray is up is noted, and acted on below
    try:
        with cluster:
            pool = _run_pipelines(cluster, cfg, samples, todo, len(finished), pipelines, outputs, ray_info,
                                  out_dir, say, warn)
    except SampleFailed as exc:
        ended, failure, exit_code = f"stopped at the first error (--on-error fail): {exc}", str(exc), EXIT_SAMPLE_FAILED
    except AllPipelinesDied as exc:
        never_ready = pool is None or not pool.ever_ready
        failure = f"{'no pipeline could start' if never_ready else 'every pipeline died'}: {exc}"
        ended, exit_code = failure.splitlines()[0], (EXIT_STARTUP if never_ready else EXIT_WORKER_DIED)
    except (StartupError, ConnectionError, ValueError) as exc:
        failure, exit_code = f"startup failed: {exc}", EXIT_STARTUP
        ended = failure.splitlines()[0]
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        ended = failure = f"interrupted by {signal.Signals(signum).name}: every pipeline stopped"
        exit_code = 128 + signum
    noted = [g.signum for g in (guard, cluster.guard) if g is not None and g.signum is not None]
    if noted and exit_code == EXIT_OK:
        ended += f" ({signal.Signals(noted[0]).name} arrived while starting or stopping)"
        exit_code = 128 + noted[0]
    ray_info["run_s"] = time.monotonic() - started
    if failure:
        warn(f"error: {failure}")
    if exit_code == EXIT_OK and failed_modes(outputs.records):
        ended = f"completed, but every request of mode {', '.join(failed_modes(outputs.records))} failed"
        exit_code = EXIT_SAMPLE_FAILED
    return finish(outputs, ray_info, samples, cfg, ended, failure, exit_code)


def _run_pipelines(cluster, cfg, samples, todo, done_before, pipelines, outputs, ray_info, out_dir, say, warn):
    cpus, gpus = cluster.resources()
    devices = [cfg.draft.options.get("device"), cfg.target.options.get("device")]
    each = gpus_per_pipeline(devices, gpus)
    n, why = choose_pipelines(pipelines, cpus=cpus, gpus=gpus, gpus_each=each)
    n = min(n, len(todo))
    say(f"--ray {cluster.address}: {why}; running {n} for {len(todo)} sample(s)")
    ray_info.update(pipelines=n, how_chosen=why, gpus_per_pipeline=each, cluster_cpus=cpus, cluster_gpus=gpus,
                    pipeline_info={})
    offsets: dict[int, int] = {}

    def started(slot):
        info = dict(slot.info)
        # other hosts' monotonic clocks have other origins: estimate the offset when the pipeline starts
        offsets[slot.index] = 0 if info["node"] == platform.node() else time.monotonic_ns() - info["monotonic_ns"]
        info.pop("monotonic_ns", None)
        ray_info["pipeline_info"][str(slot.index)] = info
        for key in ("backends", "models", "device", "synthetic"):
            outputs.run_info.setdefault(key, info.get(key))
        if info.get("vocab_warning"):
            warn(info["vocab_warning"])
            outputs.run_info["vocab_warning"] = info["vocab_warning"]

    def on_result(item, slot, value):
        off = offsets.get(slot.index, 0)
        for rec in value["records"]:
            outputs.add(shift_stamps(rec, off))          # records.jsonl at once: nothing finished is lost
        outputs.events.add(shift_stamps(e, off) for e in value["events"])
        for rec in value["records"]:
            if rec.get("status") != "ok":
                warn(f"sample {rec['sample_id']} ({rec['mode']}) failed on pipeline {slot.index}: {rec.get('error')}")
                if cfg.on_error == "fail":
                    raise SampleFailed(f"sample {rec['sample_id']} ({rec['mode']}) failed: {rec.get('error')}")

    def given_up(item, reason):
        for mode in cfg.modes:
            outputs.add({"sample_id": samples[item]["sample_id"], "mode": mode, "status": "error", "error": reason})

    cwd = os.getcwd()
    pool = PipelinePool(cluster, Pipeline, lambda i: (cfg, i, str(out_dir / "logs" / f"pipeline-{i}"), cwd), n,
                        num_cpus=1, num_gpus=each, startup_timeout_s=cfg.startup_timeout_s, say=say, warn=warn,
                        on_started=started)
    pool.on_given_up = given_up
    queue = WorkQueue.of(todo)
    try:
        pool.run(queue, "run_sample", lambda i: samples[i], on_result, total=done_before + len(todo),
                 done_before=done_before)
    finally:
        ray_info["throughput"] = pool.throughput(len(queue.done))
        ray_info["samples_per_pipeline"] = {str(s.index): s.done for s in pool.slots}
    return pool


def finish(outputs: RunOutputs, ray_info: dict, samples, cfg: RunConfig, ended: str, failure, exit_code: int) -> int:
    """results.json, summary.md, timeline.png as a one-pipeline run writes them (records in sample order),
    then the pipelines: the full run_info.ray into results.json and a section of summary.md."""
    outputs.records.sort(key=_sample_order(samples, cfg.modes))
    if ray_info.get("pipelines"):
        outputs.run_info["pipelines"] = f"{ray_info['pipelines']} on Ray ({ray_info.get('address')})"
    agg = outputs.finish(ended=ended, failure=failure)
    path = outputs.out_dir / "results.json"
    results = json.loads(path.read_text())
    results["run_info"]["ray"] = ray_info
    tmp = path.with_name("results.json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=json_default))
    os.replace(tmp, path)
    with (outputs.out_dir / "summary.md").open("a", encoding="utf-8") as handle:
        handle.write("\n".join(pipelines_section(ray_info, outputs.records)) + "\n")
    if not cfg.quiet:
        if any(r.get("status") == "ok" for r in outputs.records):
            print(reports.format_table(agg))
        tp = ray_info.get("throughput") or {}
        if tp.get("items_per_s"):
            print(f"{tp['items']} sample(s) on {ray_info.get('pipelines')} pipeline(s): "
                  f"{tp['items_per_s']:.3f} samples/s (first dispatch to last result)")
        print(f"outputs in {outputs.out_dir}/ (results.json, records.jsonl, summary.md, events.jsonl, trace.json, "
              "timeline.png)")
    return exit_code


def _sample_order(samples: list[dict], modes: list[str]):
    order = {s["sample_id"]: i for i, s in enumerate(samples)}
    mode_order = {m: i for i, m in enumerate(modes)}
    return lambda r: (order.get(r.get("sample_id"), -1), mode_order.get(r.get("mode"), 99))


def pipelines_section(ray_info: dict, records: list[dict]) -> list[str]:
    lines = ["", "## Pipelines (--ray)", ""]
    if not ray_info.get("pipelines"):
        return lines + ["No pipeline ran in this invocation."]
    lines += [f"{ray_info['how_chosen']}.", ""]
    samples: dict = {}
    for r in records:
        if r.get("pipeline") is not None:
            samples.setdefault(r["pipeline"], set()).add(r.get("sample_id"))
    lines += ["| pipeline | node | CUDA_VISIBLE_DEVICES | MPS | devices | samples in results |", "|---|---|---|---|---|---|"]
    for key, info in sorted(ray_info.get("pipeline_info", {}).items(), key=lambda kv: int(kv[0])):
        devices = ", ".join(f"{r}: {d}" for r, d in (info.get("device") or {}).items())
        lines.append(f"| {key} | {info.get('node')} | {info.get('cuda_visible_devices') or '—'} | "
                     f"{'on' if info.get('mps') else 'off'} | {devices} | {len(samples.get(int(key), ()))} |")
    tp = ray_info.get("throughput") or {}
    if tp.get("items_per_s"):
        lines += ["", f"Throughput: {tp['items']} sample(s) in {tp['dispatch_to_last_result_s']:.2f} s from the first "
                      f"sample dispatched to the last result: {tp['items_per_s']:.3f} samples/s "
                      f"({tp['start_to_last_result_s']:.2f} s including the pipelines' start-up)."]
    return lines
