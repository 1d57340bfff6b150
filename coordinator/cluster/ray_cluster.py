"""Start, join and leave Ray for one command, and stop its pipelines on every exit path.

`local` starts a private Ray on this machine (its session files in a temporary folder that is removed at
the end, no dashboard) and shuts it down afterwards; `auto` or `HOST:PORT` joins an existing cluster and
only disconnects. While Ray is up, SIGTERM, SIGINT (Ctrl-C) and SIGHUP end the command through
coordinator.signals (Interrupted, once; Ray's own SIGTERM handler is replaced after it starts); on the way out
every pipeline is asked to stop (its workers and MPS daemon end), then killed, and further signals are only
noted (`guard.signum`).
"""
from __future__ import annotations

import os
import shutil
import tempfile

from ..signals import SignalGuard
from . import import_ray

STOP_TIMEOUT_S = 20.0


class RayCluster:
    def __init__(self, address: str):
        self.address = address
        self.ray = import_ray()
        self.temp_dir: str | None = None
        self.actors: list = []
        self.guard: SignalGuard | None = None

    def __enter__(self) -> "RayCluster":
        ray = self.ray
        common = dict(include_dashboard=False, log_to_driver=False, configure_logging=True,
                      logging_level="ERROR")
        try:
            if self.address == "local":
                # short path: Ray puts unix sockets in here
                self.temp_dir = tempfile.mkdtemp(prefix="es-ray-", dir="/tmp")
                ray.init(num_cpus=os.cpu_count() or 1, _temp_dir=self.temp_dir, **common)
            else:
                ray.init(address=self.address, **common)
        except BaseException as exc:
            self.__exit__(None, None, None)
            if not isinstance(exc, Exception):
                raise
            where = "start a local Ray" if self.address == "local" else f"join the Ray cluster at {self.address}"
            raise ConnectionError(f"--ray {self.address}: could not {where}: {exc}") from None
        self.guard = SignalGuard().install()       # after ray.init: Ray's core installs its own SIGTERM handler
        return self

    def resources(self) -> tuple[float, float]:
        """(CPUs, GPUs) of the whole cluster."""
        res = self.ray.cluster_resources()
        return float(res.get("CPU", 0)), float(res.get("GPU", 0))

    def stop_actors(self) -> None:
        """Ask every pipeline to stop (workers, MPS daemon, temp folders), wait a while, then kill it."""
        ray = self.ray
        if not self.actors or not ray.is_initialized():
            return
        refs = []
        for actor in self.actors:
            try:
                refs.append(actor.stop.remote())
            except Exception:
                pass
        try:
            ray.wait(refs, num_returns=len(refs), timeout=STOP_TIMEOUT_S)
        except Exception:
            pass
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:
                pass
        self.actors = []

    def __exit__(self, *exc) -> None:
        if self.guard is not None:
            self.guard.raising = False              # stopping is never interrupted; a signal is only noted
        try:
            self.stop_actors()
            if self.ray.is_initialized():
                self.ray.shutdown()
        finally:
            if self.temp_dir:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                self.temp_dir = None
            if self.guard is not None:
                self.guard.restore()
