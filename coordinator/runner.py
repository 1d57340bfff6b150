"""`coordinator run`: samples × modes through one Session, then results.json and the reports.
Longer than most modules because a run's life cycle (start, signals, warm-up, samples, shutdown) must stay in one place for every ending to write its outputs.

Owns the run's life cycle: discovery, the MPS daemon, the workers, the per-sample loop with progress,
the lossless check against the baseline of the same run, and how the run ends: completed, stopped at the
first error, a worker lost, interrupted by a signal (SIGTERM, SIGINT, SIGHUP) or an internal error; each
way leaves every finished record in the outputs (coordinator.outputs), no worker, no MPS daemon and no
private temporary folder. Never imports torch.
"""
from __future__ import annotations

import datetime as dt
import platform
import signal
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from . import reports
from .mps import MpsDaemon, MpsError, mps_wanted
from .outputs import RunOutputs
from .signals import Interrupted, SignalGuard
from .session import Session, StartupError, WorkerDied, WorkerSpec

EXIT_OK, EXIT_SAMPLE_FAILED, EXIT_WORKER_DIED, EXIT_STARTUP, EXIT_INTERNAL = 0, 1, 3, 4, 70
# a signal ends the run with 128 + its number: 130 for SIGINT (Ctrl-C), 143 for SIGTERM


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
    heartbeat_timeout_s: float = 30.0
    allow_public_endpoint: bool = False
    allow_vocab_mismatch: bool = False
    k_max: int = 16
    adaptive: bool = True
    max_ahead: int = 32
    ignore_eos: bool = False
    wait_for_drafts: int = 0
    warmup: int = 1
    pipeline: str = "auto"
    draft_policy: str = "auto"
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
    guard = SignalGuard().install()     # from the first output file on, a signal ends the run in order
    try:
        return _run(cfg, guard)
    except Interrupted as exc:          # while discovering samples: nothing started, nothing to keep
        print(f"interrupted by {exc.args[0]} before the run started; nothing was written", file=sys.stderr)
        return 128 + exc.signum
    finally:
        guard.restore()


def _run(cfg: RunConfig, guard: "SignalGuard") -> int:
    out_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir()
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr))

    def warn(*a):      # errors and skipped samples are printed even under --quiet
        print(*a, file=sys.stderr)
    samples, bad = discover(cfg)
    if not samples and not (bad and cfg.on_error == "fail"):
        raise StartupError(f"no usable samples in {cfg.input}" + (f" ({len(bad)} bad)" if bad else ""))
    guard.raising = False               # until the try below: noted, acted on there
    outputs = RunOutputs(out_dir, cfg.command, defer_signals=guard.deferred)
    for b in bad:
        warn(f"skipping sample {b['sample_id']}: {b['error']}")
        for mode in cfg.modes:
            outputs.add({"sample_id": b["sample_id"], "mode": mode, "status": "error", "error": b["error"]})
    if bad and cfg.on_error == "fail":
        outputs.finish(ended=f"stopped at the first error (--on-error fail): {len(bad)} bad sample(s)",
                       failure="input error")
        warn(f"error: {len(bad)} bad sample(s) and --on-error fail")
        return EXIT_SAMPLE_FAILED
    daemon = None
    session = None
    ended, failure, exit_code = "completed", None, EXIT_OK
    try:
        guard.raising = True
        if guard.signum is not None:
            raise Interrupted(guard.signum)
        if mps_wanted(cfg.mps):
            daemon = MpsDaemon()                  # assigned first: a signal during start still stops it
            daemon.start()
            cfg.draft.env.update(daemon.client_env(cfg.draft_sm_percent))
            cfg.target.env.update(daemon.client_env(cfg.target_sm_percent))
            say(f"MPS daemon started (pipe {daemon.env['CUDA_MPS_PIPE_DIRECTORY']})")
        specs = [cfg.target] if cfg.modes == ["baseline"] else [cfg.draft, cfg.target]
        session = Session(specs, log_dir=out_dir / "logs", startup_timeout_s=cfg.startup_timeout_s,
                          request_timeout_s=cfg.request_timeout_s, heartbeat_timeout_s=cfg.heartbeat_timeout_s,
                          allow_public_endpoint=cfg.allow_public_endpoint, events=outputs.events)
        say(f"starting workers: {', '.join(f'{s.role}={s.backend}' for s in specs)}")
        session.start()
        warning = None
        if "draft" in session.workers:
            warning = check_vocab(session, cfg.allow_vocab_mismatch)
            if warning:
                print(warning, file=sys.stderr)     # even under --quiet
        outputs.run_info = _run_info(cfg, session, daemon)
        if "draft" in session.workers and warning:
            outputs.run_info["vocab_warning"] = warning
        _warm_up(session, cfg, samples[0], say)
        stopped = _run_samples(cfg, session, samples, outputs, warn)
        if stopped:
            ended, exit_code = f"stopped at the first error (--on-error fail): {stopped}", EXIT_SAMPLE_FAILED
        elif failed_modes(outputs.records):
            ended = (f"completed, but every request of mode {', '.join(failed_modes(outputs.records))} failed "
                     f"(see Failed samples)")
            exit_code = EXIT_SAMPLE_FAILED
    except WorkerDied as exc:
        failure, exit_code = f"worker died: {exc}", EXIT_WORKER_DIED
        ended = f"worker lost: {str(exc).splitlines()[0]}"
    except (StartupError, MpsError) as exc:
        failure, exit_code = f"startup failed: {exc}", EXIT_STARTUP
        ended = failure.splitlines()[0]
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        ended = failure = f"interrupted by {signal.Signals(signum).name}" + (
            " (Ctrl-C)" if signum == signal.SIGINT else "")
        exit_code = 128 + signum
    except Exception as exc:                      # a bug: keep what finished, say so, exit non-zero
        traceback.print_exc()
        ended = failure = f"internal error: {type(exc).__name__}: {exc}"
        exit_code = EXIT_INTERNAL
    finally:
        guard.raising = False                     # from here on a signal is noted, never raised
        _shut_down(session, daemon, say, warn)
    if guard.signum is not None and exit_code == EXIT_OK:
        ended += f" ({signal.Signals(guard.signum).name} arrived during shutdown)"
        exit_code = 128 + guard.signum
    if failure:
        warn(f"error: {failure}")
    agg = outputs.finish(ended=ended, failure=failure)
    if not cfg.quiet:
        if any(r.get("status") == "ok" for r in outputs.records):
            print(reports.format_table(agg))
        print(f"outputs in {out_dir}/ (results.json, records.jsonl, summary.md, events.jsonl, trace.json, "
              f"timeline.png)")
    return exit_code


def failed_modes(records: list[dict]) -> list[str]:
    """Modes with records but not one that succeeded: a run that measured nothing of them must not exit 0."""
    modes = list(dict.fromkeys(r.get("mode") for r in records))
    return [str(mode) for mode in modes if not any(r.get("status") == "ok" for r in records if r.get("mode") == mode)]


def _warm_up(session: Session, cfg: RunConfig, sample: dict, say) -> None:
    """Unmeasured requests (every mode on the first sample, cfg.warmup times) so that no measured request
    pays for first-call costs (lazy imports, allocator, caches) and paired speedups compare warm with warm.
    Their events are dropped: the reports show measured requests only."""
    if not cfg.warmup:
        return
    say(f"warming up both workers: {cfg.warmup} unmeasured request(s) per mode on {sample['sample_id']}")
    options = dict(event_frames=cfg.event_frames, event_window_ms=cfg.event_window_ms, ignore_eos=cfg.ignore_eos)
    sink, session.event_sink = session.event_sink, None
    try:
        for _ in range(cfg.warmup):
            for mode in cfg.modes:
                rec = session.run_request(sample, mode, question=sample.get("question") or cfg.question or "",
                                          max_new_tokens=cfg.max_new_tokens, options=options, k_max=cfg.k_max,
                                          adaptive=cfg.adaptive, max_ahead=cfg.max_ahead,
                                          wait_for_drafts=cfg.wait_for_drafts, pipeline=cfg.pipeline,
                                          draft_policy=cfg.draft_policy)
                if rec["status"] != "ok":
                    print(f"warning: warm-up request ({mode}) failed: {rec['error']}", file=sys.stderr)
    finally:
        session.events.clear()
        session.event_sink = sink


def sample_records(session: Session, cfg: RunConfig, sample: dict):
    """Every mode of cfg on one sample through a started session, yielding each record as it finishes
    (baseline first, so the others are checked against it). The one way samples run on a session: here,
    and in each pipeline of `--ray` (coordinator.cluster)."""
    options = dict(event_frames=cfg.event_frames, event_window_ms=cfg.event_window_ms, ignore_eos=cfg.ignore_eos)
    sampled = float(cfg.target.options.get("temperature") or 0) > 0   # outputs are draws, not equal
    baseline_ids = None
    for mode in cfg.modes:
        question = sample.get("question") or cfg.question or ""
        rec = session.run_request(sample, mode, question=question, max_new_tokens=cfg.max_new_tokens,
                                  options=options, k_max=cfg.k_max, adaptive=cfg.adaptive,
                                  max_ahead=cfg.max_ahead, wait_for_drafts=cfg.wait_for_drafts,
                                  pipeline=cfg.pipeline, draft_policy=cfg.draft_policy)
        rec["sequence"] = sample.get("sequence")
        if rec["status"] == "ok" and mode == "baseline":
            baseline_ids = rec["output_ids"]
        rec["matches_baseline"] = (rec["output_ids"] == baseline_ids
                                   if rec["status"] == "ok" and baseline_ids is not None
                                   and mode != "baseline" and not sampled else None)
        yield rec


def _run_samples(cfg: RunConfig, session: Session, samples: list, outputs: RunOutputs, warn) -> str | None:
    """Every (sample, mode) in order; each record goes to the outputs at once. Returns why it stopped
    early under --on-error fail, else None."""
    bar = _progress(len(samples) * len(cfg.modes), cfg.quiet)
    for sample in samples:
        for rec in sample_records(session, cfg, sample):
            outputs.add(rec)
            bar(f"{sample['sample_id']} {rec['mode']}: " + (f"{rec['wall_ms']:.0f} ms" if rec["status"] == "ok"
                                                             else f"ERROR {rec['error']}"))
            if rec["status"] != "ok":
                warn(f"sample {sample['sample_id']} ({rec['mode']}) failed: {rec['error']}")
                if cfg.on_error == "fail":
                    return f"sample {sample['sample_id']} ({rec['mode']}) failed: {rec['error']}"
    return None


def _shut_down(session, daemon, say, warn) -> None:
    """Workers, then the MPS daemon; a failure of one step never skips the next."""
    if session is not None:
        try:
            session.close()
        except Exception as exc:
            warn(f"warning: shutting the workers down: {type(exc).__name__}: {exc}")
    if daemon is not None:
        try:
            daemon.stop()
            say("MPS daemon stopped")
        except Exception as exc:
            warn(f"warning: stopping the MPS daemon: {type(exc).__name__}: {exc}")


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
            "weights": {r: (h.ready.info or {}).get("weights") for r, h in session.workers.items()},
            "memory_at_ready": {r: h.ready.memory for r, h in session.workers.items()},
            "worker_info": {r: h.ready.info for r, h in session.workers.items()},
            "mps": bool(daemon), "max_new_tokens": cfg.max_new_tokens, "modes": cfg.modes,
            "python": platform.python_version(), "host": platform.node()}
    # what each worker actually runs (its own default where the user named none)
    precision = {r: (h.ready.info or {}).get("precision") or h.spec.options.get("precision")
                 for r, h in session.workers.items()}
    if any(precision.values()):
        info["precision"] = precision
    # each worker's GPU memory once loaded (weights, KV cache, graphs) and the peak while loading
    gpu = {r: {k: round(h.ready.memory[key] / 2**30, 2) for k, key in
               (("allocated", "gpu_allocated_bytes"), ("load_peak", "load_peak_gpu_bytes")) if h.ready.memory.get(key)}
           for r, h in session.workers.items() if (h.ready.memory or {}).get("gpu_allocated_bytes")}
    if gpu:
        info["gpu_memory_gib"] = gpu
    return info
