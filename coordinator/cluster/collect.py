"""`coordinator adapter collect --ray`: adapter data collected by N pipelines into one data folder.

The plan (splits, resume, what is left) is workers.adapters.collect.plan_collection, the per-sample work is
its ModelPair.collect_sample, run inside each pipeline actor (the models load there, on the GPU Ray gave
it); this driver alone writes shards and index.json, in the same format, so `adapter train` reads the
folder unchanged. Records are flushed every FLUSH_RECORDS records or FLUSH_S seconds and on every exit
(Ctrl-C, SIGTERM, a lost pipeline); a resumed collection skips every record in the index. The driver never
imports torch (the actors do).
"""
from __future__ import annotations

import os
import platform
import sys
import time

from ..signals import Interrupted
from .plan import WorkQueue, choose_pipelines, gpus_per_pipeline
from .pool import AllPipelinesDied, PipelinePool
from .ray_cluster import RayCluster

FLUSH_RECORDS = 64
FLUSH_S = 60.0


class CollectPipeline:
    """One pipeline of a collection: both models in this actor process."""

    def __init__(self, settings: dict, index: int, cwd: str | None = None):
        from .pipeline import follow_driver_cwd
        follow_driver_cwd(cwd)
        self.settings, self.index = settings, index
        self.pair = None

    def start(self) -> dict:
        from pathlib import Path

        from workers.adapters.collect import ModelPair
        s = self.settings
        self.pair = ModelPair(s["draft_model"], s["target_model"], clip_path=s["clip_path"],
                              precision=s["precision"], device=s["device"])
        self.pair.write_target_head(Path(s["out"]))
        return {"pipeline": self.index, "node": platform.node(), "pid": os.getpid(), "config": self.pair.config,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "mps": False}

    def run_sample(self, item: dict) -> dict:
        """{"records", "truncated"} or {"error"} when the sample's inputs cannot be loaded."""
        from workers.inputs import InputError
        s = self.settings
        try:
            records, cut = self.pair.collect_sample(item["sample"], item["questions"], item["split"],
                                                    event_frames=s["event_frames"],
                                                    max_new_tokens=s["max_new_tokens"])
        except InputError as exc:
            return {"error": str(exc)}
        return {"records": records, "truncated": cut}

    def stop(self) -> bool:
        self.pair = None
        return True


def collect_on_ray(*, address: str, pipelines: int | None, settings: dict, plan_args: dict,
                   startup_timeout_s: float = 1800.0, quiet: bool = False) -> dict:
    """Like workers.adapters.collect.collect, spread over pipelines; returns its summary dict plus "ray".
    settings: draft_model, target_model, clip_path, precision, device, event_frames, max_new_tokens, out."""
    from workers.adapters.collect import SPLITS, _flush, plan_collection, summarize
    from workers.adapters.data import write_index

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    def warn(*a):
        print(*a, file=sys.stderr, flush=True)

    info: dict = {"address": address}
    state = {"truncated": 0, "new": 0, "flushed_s": time.monotonic(), "configured": False}
    pending: dict[str, list[dict]] = {s: [] for s in SPLITS}
    plan: dict = {}

    def flush(force=False):
        n = sum(len(v) for v in pending.values())
        if n and (force or n >= FLUSH_RECORDS or time.monotonic() - state["flushed_s"] > FLUSH_S):
            _flush(plan["out"], plan["index"], pending)
            state["flushed_s"] = time.monotonic()

    def on_started(slot):
        if not state["configured"]:
            plan["index"]["config"].update(slot.info["config"])
            write_index(plan["out"], plan["index"])
            state["configured"] = True

    def on_result(sample_id, slot, value):
        sample = plan["by_sample"][sample_id][0][0]
        if "error" in value:
            plan["index"]["bad"].append({"sample_id": sample_id, "error": value["error"]})
            warn(f"skipping sample {sample_id}: {value['error']}")
        else:
            pending[plan["split_of"][sample["sequence"]]] += value["records"]
            state["truncated"] += value["truncated"]
            state["new"] += len(plan["by_sample"][sample_id])
        flush()

    def payload(sample_id):
        group = plan["by_sample"][sample_id]
        sample = group[0][0]
        return {"sample": sample, "questions": [(q_i, q) for _, q_i, q in group],
                "split": plan["split_of"][sample["sequence"]]}

    failure = None
    try:
        with RayCluster(address) as cluster:
            cpus, gpus = cluster.resources()
            device = settings.get("device") or ("cuda" if gpus else "cpu")
            precision = settings.get("precision") or ("nf4" if device.startswith("cuda") else "fp32")
            settings = dict(settings, device=device, precision=precision)
            plan.update(plan_collection(**plan_args, precision=precision))
            settings["out"] = str(plan["out"])
            items = list(plan["by_sample"])
            if items:
                each = gpus_per_pipeline([device], gpus)
                n, why = choose_pipelines(pipelines, cpus=cpus, gpus=gpus, gpus_each=each)
                n = min(n, len(items))
                say(f"--ray {address}: {why}; running {n} for {len(items)} sample(s)")
                info.update(pipelines=n, how_chosen=why, device=device, precision=precision)
                pool = PipelinePool(cluster, CollectPipeline, lambda i: (settings, i, os.getcwd()), n, num_cpus=1, num_gpus=each,
                                    startup_timeout_s=startup_timeout_s, say=say, warn=warn, on_started=on_started)
                pool.on_given_up = lambda sid, reason: plan["index"]["bad"].append({"sample_id": sid, "error": reason})
                pool.run(WorkQueue.of(items), "run_sample", payload, on_result, total=len(items))
                info["throughput"] = pool.throughput(len(items))
                info["samples_per_pipeline"] = {str(s.index): s.done for s in pool.slots}
    except AllPipelinesDied as exc:
        failure = f"every pipeline died: {exc}"
    except (Interrupted, KeyboardInterrupt) as exc:
        name = exc.args[0] if isinstance(exc, Interrupted) else "SIGINT"
        failure = f"interrupted by {name}: every pipeline stopped; run again with the same --out to resume"
    finally:
        if plan:
            flush(force=True)
            if state["configured"]:
                write_index(plan["out"], plan["index"])
    if not plan:                     # interrupted before anything was planned
        return {"out": plan_args.get("out_dir"), "failure": failure, "ray": info}
    summary = summarize(plan, state["new"], state["truncated"])
    summary["ray"] = info
    summary["failure"] = failure
    return summary
