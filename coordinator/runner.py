"""`coordinator run`: samples × modes through one Session, then results.json and the reports.

Owns the run's life cycle: discovery, the MPS daemon, the workers, the per-sample loop with progress,
the lossless check against the baseline of the same run, and writing every output even when the run
fails part-way (no lost results). Never imports torch.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import reports
from .mps import MpsDaemon, MpsError, mps_wanted
from .session import Session, StartupError, WorkerDied, WorkerSpec

EXIT_OK, EXIT_SAMPLE_FAILED, EXIT_WORKER_DIED, EXIT_STARTUP, EXIT_INTERRUPTED = 0, 1, 3, 4, 130


@dataclass
class RunConfig:
    input: str
    output_dir: str | None = None
    modes: list = field(default_factory=lambda: ["baseline", "parallel", "speculative"])
    max_new_tokens: int = 50
    samples: int | None = None
    question: str | None = None
    question_set: str = "dataset"
    split: str | None = None
    input_format: str = "auto"
    clip_ms: int = 1000
    clip_stride_ms: int | None = None
    event_frames: int = 5
    event_window_ms: float | None = None
    on_error: str = "skip"
    draft: WorkerSpec | None = None
    target: WorkerSpec | None = None
    mps: str = "auto"
    draft_sm_percent: int | None = None
    target_sm_percent: int | None = None
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    allow_public_endpoint: bool = False
    allow_vocab_mismatch: bool = False
    k_max: int = 16
    adaptive: bool = True
    max_ahead: int = 32
    ignore_eos: bool = False
    wait_for_drafts: int = 0
    command: str = ""
    quiet: bool = False


def default_output_dir() -> Path:
    return Path("runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def discover(cfg: RunConfig) -> tuple[list[dict], list[dict]]:
    from workers.inputs.samples import discover_samples

    fake = cfg.draft.backend == "fake" and cfg.target.backend == "fake"
    return discover_samples(cfg.input, input_format=cfg.input_format, split=cfg.split, max_samples=cfg.samples,
                            question=cfg.question, question_set=cfg.question_set, clip_ms=cfg.clip_ms,
                            clip_stride_ms=cfg.clip_stride_ms, fake=fake)


def check_vocab(session: Session, allow: bool) -> str | None:
    draft, target = session.workers["draft"].ready, session.workers["target"].ready
    if draft.tokenizer_checksum == target.tokenizer_checksum:
        return None
    text = (f"the draft's tokenizer ({draft.model_id}, checksum {draft.tokenizer_checksum[:12]}) and the target's "
            f"({target.model_id}, checksum {target.tokenizer_checksum[:12]}) decode ids below 32000 differently, "
            f"so drafted ids would mean other text to the target")
    if not allow:
        raise StartupError(text + ". Pass --allow-vocab-mismatch to run anyway.")
    return "warning: " + text


def run(cfg: RunConfig) -> int:
    out_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr))

    def warn(*a):      # errors and skipped samples are printed even under --quiet
        print(*a, file=sys.stderr)
    samples, bad = discover(cfg)
    records: list[dict] = [{"sample_id": b["sample_id"], "mode": mode, "status": "error", "error": b["error"]}
                           for b in bad for mode in cfg.modes]
    for b in bad:
        warn(f"skipping sample {b['sample_id']}: {b['error']}")
    if bad and cfg.on_error == "fail":
        _write_outputs(out_dir, cfg, records, [], {}, "input error")
        warn(f"error: {len(bad)} bad sample(s) and --on-error fail")
        return EXIT_SAMPLE_FAILED
    if not samples:
        raise StartupError(f"no usable samples in {cfg.input}" + (f" ({len(bad)} bad)" if bad else ""))
    daemon = None
    session = None
    exit_code = EXIT_OK
    failure = None
    run_info: dict = {}
    try:
        if mps_wanted(cfg.mps):
            daemon = MpsDaemon().start()
            cfg.draft.env.update(daemon.client_env(cfg.draft_sm_percent))
            cfg.target.env.update(daemon.client_env(cfg.target_sm_percent))
            say(f"MPS daemon started (pipe {daemon.env['CUDA_MPS_PIPE_DIRECTORY']})")
        specs = [cfg.target] if cfg.modes == ["baseline"] else [cfg.draft, cfg.target]
        session = Session(specs, log_dir=out_dir / "logs", startup_timeout_s=cfg.startup_timeout_s,
                          request_timeout_s=cfg.request_timeout_s, allow_public_endpoint=cfg.allow_public_endpoint)
        say(f"starting workers: {', '.join(f'{s.role}={s.backend}' for s in specs)}")
        session.start()
        warning = None
        if "draft" in session.workers:
            warning = check_vocab(session, cfg.allow_vocab_mismatch)
            if warning:
                print(warning, file=sys.stderr)     # even under --quiet
        run_info = _run_info(cfg, session, daemon)
        if "draft" in session.workers and warning:
            run_info["vocab_warning"] = warning
        total = len(samples) * len(cfg.modes)
        bar = _progress(total, cfg.quiet)
        stop_all = False
        for sample in samples:
            for rec in sample_records(session, cfg, sample):
                mode = rec["mode"]
                records.append(rec)
                bar(f"{sample['sample_id']} {mode}: " + (f"{rec['wall_ms']:.0f} ms" if rec["status"] == "ok"
                                                          else f"ERROR {rec['error']}"))
                if rec["status"] != "ok":
                    warn(f"sample {sample['sample_id']} ({mode}) failed: {rec['error']}")
                    exit_code = EXIT_SAMPLE_FAILED if cfg.on_error == "fail" else exit_code
                    if cfg.on_error == "fail":
                        stop_all = True
                        break
            if stop_all:
                break
    except WorkerDied as exc:
        failure, exit_code = f"worker died: {exc}", EXIT_WORKER_DIED
    except (StartupError, MpsError) as exc:
        failure, exit_code = f"startup failed: {exc}", EXIT_STARTUP
    except KeyboardInterrupt:
        failure, exit_code = "interrupted (Ctrl-C)", EXIT_INTERRUPTED
    finally:
        events = session.events if session else []
        if session:
            session.close()
        if daemon:
            daemon.stop()
            say("MPS daemon stopped")
    if failure:
        warn(f"error: {failure}")
    _write_outputs(out_dir, cfg, records, events, run_info, failure)
    if not cfg.quiet:
        ok = [r for r in records if r.get("status") == "ok"]
        if ok:
            print(reports.format_table(reports.aggregate(records)))
        print(f"outputs in {out_dir}/ (results.json, summary.md, events.jsonl, trace.json, timeline.png)")
    return exit_code


def sample_records(session: Session, cfg: RunConfig, sample: dict):
    """Every mode of cfg on one sample through a started session, yielding each record as it finishes
    (baseline first, so the others are checked against it). The one entry point for anything that runs
    samples on a session: `run` here, each pipeline of `--ray` (coordinator.cluster)."""
    options = dict(event_frames=cfg.event_frames, event_window_ms=cfg.event_window_ms, ignore_eos=cfg.ignore_eos)
    sampled = float(cfg.target.options.get("temperature") or 0) > 0     # outputs are draws, not equal
    baseline_ids = None
    for mode in cfg.modes:
        question = sample.get("question") or cfg.question or ""
        rec = session.run_request(sample, mode, question=question, max_new_tokens=cfg.max_new_tokens,
                                  options=options, k_max=cfg.k_max, adaptive=cfg.adaptive,
                                  max_ahead=cfg.max_ahead, wait_for_drafts=cfg.wait_for_drafts)
        rec["sequence"] = sample.get("sequence")
        if rec["status"] == "ok" and mode == "baseline":
            baseline_ids = rec["output_ids"]
        rec["matches_baseline"] = (rec["output_ids"] == baseline_ids
                                   if rec["status"] == "ok" and baseline_ids is not None
                                   and mode != "baseline" and not sampled else None)
        yield rec


def _progress(total: int, quiet: bool):
    if quiet:
        return lambda text: None
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None:
        count = [0]

        def step(text):
            count[0] += 1
            print(f"[{count[0]}/{total}] {text}", file=sys.stderr)
        return step
    bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)

    def step(text):
        bar.set_postfix_str(text[:60])
        bar.update(1)
        if bar.n >= total:
            bar.close()
    return step


def _run_info(cfg: RunConfig, session: Session, daemon) -> dict:
    info = {"backends": {r: h.spec.backend for r, h in session.workers.items()},
            "models": {r: h.ready.model_id for r, h in session.workers.items()},
            "device": {r: h.ready.device for r, h in session.workers.items()},
            "synthetic": any(h.ready.synthetic for h in session.workers.values()),
            "memory_at_ready": {r: h.ready.memory for r, h in session.workers.items()},
            "worker_info": {r: h.ready.info for r, h in session.workers.items()},
            "mps": bool(daemon), "max_new_tokens": cfg.max_new_tokens, "modes": cfg.modes,
            "python": platform.python_version(), "host": platform.node()}
    # what each worker actually runs (its own default where the user named none)
    precision = {r: (h.ready.info or {}).get("precision") or h.spec.options.get("precision")
                 for r, h in session.workers.items()}
    if any(precision.values()):
        info["precision"] = precision
    gpu = {r: round(h.ready.memory["peak_gpu_bytes"] / 2**30, 2) for r, h in session.workers.items()
           if (h.ready.memory or {}).get("peak_gpu_bytes")}
    if gpu:
        info["gpu_memory_gib_at_ready"] = gpu
    return info


def _write_outputs(out_dir: Path, cfg: RunConfig, records: list, events: list, run_info: dict, failure) -> None:
    agg = reports.aggregate(records) if records else {}
    results = {"command": cfg.command, "created": dt.datetime.now().isoformat(timespec="seconds"),
               "run_info": run_info, "failure": failure, "records": records, "aggregate": agg}
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=_json_default))
    os.replace(tmp, out_dir / "results.json")
    reports.write_events_jsonl(out_dir / "events.jsonl", events)
    reports.write_trace_json(out_dir / "trace.json", events)
    try:
        reports.write_timeline_png(out_dir / "timeline.png", events, records)
    except Exception as exc:     # a plot must never cost the results
        print(f"warning: timeline.png not written: {exc}", file=sys.stderr)
    reports.write_summary_md(out_dir / "summary.md", records, agg, command=cfg.command, run_info=run_info)


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


