"""`coordinator bench --ray`: the benchmark plan spread over N pipelines, one bench folder as without Ray.

Placements and MPS settings are still measured one after the other (a two-gpu pipeline holds two GPUs, so
the pipelines of each configuration are started for it and stopped after it). Within one configuration
every (length, sample) is one item of the shared queue, run by coordinator.bench.sample_records on
whichever pipeline is free; each pipeline warms up before it takes work; the draft-alone measurements are
items too. Records are tagged with pipeline and node, appended to records.jsonl as they arrive, and
bench.json / bench.md / plots are written after each configuration and on every exit. Never imports torch.
"""
from __future__ import annotations

import os
import platform
import signal
import sys
import time

from .. import bench as single
from ..session import RequestFailed, StartupError
from ..signals import Interrupted
from .driver import RECORDS, append_jsonl, rewrite_jsonl
from .pipeline import Pipeline
from .plan import WorkQueue, choose_pipelines, gpus_per_pipeline, shift_stamps
from .pool import AllPipelinesDied, PipelinePool
from .ray_cluster import RayCluster


class BenchPipeline(Pipeline):
    """A pipeline for one (placement, MPS) configuration of a bench."""

    def __init__(self, cfg, placement: str, mps: str, index: int, log_dir: str, warmup_sample: dict, cwd: str):
        super().__init__(cfg, index, log_dir, cwd)
        self.placement, self.mps, self.warmup_sample = placement, mps, warmup_sample

    def start(self) -> dict:
        from coordinator.session import WorkerSpec

        cfg = self.cfg
        specs = [WorkerSpec(s.role, s.backend, single.placement_devices(s, self.placement, cfg.user_devices),
                            s.endpoint, {}) for s in (cfg.draft, cfg.target)]
        with self._lock:
            self._open(specs, self.mps == "on", cfg.draft_sm_percent, cfg.target_sm_percent,
                       startup_timeout_s=cfg.startup_timeout_s, request_timeout_s=cfg.request_timeout_s)
            try:
                single.warm_up(self.session, cfg, self.warmup_sample, self.mps, self.placement)
            except BaseException:
                self._close_locked()
                raise
            self.session.events = []              # warm-up is not measured
            return self.describe()

    def run_sample(self, item: dict) -> dict:
        if item["kind"] == "draft-alone":
            def alone(session):
                try:
                    return {"draft_alone": single.draft_alone_record(session, self.cfg, item["sample"], self.mps,
                                                                     self.placement)}
                except RequestFailed as exc:      # reported, not measured (as without --ray)
                    return {"draft_alone_error": f"{item['sample']['sample_id']} draft alone: {exc}"}
            return self._run(alone)
        return self._run(lambda session: {"records": list(single.sample_records(
            session, self.cfg, item["sample"], item["n"], self.mps, self.placement))})


def run_bench_on_ray(cfg, *, address: str, pipelines: int | None) -> int:
    say = lambda text: print(text, file=sys.stderr, flush=True)    # noqa: E731 (bench always reports)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    samples = single.load_samples(cfg)
    records: list[dict] = []
    draft_alone: list[dict] = []
    events: list[dict] = []
    run_info: dict = {}
    ray_info: dict = {"address": address, "host": platform.node(), "configurations": {}}
    failure, code = None, 0
    rewrite_jsonl(cfg.output_dir / RECORDS, [])
    try:
        with RayCluster(address) as cluster:
            cpus, gpus = cluster.resources()
            for placement in cfg.placements:
                for mps in cfg.mps:
                    try:
                        _one_configuration(cluster, cfg, samples, placement, mps, pipelines, cpus, gpus,
                                           records, draft_alone, events, run_info, ray_info, say)
                    finally:
                        cluster.stop_actors()          # free the GPUs for the next configuration
                        write(cfg, records, draft_alone, events, run_info, ray_info, failure)
    except AllPipelinesDied as exc:
        failure, code = f"every pipeline died: {exc}", 3
    except (StartupError, ConnectionError, ValueError) as exc:
        failure, code = f"startup failed: {exc}", 4
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        failure, code = f"interrupted by {signal.Signals(signum).name}: every pipeline stopped", 128 + signum
    if failure:
        say(f"error: {failure}")
    write(cfg, records, draft_alone, events, run_info, ray_info, failure)
    return code


def write(cfg, records, draft_alone, events, run_info, ray_info, failure) -> None:
    """The one-pipeline bench writer, then the pipelines: "ray" in bench.json, a section in bench.md."""
    import json
    import os
    single._write(cfg, records, draft_alone, events, run_info, failure)
    path = cfg.output_dir / "bench.json"
    data = json.loads(path.read_text())
    data["ray"] = ray_info
    tmp = path.with_name("bench.json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
    lines = ["", "## Pipelines (--ray)", "", "| configuration | pipelines | how chosen | items | items/s "
             "(first dispatch → last result) | items per pipeline |", "|---|---|---|---|---|---|"]
    for key, conf in ray_info["configurations"].items():
        tp = conf.get("throughput") or {}
        rate = f"{tp['items_per_s']:.3f}" if tp.get("items_per_s") else "—"
        lines.append(f"| {key} | {conf['pipelines']} | {conf['how_chosen']} | {tp.get('items', '—')} | {rate} | "
                     f"{conf.get('items_per_pipeline', '—')} |")
    with (cfg.output_dir / "bench.md").open("a") as handle:
        handle.write("\n".join(lines) + "\n")


def _one_configuration(cluster, cfg, samples, placement, mps, pipelines, cpus, gpus, records, draft_alone, events,
                       run_info, ray_info, say) -> None:
    devices = [cfg.draft.options.get("device"), cfg.target.options.get("device")]
    each = gpus_per_pipeline(devices, gpus, placement if gpus else None)
    n, why = choose_pipelines(pipelines, cpus=cpus, gpus=gpus, gpus_each=each)
    items = [{"kind": "sample", "n": length, "sample": s} for length in cfg.max_new_tokens for s in samples]
    items += [{"kind": "draft-alone", "sample": s} for s in samples[: min(3, len(samples))]]
    key = f"{placement}_mps_{mps}"
    say(f"[{placement}, mps {mps}] --ray: {why}; running {n} for {len(items)} item(s)")
    conf = ray_info["configurations"][key] = {"pipelines": n, "how_chosen": why, "gpus_per_pipeline": each,
                                                     "pipeline_info": {}}
    offsets: dict[int, int] = {}
    results: dict[int, dict] = {}

    def started(slot):
        info = dict(slot.info)
        offsets[slot.index] = (0 if info["node"] == platform.node() else time.monotonic_ns() - info["monotonic_ns"])
        info.pop("monotonic_ns", None)
        conf["pipeline_info"][str(slot.index)] = info
        run_info.setdefault(key, {r: {"model_id": info["models"][r], "device": info["device"][r],
                                      "synthetic": info["synthetic"], "info": info["worker_info"][r],
                                      "memory_at_ready": info["memory_at_ready"][r]} for r in info["models"]})

    def on_result(item, slot, value):
        off = offsets.get(slot.index, 0)
        value["records"] = [shift_stamps(r, off) for r in value["records"]]
        append_jsonl(cfg.output_dir / RECORDS, value["records"])
        results[item] = value
        records.extend(value["records"])
        events.extend(shift_stamps(e, off) for e in single._tagged(value["events"], placement, mps))
        if "draft_alone_error" in value:
            say(f"  ERROR {value['draft_alone_error']}")
        if "draft_alone" in value:
            draft_alone.append(dict(value["draft_alone"], pipeline=slot.index, node=slot.info.get("node")))

    log_root = cfg.output_dir / f"logs-{placement}-mps-{mps}"
    pool = PipelinePool(cluster, BenchPipeline,
                        lambda i: (cfg, placement, mps, i, str(log_root / f"pipeline-{i}"), samples[0], os.getcwd()), n,
                        num_cpus=1, num_gpus=each, startup_timeout_s=cfg.startup_timeout_s, say=say, warn=say,
                        on_started=started)
    pool.on_given_up = lambda item, reason: say(f"[{placement}, mps {mps}] gave up on item {item}: {reason}")
    pool.run(WorkQueue.of(range(len(items))), "run_sample", lambda i: items[i], on_result, total=len(items))
    conf["throughput"] = pool.throughput(len(results))
    conf["items_per_pipeline"] = {str(s.index): s.done for s in pool.slots}
