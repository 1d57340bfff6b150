"""One pipeline of a `--ray` run: a Ray actor that owns an MPS daemon (where used), a Session with its two
worker processes, and runs one sample at a time through coordinator.runner.sample_records.

It holds the GPUs Ray gave it (Ray sets CUDA_VISIBLE_DEVICES in the actor, and the worker processes inherit
it, so `cuda:0` is the pipeline's first GPU). It never decides what to run next (the driver does) and never
writes the run's outputs (it returns records and events). `stop()` may arrive from a second thread while a
sample runs: it ends the worker processes, which makes the running request fail fast with WorkerDied, and
then everything is closed by the thread that owns it. Never imports torch.
"""
from __future__ import annotations

import os
import platform
import signal
import threading
import time
from pathlib import Path


class PipelineBroken(RuntimeError):
    """This pipeline cannot run samples any more (a worker died, or it was stopped); its sample goes back."""


def follow_driver_cwd(cwd: str | None) -> None:
    """Relative paths (inputs, models, output folder) mean what they mean to the driver: run in its folder
    (on another node: the same path on the shared filesystem, when it exists there)."""
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)


class Pipeline:
    def __init__(self, cfg, index: int, log_dir: str, cwd: str | None = None):
        follow_driver_cwd(cwd)
        self.cfg, self.index, self.log_dir = cfg, index, Path(log_dir)
        self.session = None
        self.daemon = None
        self._lock = threading.Lock()        # one owner of session/daemon at a time
        self._stopping = threading.Event()
        self.node = platform.node()

    def start(self) -> dict:
        """Start MPS (if wanted) and both workers; returns where it runs and its clock."""
        from coordinator.mps import mps_wanted
        from coordinator.runner import check_vocab

        cfg = self.cfg
        specs = [cfg.target] if cfg.modes == ["baseline"] else [cfg.draft, cfg.target]
        with self._lock:
            self._open(specs, mps_wanted(cfg.mps), cfg.draft_sm_percent, cfg.target_sm_percent,
                       startup_timeout_s=cfg.startup_timeout_s, request_timeout_s=cfg.request_timeout_s,
                       heartbeat_timeout_s=cfg.heartbeat_timeout_s, allow_public_endpoint=cfg.allow_public_endpoint)
            try:
                warning = check_vocab(self.session, cfg.allow_vocab_mismatch) if "draft" in self.session.workers \
                    else None
            except BaseException:
                self._close_locked()
                raise
            return dict(self.describe(), vocab_warning=warning)

    def _open(self, specs, mps_on: bool, draft_sm_percent, target_sm_percent, **session_options) -> None:
        """The MPS daemon (when on) and a started Session of `specs`; on any failure both are closed."""
        from coordinator.mps import MpsDaemon
        from coordinator.session import Session
        try:
            if mps_on:
                self.daemon = MpsDaemon()            # assigned first: a failure during start still stops it
                self.daemon.start()
                for spec in specs:
                    spec.env.update(self.daemon.client_env(draft_sm_percent if spec.role == "draft"
                                                           else target_sm_percent))
            self.session = Session(specs, log_dir=self.log_dir, **session_options)
            self.session.start()
        except BaseException:
            self._close_locked()
            raise

    def describe(self) -> dict:
        workers = self.session.workers
        return {"pipeline": self.index, "node": self.node, "pid": os.getpid(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "mps": bool(self.daemon),
                "device": {r: h.ready.device for r, h in workers.items()},
                "backends": {r: h.spec.backend for r, h in workers.items()},
                "models": {r: h.ready.model_id for r, h in workers.items()},
                "synthetic": any(h.ready.synthetic for h in workers.values()),
                "worker_info": {r: h.ready.info for r, h in workers.items()},
                "memory_at_ready": {r: h.ready.memory for r, h in workers.items()},
                "worker_pids": {r: h.proc.pid for r, h in workers.items() if h.proc is not None},
                "monotonic_ns": time.monotonic_ns()}

    def run_sample(self, sample: dict) -> dict:
        """Every mode on one sample: {"records", "events"}, both tagged with pipeline and node. Raises
        PipelineBroken when a worker dies or the pipeline is being stopped (nothing of the sample is kept)."""
        from coordinator.runner import sample_records
        return self._run(lambda session: {"records": list(sample_records(session, self.cfg, sample))})

    def _run(self, work) -> dict:
        """work(session) -> dict with "records" (and anything else); adds the events and the tags."""
        from coordinator.session import WorkerDied

        with self._lock:
            if self.session is None or self._stopping.is_set():
                raise PipelineBroken(f"pipeline {self.index} is stopped")
            tag = {"pipeline": self.index, "node": self.node}
            try:
                out = work(self.session)
            except WorkerDied as exc:
                self._close_locked()
                raise PipelineBroken(f"pipeline {self.index} on {self.node}: {exc}") from None
            except BaseException:
                self._close_locked()
                raise
            events, self.session.events = self.session.events, []
            out["records"] = [dict(r, **tag) for r in out.get("records", [])]
            out["events"] = [dict(e, **tag) for e in events]
            return out

    def stop(self) -> bool:
        """Called from another thread: end the workers so a running request fails now, then close all."""
        self._stopping.set()
        session = self.session
        if session is not None:
            for handle in session.workers.values():
                if handle.proc is not None and handle.proc.poll() is None:
                    try:
                        handle.proc.send_signal(signal.SIGTERM)
                    except ProcessLookupError:
                        pass
        with self._lock:                  # waits for a running sample to notice and unwind
            self._close_locked()
        return True

    def _close_locked(self) -> None:
        if self.session is not None:
            try:
                self.session.close()
            finally:
                self.session = None
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None
