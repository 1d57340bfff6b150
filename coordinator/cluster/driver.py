"""`coordinator run --ray`: the samples of one run spread over N pipelines, one output folder as without Ray.

Owns: discovery (as `run`), resume (`--resume DIR`: samples with an ok record for every mode are kept and
skipped), writing each sample's records to `records.jsonl` and its events to `events.jsonl` the moment they
arrive (a crash or signal loses nothing that finished), and at the end the same results.json / summary.md /
events.jsonl / trace.json / timeline.png as a one-pipeline run, records in sample order and tagged with the
pipeline and node that ran them. The order and content of records do not depend on which pipeline ran what
(timings aside). Never imports torch.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from .. import reports
from ..runner import (EXIT_INTERRUPTED, EXIT_OK, EXIT_SAMPLE_FAILED, EXIT_STARTUP, EXIT_WORKER_DIED, RunConfig,
                      _write_outputs, default_output_dir, discover)
from ..session import StartupError
from .pipeline import Pipeline
from .plan import WorkQueue, choose_pipelines, finished_samples, gpus_per_pipeline, shift_stamps, trace_events
from .pool import AllPipelinesDied, PipelinePool
from .ray_cluster import RayCluster

RECORDS = "records.jsonl"


class SampleFailed(Exception):
    """A sample failed under --on-error fail: the run stops (every pipeline with it)."""
EVENTS = "events.jsonl"


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
            handle.write(json.dumps(item, default=_json_default) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def rewrite_jsonl(path: Path, items: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(i, default=_json_default) + "\n" for i in items))
    os.replace(tmp, path)


def previous_results(out_dir: Path, modes: list[str]) -> tuple[list[dict], list[dict], set[str]]:
    """(records, events, finished sample ids) of an earlier run in out_dir that --resume keeps."""
    records = read_jsonl(out_dir / RECORDS)
    if not records and (out_dir / "results.json").is_file():      # a run that ended and wrote results.json
        records = json.loads((out_dir / "results.json").read_text()).get("records", [])
    finished = finished_samples(records, modes)
    keep = [r for r in records if r.get("sample_id") in finished]
    events = [e for e in read_jsonl(out_dir / EVENTS) if e.get("sample_id") in finished]
    return keep, events, finished


def run_on_ray(cfg: RunConfig, *, address: str, pipelines: int | None, resume: str | None) -> int:
    if resume:
        out_dir = Path(resume)
        if not out_dir.is_dir():
            raise StartupError(f"--resume {resume}: no such folder; give the --output-dir of the run to resume")
    else:
        out_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    def warn(*a):
        print(*a, file=sys.stderr, flush=True)

    samples, bad = discover(cfg)
    bad_records = [{"sample_id": b["sample_id"], "mode": mode, "status": "error", "error": b["error"]}
                   for b in bad for mode in cfg.modes]
    for b in bad:
        warn(f"skipping sample {b['sample_id']}: {b['error']}")
    if bad and cfg.on_error == "fail":
        _write_outputs(out_dir, cfg, bad_records, [], {}, "input error")
        warn(f"error: {len(bad)} bad sample(s) and --on-error fail")
        return EXIT_SAMPLE_FAILED
    if not samples:
        raise StartupError(f"no usable samples in {cfg.input}" + (f" ({len(bad)} bad)" if bad else ""))
    kept, events, finished = previous_results(out_dir, cfg.modes) if resume else ([], [], set())
    rewrite_jsonl(out_dir / RECORDS, kept)            # what a later --resume may trust
    rewrite_jsonl(out_dir / EVENTS, events)
    if resume:
        say(f"--resume {out_dir}: {len(finished)} sample(s) finished before, skipped")
    todo = [i for i, s in enumerate(samples) if s["sample_id"] not in finished]
    if not todo:
        say("nothing left to run")
        write_outputs(out_dir, cfg, _in_sample_order(bad_records + kept, samples, cfg.modes), events,
                      {"modes": cfg.modes, "ray": {"address": address, "pipelines": 0}}, None)
        return EXIT_OK
    new_records: dict[int, list[dict]] = {}
    queue = WorkQueue.of(todo)
    failure, exit_code = None, EXIT_OK
    run_info: dict = {"host": platform.node(), "python": platform.python_version(), "modes": cfg.modes,
                      "max_new_tokens": cfg.max_new_tokens}
    pool = None
    started = time.monotonic()
    try:
        with RayCluster(address, quiet=cfg.quiet) as cluster:
            cpus, gpus = cluster.resources()
            devices = [cfg.draft.options.get("device"), cfg.target.options.get("device")]
            each = gpus_per_pipeline(devices, gpus)
            n, why = choose_pipelines(pipelines, cpus=cpus, gpus=gpus, gpus_each=each)
            n = min(n, len(todo))
            say(f"--ray {address}: {why}; running {n} for {len(todo)} sample(s)")
            run_info["ray"] = {"address": address, "pipelines": n, "how_chosen": why, "gpus_per_pipeline": each,
                               "cluster_cpus": cpus, "cluster_gpus": gpus, "pipeline_info": {}}
            driver_node = platform.node()
            offsets: dict[int, int] = {}

            def started_cb(slot):
                info = dict(slot.info)
                # other hosts' monotonic clocks have other origins: estimate the offset at start
                offsets[slot.index] = (0 if info["node"] == driver_node
                                       else time.monotonic_ns() - info["monotonic_ns"])
                info.pop("monotonic_ns", None)
                run_info["ray"]["pipeline_info"][str(slot.index)] = info
                for key in ("backends", "models", "device", "synthetic"):
                    run_info.setdefault(key, info.get(key))
                if info.get("vocab_warning"):
                    warn(info["vocab_warning"])
                    run_info["vocab_warning"] = info["vocab_warning"]

            def on_result(item, slot, value):
                off = offsets.get(slot.index, 0)
                recs = [shift_stamps(r, off) for r in value["records"]]
                evs = [shift_stamps(e, off) for e in value["events"]]
                append_jsonl(out_dir / RECORDS, recs)       # first, so nothing finished is lost
                append_jsonl(out_dir / EVENTS, evs)
                new_records[item] = recs
                events.extend(evs)
                for rec in recs:
                    if rec.get("status") != "ok":
                        warn(f"sample {rec['sample_id']} ({rec['mode']}) failed on pipeline {slot.index}: "
                             f"{rec.get('error')}")
                        if cfg.on_error == "fail":
                            raise SampleFailed(f"sample {rec['sample_id']} ({rec['mode']}) failed and --on-error fail")

            cwd = os.getcwd()
            pool = PipelinePool(cluster, Pipeline, lambda i: (cfg, i, str(out_dir / "logs" / f"pipeline-{i}"), cwd), n,
                                num_cpus=1, num_gpus=each, startup_timeout_s=cfg.startup_timeout_s, say=say,
                                warn=warn, on_started=started_cb)
            pool.on_given_up = lambda item, reason: new_records.__setitem__(item, [
                {"sample_id": samples[item]["sample_id"], "mode": mode, "status": "error", "error": reason}
                for mode in cfg.modes])
            pool.run(queue, "run_sample", lambda i: samples[i], on_result, total=len(samples),
                     done_before=len(finished))
            run_info["ray"]["throughput"] = pool.throughput(len(queue.done))
            run_info["ray"]["samples_per_pipeline"] = {str(s.index): s.done for s in pool.slots}
    except SampleFailed as exc:
        failure, exit_code = str(exc), EXIT_SAMPLE_FAILED
    except AllPipelinesDied as exc:
        never_ready = pool is not None and not pool.ever_ready
        failure = f"{'no pipeline could start' if never_ready else 'every pipeline died'}: {exc}"
        exit_code = EXIT_STARTUP if never_ready else EXIT_WORKER_DIED
    except (StartupError, ConnectionError, ValueError) as exc:
        failure, exit_code = f"startup failed: {exc}", EXIT_STARTUP
    except KeyboardInterrupt:
        failure, exit_code = "interrupted (Ctrl-C or SIGTERM): every pipeline stopped", EXIT_INTERRUPTED
    run_info.setdefault("ray", {})["run_s"] = time.monotonic() - started
    if failure:
        warn(f"error: {failure}")
    records = bad_records + kept + [r for i in sorted(new_records) for r in new_records[i]]
    records = _in_sample_order(records, samples, cfg.modes)
    if exit_code == EXIT_OK and any(r.get("status") != "ok" for r in records) and cfg.on_error == "fail":
        exit_code = EXIT_SAMPLE_FAILED
    write_outputs(out_dir, cfg, records, events, run_info, failure)
    if not cfg.quiet:
        if any(r.get("status") == "ok" for r in records):
            print(reports.format_table(reports.aggregate(records)))
        tp = run_info["ray"].get("throughput") or {}
        if tp.get("items_per_s"):
            print(f"{tp['items']} sample(s) on {run_info['ray'].get('pipelines')} pipeline(s): "
                  f"{tp['items_per_s']:.3f} samples/s (first dispatch to last result)")
        print(f"outputs in {out_dir}/ (results.json, summary.md, events.jsonl, trace.json, timeline.png)")
    return exit_code


def _in_sample_order(records: list[dict], samples: list[dict], modes: list[str]) -> list[dict]:
    order = {s["sample_id"]: i for i, s in enumerate(samples)}
    mode_order = {m: i for i, m in enumerate(modes)}
    return sorted(records, key=lambda r: (order.get(r.get("sample_id"), -1), mode_order.get(r.get("mode"), 99)))


def write_outputs(out_dir: Path, cfg: RunConfig, records, events, run_info, failure) -> None:
    """The one-pipeline writer (summary.md says how many pipelines in one line), then the full
    run_info.ray into results.json, a pipelines section in summary.md, and trace.json again with one
    process group per pipeline."""
    events = sorted(events, key=lambda e: (e.get("pipeline", -1), _first_stamp(e)))
    ray_info = run_info.get("ray") or {}
    short = {k: v for k, v in run_info.items() if k != "ray"}
    if ray_info.get("pipelines"):
        short["pipelines"] = f"{ray_info['pipelines']} on Ray ({ray_info.get('address')})"
    _write_outputs(out_dir, cfg, records, events, short, failure)
    path = out_dir / "results.json"
    results = json.loads(path.read_text())
    results["run_info"]["ray"] = ray_info
    tmp = path.with_name("results.json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=_json_default))
    os.replace(tmp, path)
    with (out_dir / "summary.md").open("a", encoding="utf-8") as handle:
        handle.write("\n".join(pipelines_section(ray_info, records)) + "\n")
    reports.write_trace_json(out_dir / "trace.json", trace_events(events))


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


def _first_stamp(e: dict) -> int:
    return e.get("start_ns") or e.get("sent_ns") or 0


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
