"""What the coordinator knows about each worker: its spec, its process handle, how to start and name it.

Plain data and small helpers (the worker command line, binding attach endpoints, describing a death);
the loop that watches the workers is coordinator.supervisor. Never imports torch.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from protocol import messages as m
from protocol.transport import check_endpoint


class WorkerDied(Exception):
    """A worker process ended or stopped answering: the run cannot go on."""


class StartupError(Exception):
    """The workers could not be started or attached (the message names the flag or file to change)."""


class RequestFailed(Exception):
    """One request failed; the workers are fine and the next request may run."""


@dataclass
class WorkerSpec:
    role: str                           # draft | target
    backend: str
    options: dict = field(default_factory=dict)
    endpoint: str | None = None          # attach: bind here and wait for a worker started elsewhere
    env: dict = field(default_factory=dict)


@dataclass
class WorkerHandle:
    spec: WorkerSpec
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    ready: m.Ready | None = None
    hello: m.Hello | None = None
    last_seen: float = 0.0
    last_error: str = ""
    asked_hello: bool = False           # an attached worker that started first was asked to say hello

    @property
    def name(self) -> str:
        return self.spec.role

    def log_tail(self, lines: int = 6) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 16384))
            text = log.read().decode(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def death_message(self, code: int) -> str:
        """Role, pid, how it ended (exit code or signal), its last error and the last lines of its log."""
        how = f"killed by signal {-code} ({signal_name(-code)})" if code < 0 else f"exit code {code}"
        if code == -signal.SIGKILL:
            how += "; out of memory or kill -9?"
        text = f"{self.name} worker (pid {self.proc.pid}) died: {how}"
        if self.last_error:
            text += f"; last error: {self.last_error}"
        tail = self.log_tail()
        if tail:
            text += f"\n--- last lines of {self.log_path} ---\n{tail}"
        elif self.log_path:
            text += f" (its log {self.log_path} is empty)"
        return text


def worker_command(spec: WorkerSpec, endpoint: str, parent_pid: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "workers", "--role", spec.role, "--backend", spec.backend, "--connect", endpoint,
           "--options-json", json.dumps(spec.options)]
    if parent_pid:
        cmd += ["--parent-pid", str(parent_pid)]
    return cmd


def bind_attach_endpoints(sock: zmq.Socket, specs: list[WorkerSpec], allow_public: bool) -> None:
    """Bind where attached workers will connect; every mistake is a StartupError naming the flag."""
    seen: dict[str, str] = {}
    for spec in specs:
        if not spec.endpoint:
            continue
        flag = f"--{spec.role}-endpoint"
        if spec.endpoint in seen:
            raise StartupError(f"{flag} {spec.endpoint} is also {seen[spec.endpoint]}: each attached worker "
                               f"needs its own endpoint (another port or ipc path)")
        seen[spec.endpoint] = f"--{spec.role}-endpoint"
        try:
            sock.bind(check_endpoint(spec.endpoint, allow_public=allow_public))
        except ValueError as exc:
            raise StartupError(f"{flag}: {exc}") from None
        except zmq.ZMQError as exc:
            hint = ("the port is in use (another run?); choose another port" if exc.errno == errno.EADDRINUSE
                    else "check the address")
            raise StartupError(f"{flag} {spec.endpoint}: cannot listen there ({exc.strerror}); {hint}") from None


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def ignore_sigint() -> None:
    """Workers leave Ctrl-C to the coordinator, which shuts them down in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
