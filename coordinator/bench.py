"""`coordinator bench`: every decoding mode measured in one run on the same samples, with a benchmark
oracle setting the draft's acceptance, with and without MPS, and the contention between the two workers.
Longer than most modules because the sweep's sessions, warm-up, oracle settings and draft-alone runs share one loop; the report is in bench_report.py.

Owns the benchmark plan (warm-up, hf-generate, baseline, oracle sweep, draft alone), the aggregation
into per-configuration medians and paired speedups, and writing bench.json / bench.md / plots (presentation in
coordinator.bench_report, the ceiling and floor columns in coordinator.bench_model). Speedups are ratios of
walls measured in this run on the same sample; nothing is computed from constants. Never imports torch.
Longer than 300 lines because the plan and the aggregation over what the plan recorded read best side by side.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import bench_model, reports
from .bench_report import plot_speedup, render_markdown
from .mps import MpsDaemon, MpsError, unavailable_reason
from .reports.stats import median as _median, paired_speedup, percentile as _pct
from .runner import failed_modes
from .session import RequestFailed, Session, StartupError, WorkerDied, WorkerSpec
from .signals import Interrupted, SignalGuard


@dataclass
class BenchConfig:
    input: str
    output_dir: Path
    draft: WorkerSpec
    target: WorkerSpec
    samples: int = 10
    warmup: int = 1
    max_new_tokens: list = field(default_factory=lambda: [50, 200])
    alphas: list = field(default_factory=lambda: [0.0, 0.28, 0.5, 0.7, 0.9, 1.0])
    profiles: list = field(default_factory=lambda: ["seed"])
    modes: list = field(default_factory=lambda: ["parallel", "speculative"])
    mps: list = field(default_factory=lambda: ["on", "off"])
    hf_generate: bool = True
    ignore_eos: bool = True
    draft_alone_steps: int = 32
    k_max: int = 16
    adaptive: bool = True
    wait_for_drafts: int = 0
    pipeline: str = "auto"            # as in `run` (coordinator.session.run_request)
    draft_policy: str = "auto"
    seed: int = 0
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 600.0
    draft_sm_percent: int | None = None
    target_sm_percent: int | None = None
    placements: list = field(default_factory=lambda: ["same-gpu"])
    user_devices: tuple = ()             # roles whose device the user named: placements leave them alone
    measure_bandwidth: bool = True       # each device's read bandwidth, measured before the workers start
    bandwidth_gbs: float | None = None   # the floor's bandwidth when the card is not in the datasheet table
    ceiling_trials: int = 400            # event-simulation trials per two-GPU prediction
    command: str = ""


def oracle_settings(cfg: BenchConfig) -> list[dict]:
    out = [{"label": f"alpha={a:g}", "alpha": float(a)} for a in cfg.alphas]
    out += [{"label": f"profile={p}", "profile": p} for p in cfg.profiles]
    return out


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_samples(cfg: BenchConfig) -> list[dict]:
    from workers.inputs.samples import discover_samples

    fake = cfg.draft.backend == "fake" and cfg.target.backend == "fake"
    found, bad = discover_samples(cfg.input, fake=fake)
    if not found:
        raise StartupError(f"no usable samples in {cfg.input}")
    samples = []
    for i in range(cfg.samples):          # cycle when there are fewer clips than asked for
        sample = dict(found[i % len(found)])
        if i >= len(found):
            sample["sample_id"] = f"{sample['sample_id']}#{i // len(found)}"
        samples.append(sample)
    return samples


def run_bench(cfg: BenchConfig) -> int:
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    samples = load_samples(cfg)
    records: list[dict] = []
    draft_alone: list[dict] = []
    events: list[dict] = []
    run_info: dict = {}
    failure = None
    plan = [(placement, mps) for placement in cfg.placements for mps in cfg.mps]
    probes: dict = {}                       # device -> its measured read bandwidth, once per run
    no_mps = unavailable_reason() if "on" in cfg.mps else None
    if no_mps:                          # measure what can be measured: MPS off only, and say why
        _say(f"skipping MPS on: {no_mps}")
        run_info["skipped"] = [f"MPS on: {no_mps}"]
        plan = [(placement, mps) for placement, mps in plan if mps != "on"]
    if not plan:
        _write(cfg, records, draft_alone, events, run_info, "nothing left to measure (add off to --bench-mps)")
        return 1
    guard = SignalGuard().install()
    for placement, mps_setting in plan:
        try:
            _bench_one_mps(cfg, mps_setting, samples, records, draft_alone, events, run_info, placement, probes)
        except (WorkerDied, StartupError, MpsError) as exc:
            failure = f"placement={placement} mps={mps_setting}: {exc}"
            _say(f"error: {failure}")
            break
        except (KeyboardInterrupt, Interrupted) as exc:      # SIGINT, SIGTERM, SIGHUP: workers and MPS stopped
            failure = f"interrupted ({exc.args[0] if isinstance(exc, Interrupted) else 'SIGINT'})"
            break
        finally:
            guard.raising = False            # writing and stopping are never interrupted
            _write(cfg, records, draft_alone, events, run_info, failure)
        if guard.signum is not None:         # it arrived while writing: stop here, said so
            failure = f"interrupted ({signal.Signals(guard.signum).name})"
            _write(cfg, records, draft_alone, events, run_info, failure)
            break
        guard.raising = True
    guard.restore()
    if failure is not None:
        return 128 + guard.signum if guard.signum is not None else 3
    return 1 if failed_modes(records) else 0          # a mode whose every request failed measured nothing


def placement_devices(spec: WorkerSpec, placement: str, user_devices=()) -> dict:
    """Worker options for a placement: two-gpu puts the draft on cuda:1 and the target on cuda:0 unless the
    user named that worker's device (--draft-device / --target-device / --device, kept as given)."""
    options = dict(spec.options)
    if placement == "two-gpu" and spec.role not in user_devices:
        options["device"] = "cuda:1" if spec.role == "draft" else "cuda:0"
    return options


def _tagged(events: list[dict], placement: str, mps: str) -> list[dict]:
    return [dict(e, placement=placement, mps=mps) for e in events]


def _probe_key(spec: WorkerSpec) -> tuple:
    return (spec.backend == "fake", spec.options.get("device") or "")


def _probe(spec: WorkerSpec, probes: dict) -> None:
    """The best read bandwidth of the worker's device, measured once per run by `python -m workers.bandwidth`
    (its own process: the coordinator never imports torch)."""
    key = _probe_key(spec)
    if key in probes:
        return
    cmd = [sys.executable, "-m", "workers.bandwidth"] + (["--numpy"] if key[0] else [])
    cmd += ["--device", key[1]] if key[1] else []
    _say(f"measuring the read bandwidth of {key[1] or 'the default device'}")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        probes[key] = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError, OSError) as exc:
        probes[key] = {"method": "failed", "error": f"{type(exc).__name__}: {exc}"}


def _bench_one_mps(cfg, mps_setting, samples, records, draft_alone, events, run_info, placement, probes) -> None:
    daemon = None
    session = None
    draft = WorkerSpec(cfg.draft.role, cfg.draft.backend, placement_devices(cfg.draft, placement, cfg.user_devices),
                       cfg.draft.endpoint, {})
    target = WorkerSpec(cfg.target.role, cfg.target.backend,
                        placement_devices(cfg.target, placement, cfg.user_devices), cfg.target.endpoint, {})
    if cfg.measure_bandwidth:     # before the workers start: nothing else on the device while it measures
        for spec in (draft, target):
            if not spec.endpoint:
                _probe(spec, probes)
    try:
        if mps_setting == "on":
            daemon = MpsDaemon()
            daemon.start()
            draft.env.update(daemon.client_env(cfg.draft_sm_percent))
            target.env.update(daemon.client_env(cfg.target_sm_percent))
        session = Session([draft, target], log_dir=cfg.output_dir / f"logs-{placement}-mps-{mps_setting}",
                          startup_timeout_s=cfg.startup_timeout_s, request_timeout_s=cfg.request_timeout_s)
        _say(f"[{placement}, mps {mps_setting}] starting workers ({draft.backend} / {target.backend})")
        session.start()
        run_info[f"{placement}_mps_{mps_setting}"] = {
            r: {"model_id": h.ready.model_id, "device": h.ready.device, "synthetic": h.ready.synthetic,
                "info": dict(h.ready.info, **({"bandwidth": probes[_probe_key(h.spec)]}
                                              if _probe_key(h.spec) in probes else {})),
                "memory_at_ready": h.ready.memory} for r, h in session.workers.items()}
        warm_up(session, cfg, samples[0], mps_setting, placement)
        total = len(cfg.max_new_tokens) * len(samples)
        done = 0
        for n in cfg.max_new_tokens:
            for sample in samples:
                first = len(records)
                records.extend(sample_records(session, cfg, sample, n, mps_setting, placement))   # as they finish
                done += 1
                _say(f"[mps {mps_setting}] {done}/{total} samples×lengths; "
                     f"last baseline {records[first].get('wall_ms', 0):.0f} ms")
        for sample in samples[: min(3, len(samples))]:
            try:
                draft_alone.append(draft_alone_record(session, cfg, sample, mps_setting, placement))
            except RequestFailed as exc:
                _say(f"  {sample['sample_id']} draft alone: ERROR {exc}")
    finally:
        try:
            if session is not None:
                session.close()
                events += _tagged(session.events, placement, mps_setting)   # a failed session's spans count too
        finally:
            if daemon is not None:
                daemon.stop()


BASE_OPTIONS = {"event_frames": 5}


def _one(session, cfg: BenchConfig, sample, mode, n, mps_setting, placement, oracle=None, baseline=None) -> dict:
    opts = dict(BASE_OPTIONS, ignore_eos=cfg.ignore_eos)
    if oracle is not None:
        opts["oracle"] = {k: v for k, v in oracle.items() if k != "label"}
    rec = session.run_request(sample, mode, question=sample.get("question") or "", max_new_tokens=n,
                              options=opts, k_max=cfg.k_max, adaptive=cfg.adaptive,
                              wait_for_drafts=cfg.wait_for_drafts, pipeline=cfg.pipeline,
                              draft_policy=cfg.draft_policy)
    rec.update(mps=mps_setting, max_new_tokens=n, oracle=oracle["label"] if oracle else None,
               alpha=oracle.get("alpha") if oracle else None, placement=placement)
    if baseline is not None and rec["status"] == "ok" and baseline.get("status") == "ok":
        rec["matches_baseline"] = rec["output_ids"] == baseline["output_ids"]
    if rec["status"] != "ok":
        _say(f"  {sample['sample_id']} {mode} {rec.get('oracle') or ''}: ERROR {rec['error']}")
    return rec


def _unmeasured_round(session, cfg: BenchConfig, sample, n, mps_setting, placement, hf_generate: bool) -> None:
    """Baseline, then every mode on the baseline's answer (last oracle setting), `n` tokens; not recorded."""
    base = _one(session, cfg, sample, "baseline", n, mps_setting, placement)
    answer = base.get("committed_ids") or []
    oracles = oracle_settings(cfg)
    for mode in cfg.modes:
        _one(session, cfg, sample, mode, n, mps_setting, placement,
             dict(oracles[-1], seed=cfg.seed, answer=answer) if oracles else None)
    if hf_generate:
        _one(session, cfg, sample, "hf-generate", n, mps_setting, placement)


def warm_up(session, cfg: BenchConfig, sample, mps_setting, placement) -> None:
    """Graph capture, allocator, caches: requests that are not measured."""
    for _ in range(cfg.warmup):
        _unmeasured_round(session, cfg, sample, min(cfg.max_new_tokens), mps_setting, placement, cfg.hf_generate)


PRIME_TOKENS = 2


def sample_records(session, cfg: BenchConfig, sample, n, mps_setting, placement):
    """Every measured request of one (sample, length) on a started session, baseline first, yielded as each
    finishes: the unit of work of `bench` here and of each pipeline of `bench --ray` (coordinator.cluster).

    With warm-up on, one short unmeasured request per mode first primes this sample's prompt length: the
    first prefill of a new length cost ~55 ms more on an H200 (130 vs 72 ms, bf16, 2026-12-03), which fell
    on the baseline, the first mode measured, and inflated every speedup by up to 5 %."""
    if cfg.warmup:        # baseline and each mode (both workers prefill), 2-token answers
        _unmeasured_round(session, cfg, sample, PRIME_TOKENS, mps_setting, placement, hf_generate=False)
    base = _one(session, cfg, sample, "baseline", n, mps_setting, placement)
    yield base
    if cfg.hf_generate:
        yield _one(session, cfg, sample, "hf-generate", n, mps_setting, placement, baseline=base)
    answer = base.get("committed_ids") or []
    for oracle in oracle_settings(cfg):
        for mode in cfg.modes:
            yield _one(session, cfg, sample, mode, n, mps_setting, placement, dict(oracle, seed=cfg.seed, answer=answer),
                       baseline=base)


def draft_alone_record(session, cfg: BenchConfig, sample, mps_setting, placement) -> dict:
    rec = session.run_draft_alone(sample, question=sample.get("question") or "", steps=cfg.draft_alone_steps,
                                  options=dict(BASE_OPTIONS, ignore_eos=cfg.ignore_eos))
    rec["mps"] = mps_setting
    rec["placement"] = placement
    return rec


# --- aggregation -------------------------------------------------------------------------------

def aggregate(records: list[dict], draft_alone: list[dict], events: list[dict], run_info: dict | None = None, *,
              k_max: int = 16, bandwidth_gbs: float | None = None, ceiling_trials: int = 400) -> dict:
    ok = [r for r in records if r.get("status") == "ok"]
    best_base: dict[tuple, float] = {}           # the faster baseline of the run (any placement or MPS)
    for r in ok:
        if r["mode"] == "baseline":
            key = (r["max_new_tokens"], r["sample_id"])
            best_base[key] = min(best_base.get(key, float("inf")), r["wall_ms"])
    spans_by_request: dict[str, list] = {}
    for e in events:
        if e.get("kind") == "span":
            spans_by_request.setdefault(e["request_id"], []).append(e)
    walls = {}
    for r in ok:
        walls[(r.get("placement"), r["mps"], r["max_new_tokens"], r["mode"], r.get("oracle"), r["sample_id"])] = r["wall_ms"]
    configs: dict[tuple, list] = {}
    for r in ok:
        configs.setdefault((r.get("placement"), r["mps"], r["max_new_tokens"], r["mode"], r.get("oracle")), []).append(r)
    rows = []
    for (placement, mps, n, mode, oracle), recs in sorted(configs.items(),
                                                          key=lambda kv: tuple(str(x) for x in kv[0])):
        def paired(ref_mode):
            reference = {r["sample_id"]: walls.get((placement, mps, n, ref_mode, None, r["sample_id"])) for r in recs}
            return paired_speedup(reference, {r["sample_id"]: r["wall_ms"] for r in recs})[0]
        verify_by_k: dict[int, list] = {}
        for r in recs:
            for s in spans_by_request.get(r["request_id"], []):
                if s["name"] == "verify" and s["proc"] == "target":
                    verify_by_k.setdefault(int(s["attrs"].get("k", 0)), []).append((s["end_ns"] - s["start_ns"]) / 1e6)
        decode_steps = [(s["end_ns"] - s["start_ns"]) / 1e6 for r in recs
                        for s in spans_by_request.get(r["request_id"], []) if s["name"] == "decode"]
        draft_steps_in_prefill = []
        for r in recs:
            spans = spans_by_request.get(r["request_id"], [])
            t_pre = [s for s in spans if s["proc"] == "target" and s["name"] == "prefill"]
            if not t_pre:
                continue
            t0, t1 = t_pre[0]["start_ns"], t_pre[0]["end_ns"]
            draft_steps_in_prefill += [(s["end_ns"] - s["start_ns"]) / 1e6 for s in spans
                                       if s["proc"] == "draft" and s["name"] == "draft_step"
                                       and s["start_ns"] >= t0 and s["end_ns"] <= t1]
        walls_ms = [r["wall_ms"] for r in recs]
        drafted = sum(r.get("drafted_tokens") or 0 for r in recs)
        accepted = sum(r.get("accepted_tokens") or 0 for r in recs)
        matched = [r.get("matches_baseline") for r in recs if r.get("matches_baseline") is not None]
        rows.append({
            "placement": placement, "mps": mps, "max_new_tokens": n, "mode": mode, "oracle": oracle, "n": len(recs),
            "wall_ms_median": _median(walls_ms), "wall_ms_p10": _pct(walls_ms, 0.1), "wall_ms_p90": _pct(walls_ms, 0.9),
            "speedup_vs_baseline": paired("baseline") if mode != "baseline" else 1.0,
            "speedup_vs_hf_generate": paired("hf-generate") if mode != "hf-generate" else 1.0,
            "speedup_vs_best_baseline": _median([best_base[(n, r["sample_id"])] / r["wall_ms"] for r in recs
                                                 if (n, r["sample_id"]) in best_base]),
            "target_prefill_ms": _median([(r.get("target") or {}).get("prefill_ms") for r in recs]),
            "target_ms_per_token": _median([(r.get("target") or {}).get("ms_per_token") for r in recs]),
            "target_decode_step_ms": _median(decode_steps),
            "draft_prefill_ms": _median([(r.get("draft") or {}).get("prefill_ms") for r in recs]),
            "draft_step_ms": _median([(r.get("draft") or {}).get("ms_per_token") for r in recs]),
            "draft_step_ms_during_target_prefill": _median(draft_steps_in_prefill),
            "load_ms_target": _median([(r.get("target") or {}).get("load_ms") for r in recs]),
            "overlap_window_ms": _median([r.get("overlap_window_ms") for r in recs]),
            "free_draft_tokens": _median([r.get("free_draft_tokens") for r in recs]),
            "accepted_tokens": _median([r.get("accepted_tokens") for r in recs]),
            "acceptance_rate": accepted / drafted if drafted else None,
            "mean_acceptance_length": _median([r.get("mean_acceptance_length") for r in recs]),
            "verify_ms_by_k": {k: _median(v) for k, v in sorted(verify_by_k.items())},
            "matches_baseline": f"{sum(bool(x) for x in matched)}/{len(matched)}" if matched else None,
        })
    contention = {}
    for placement, mps in sorted({(r.get("placement"), r["mps"]) for r in ok}, key=str):
        alone = [r for r in ok if (r.get("placement"), r["mps"]) == (placement, mps) and r["mode"] == "baseline"]
        beside = [r for r in ok if (r.get("placement"), r["mps"]) == (placement, mps)
                  and r["mode"] in ("parallel", "speculative")]
        steps_alone = [x for d in draft_alone if (d.get("placement"), d["mps"]) == (placement, mps)
                       for x in d["draft_step_ms"]]
        during = [row["draft_step_ms_during_target_prefill"] for row in rows
                  if (row["placement"], row["mps"]) == (placement, mps)
                  and row["draft_step_ms_during_target_prefill"] is not None]
        prefill_alone = _median([r["target"]["prefill_ms"] for r in alone])
        prefill_beside = _median([r["target"]["prefill_ms"] for r in beside])
        step_alone = _median(steps_alone)
        windows = [r.get("overlap_window_ms") for r in beside if r["mode"] == "parallel"]
        free = [r.get("free_draft_tokens") for r in beside if r["mode"] == "parallel"]
        ideal = [w / step_alone for w in windows if w is not None and step_alone] if step_alone else []
        contention[f"{placement}, MPS {mps}" if placement else mps] = {
            "target_prefill_ms_alone": prefill_alone,
            "target_prefill_ms_beside_draft": prefill_beside,
            "target_prefill_slowdown": (prefill_beside / prefill_alone) if prefill_alone and prefill_beside else None,
            "draft_step_ms_alone": step_alone,
            "draft_step_ms_beside_target_prefill": _median(during),
            "overlap_window_ms": _median(windows),
            "free_draft_tokens": _median(free),
            "ideal_free_draft_tokens": _median(ideal),
            "free_vs_ideal": (_median(free) / _median(ideal)) if free and ideal and _median(ideal) else None,
        }
    costs = bench_model.add_ceiling(rows, records, events, draft_alone, k_max=k_max, trials=ceiling_trials)
    answer = statistics.mean(r["max_new_tokens"] for r in ok) / 2 if ok else 0.0
    floor = bench_model.floor_rows(run_info or {}, rows, costs, records, answer_positions=answer,
                                   bandwidth_gbs=bandwidth_gbs)
    return {"rows": rows, "contention": contention, "costs_alone": costs, "floor": floor}


def _write(cfg: BenchConfig, records, draft_alone, events, run_info, failure) -> None:
    skipped = run_info.get("skipped", [])
    run_info = {k: v for k, v in run_info.items() if k != "skipped"}
    agg = aggregate(records, draft_alone, events, run_info, k_max=cfg.k_max, bandwidth_gbs=cfg.bandwidth_gbs,
                    ceiling_trials=cfg.ceiling_trials)
    synthetic = any(v.get("synthetic") for info in run_info.values() for v in info.values())
    data = {"command": cfg.command, "created": dt.datetime.now().isoformat(timespec="seconds"),
            "synthetic_weights": synthetic, "failure": failure, "skipped": skipped, "config": {
                "samples": cfg.samples, "warmup": cfg.warmup, "max_new_tokens": cfg.max_new_tokens,
                "alphas": cfg.alphas, "profiles": cfg.profiles, "modes": cfg.modes, "mps": cfg.mps,
                "ignore_eos": cfg.ignore_eos, "k_max": cfg.k_max, "adaptive": cfg.adaptive,
                "wait_for_drafts": cfg.wait_for_drafts, "bandwidth_gbs": cfg.bandwidth_gbs,
                "placements": cfg.placements},
            "host": {"python": platform.python_version(), "node": platform.node()},
            "run_info": run_info, "aggregate": agg, "draft_alone": draft_alone, "records": records}
    tmp = cfg.output_dir / "bench.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, cfg.output_dir / "bench.json")
    (cfg.output_dir / "bench.md").write_text(render_markdown(data))
    reports.write_events_jsonl(cfg.output_dir / "events.jsonl", events)
    try:
        plot_speedup(agg["rows"], cfg.output_dir / "speedup_vs_alpha.png")
        spec = [r for r in records if r.get("mode") == "speculative" and r.get("status") == "ok"]
        if spec:
            rid = spec[len(spec) // 2]["request_id"]
            one = [e for e in events if e.get("request_id") == rid]
            reports.write_timeline_png(cfg.output_dir / "timeline.png", one, [r for r in records
                                                                            if r.get("request_id") == rid])
    except Exception as exc:       # plots never cost the numbers
        _say(f"warning: plots not written: {exc}")
