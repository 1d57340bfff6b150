"""Start, join and leave Ray for one command, and stop its pipelines on every exit path.

`local` starts a private Ray on this machine (its session files in a temporary folder that is removed at
the end, no dashboard) and shuts it down afterwards; `auto` or `HOST:PORT` joins an existing cluster and
only disconnects. SIGTERM is turned into KeyboardInterrupt while Ray is up, so Ctrl-C and SIGTERM take the
same path: every pipeline is asked to stop (its workers and MPS daemon end), then killed.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile

from . import import_ray

STOP_TIMEOUT_S = 20.0


class RayCluster:
    def __init__(self, address: str, *, quiet: bool = False):
        self.address = address
        self.quiet = quiet
        self.ray = import_ray()
        self.temp_dir: str | None = None
        self.actors: list = []
        self._old_sigterm = None

    def __enter__(self) -> "RayCluster":
        ray = self.ray
        self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)   # while Ray starts
        common = dict(include_dashboard=False, log_to_driver=False, configure_logging=True,
                      logging_level="ERROR")
        try:
            if self.address == "local":
                # short path: Ray puts unix sockets in here
                self.temp_dir = tempfile.mkdtemp(prefix="es-ray-", dir="/tmp")
                ray.init(num_cpus=os.cpu_count() or 1, _temp_dir=self.temp_dir, **common)
            else:
                ray.init(address=self.address, **common)
        except KeyboardInterrupt:
            self.__exit__(None, None, None)
            raise
        except Exception as exc:
            self.__exit__(None, None, None)
            where = "start a local Ray" if self.address == "local" else f"join the Ray cluster at {self.address}"
            raise ConnectionError(f"--ray {self.address}: could not {where}: {exc}") from None
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)     # again: Ray's core installs its own handler
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
        try:
            # a second Ctrl-C while stopping must not leave processes behind: finish the stop first
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                self.stop_actors()
                if self.ray.is_initialized():
                    self.ray.shutdown()
            finally:
                signal.signal(signal.SIGINT, old_int)
        finally:
            if self.temp_dir:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                self.temp_dir = None
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None


def _sigterm_to_interrupt(signum, frame):
    print("coordinator: SIGTERM: stopping every pipeline", file=sys.stderr)
    raise KeyboardInterrupt
