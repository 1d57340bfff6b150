"""Worker processes and message routing: start or attach both workers, watch them, shut them down.

Owns the ROUTER socket, the worker processes (spawned here or started elsewhere and attached by
endpoint), the READY handshake with a deadline, liveness (a dead child or a silent attached worker
becomes WorkerDied within a second or two, never a hang), and the log of every message and span.
Knows nothing of what a request means (coordinator.session does). Never imports torch.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from protocol import messages as m
from protocol.transport import Channel, check_endpoint, ipc_endpoint, make_socket, private_ipc_dir

POLL_MS = 50


class WorkerDied(Exception):
    pass


class StartupError(Exception):
    pass


class RequestFailed(Exception):
    pass


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

    @property
    def name(self) -> str:
        return self.spec.role

    def log_tail(self, lines: int = 6) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])


def worker_command(spec: WorkerSpec, endpoint: str, parent_pid: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "workers", "--role", spec.role, "--backend", spec.backend, "--connect", endpoint,
           "--options-json", json.dumps(spec.options)]
    if parent_pid:
        cmd += ["--parent-pid", str(parent_pid)]
    return cmd


class Supervisor:
    def __init__(self, specs: list[WorkerSpec], *, log_dir: Path, startup_timeout_s: float = 120.0,
                 request_timeout_s: float = 600.0, heartbeat_timeout_s: float = 30.0,
                 allow_public_endpoint: bool = False, progress=None):
        self.events: list[dict] = []
        self.log_dir = Path(log_dir)
        self.startup_timeout_s = startup_timeout_s
        self.request_timeout_s = request_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.ctx = zmq.Context()
        sock = make_socket(self.ctx, zmq.ROUTER)
        self.ipc_dir = private_ipc_dir()
        self.endpoint = ipc_endpoint(self.ipc_dir, "coordinator")
        sock.bind(self.endpoint)
        for spec in specs:
            if spec.endpoint:
                sock.bind(check_endpoint(spec.endpoint, allow_public=allow_public_endpoint))
        self.chan = Channel(sock, "coordinator", router=True)
        self.workers = {spec.role: WorkerHandle(spec) for spec in specs}
        self._sent: dict[str, dict] = {}          # msg_id -> event, to join recv stamps from DONE
        self.context: dict = {}                   # sample_id / mode of the request in flight
        self.progress = progress

    # --- processes -------------------------------------------------------------------------

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for handle in self.workers.values():
            if handle.spec.endpoint:
                continue
            handle.log_path = self.log_dir / f"{handle.name}.log"
            log = open(handle.log_path, "wb")
            env = {**os.environ, **handle.spec.env, "PYTHONUNBUFFERED": "1"}
            handle.proc = subprocess.Popen(worker_command(handle.spec, self.endpoint, os.getpid()),
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=env, preexec_fn=_ignore_sigint)
            log.close()
            handle.last_seen = time.monotonic()
        self._await_ready()

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while any(h.ready is None for h in self.workers.values()):
            if time.monotonic() > deadline:
                missing = [h for h in self.workers.values() if h.ready is None]
                parts = []
                for h in missing:
                    where = f"attached at {h.spec.endpoint}" if h.spec.endpoint else f"pid {h.proc.pid}"
                    state = "said hello but did not finish loading" if h.hello else "never answered"
                    parts.append(f"{h.name} worker ({where}) {state} within {self.startup_timeout_s:g} s"
                                 + (f"; last log lines:\n{h.log_tail()}" if h.log_tail() else ""))
                raise StartupError("; ".join(parts) + ". Raise --startup-timeout if loading is just slow.")
            msg = self._recv_raw(POLL_MS)
            if msg is None:
                continue
            handle = self.workers.get(msg.src)
            if handle is None:
                continue
            if isinstance(msg, m.Hello):
                handle.hello = msg
            elif isinstance(msg, m.Ready):
                handle.ready = msg
            elif isinstance(msg, m.Heartbeat) and handle.ready is None:
                self.send(m.Hello(), handle.name)      # an attached worker that announced itself earlier
            elif isinstance(msg, m.Error) and msg.fatal:
                raise WorkerDied(f"{handle.name} worker failed to start: {msg.reason}")

    def check_workers(self) -> None:
        now = time.monotonic()
        for h in self.workers.values():
            if h.proc is not None:
                code = h.proc.poll()
                if code is not None:
                    raise WorkerDied(self._death_message(h, code))
            elif h.ready is not None and now - h.last_seen > self.heartbeat_timeout_s:
                raise WorkerDied(f"{h.name} worker at {h.spec.endpoint} sent nothing for "
                                 f"{now - h.last_seen:.0f} s (no heartbeat); is it still running?")

    def _death_message(self, h: WorkerHandle, code: int) -> str:
        how = f"killed by signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"exit code {code}"
        if code == -signal.SIGKILL:
            how += "; out of memory or kill -9?"
        text = f"{h.name} worker (pid {h.proc.pid}) died: {how}"
        if h.last_error:
            text += f"; last error: {h.last_error}"
        tail = h.log_tail()
        if tail:
            text += f"\n--- last lines of {h.log_path} ---\n{tail}"
        return text

    def close(self) -> None:
        """Shut every spawned worker down, escalating to SIGKILL; never leaves a process behind."""
        spawned = [h for h in self.workers.values() if h.proc is not None and h.proc.poll() is None]
        for h in spawned:
            try:
                self.send(m.Shutdown(reason="run finished"), h.name)
            except Exception:
                pass
        deadline = time.monotonic() + 5
        for h in spawned:
            try:
                h.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                h.proc.terminate()
        for h in spawned:
            try:
                h.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                h.proc.kill()
                h.proc.wait(timeout=5)
        self.chan.close()
        self.ctx.term()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    # --- messages --------------------------------------------------------------------------

    def send(self, msg: m.Message, to: str) -> m.Message:
        try:
            self.chan.send(msg, to=to)
        except zmq.ZMQError as exc:
            raise WorkerDied(f"{to} worker is not connected ({exc})") from None
        self._log_message(msg)
        return msg

    def _log_message(self, msg: m.Message) -> None:
        event = {"kind": "message", "type": msg.type, "src": msg.src, "dst": msg.dst or "coordinator",
                 "request_id": msg.request_id, "msg_id": msg.msg_id, "sent_ns": msg.sent_ns,
                 "recv_ns": msg.recv_ns or None, **self.context}
        if msg.src == "coordinator":
            self._sent[msg.msg_id] = event
        self.events.append(event)

    def _recv_raw(self, timeout_ms: float) -> m.Message | None:
        self.check_workers()
        msg, bad = self.chan.recv(timeout_ms)
        if bad:
            sender = bad.split(":", 1)[0]
            print(f"coordinator: rejected a malformed message from {bad}", file=sys.stderr)
            if sender in self.workers:
                self.send(m.Error(reason=f"malformed message rejected: {bad}"), sender)
            return None
        if msg is None:
            return None
        msg.dst = "coordinator"
        handle = self.workers.get(msg.src)
        if handle is not None:
            handle.last_seen = time.monotonic()
            if isinstance(msg, m.Error):
                handle.last_error = msg.reason
        self._log_message(msg)
        return msg

    def recv(self, deadline: float, timeout_ok: bool = False) -> m.Message | None:
        while True:
            if time.monotonic() > deadline:
                if timeout_ok:
                    return None
                raise RequestFailed(f"no answer from the workers within {self.request_timeout_s:g} s "
                                    f"(request timeout)")
            msg = self._recv_raw(POLL_MS)
            if msg is None or isinstance(msg, m.Heartbeat):
                continue
            if isinstance(msg, m.Error) and msg.fatal:
                raise WorkerDied(f"{msg.src} worker reported a fatal error: {msg.reason}")
            return msg

    def collect_done(self, rid: str, roles: list[str], early: dict) -> dict[str, m.Done]:
        """Wait for each role's DONE of request rid; join its receive stamps and spans into the event log."""
        dones: dict[str, m.Done] = {}
        pending = list(early.values())
        deadline = time.monotonic() + 30
        while len(dones) < len(roles):
            if time.monotonic() > deadline:
                raise WorkerDied(f"worker(s) {sorted(set(roles) - set(dones))} did not confirm the end of request "
                                 f"{rid} within 30 s")
            msg = pending.pop() if pending else self._recv_raw(POLL_MS)
            if isinstance(msg, m.Done) and msg.request_id == rid:
                dones[msg.src] = msg
                for msg_id, _type, recv_ns in msg.received:
                    if msg_id in self._sent:
                        self._sent[msg_id]["recv_ns"] = recv_ns
                for name, start, end, attrs in msg.spans:
                    self.events.append({"kind": "span", "name": name, "proc": msg.src, "start_ns": start,
                                        "end_ns": end, "request_id": rid, "attrs": attrs, **self.context})
            elif isinstance(msg, m.Error) and msg.fatal:
                raise WorkerDied(f"{msg.src} worker reported a fatal error: {msg.reason}")
        return dones


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the coordinator, which shuts them down in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
