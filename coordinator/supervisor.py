"""Worker processes and message routing: start or attach both workers, watch them, shut them down.

Owns the ROUTER socket, the worker processes (spawned here or started elsewhere and attached by
endpoint), the READY handshake with a deadline, liveness (a dead child or a silent attached worker
becomes WorkerDied within a second or two, never a hang), and the log of every message and span.
Knows nothing of what a request means (coordinator.session does). Never imports torch.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import zmq

from protocol import messages as m
from protocol.transport import Channel, ipc_endpoint, make_socket, private_ipc_dir, spin_ms

from .handles import (RequestFailed, StartupError, WorkerDied, WorkerHandle, WorkerSpec,  # noqa: F401
                      bind_attach_endpoints, ignore_sigint, worker_command)

POLL_MS = 50


class Supervisor:
    """The coordinator's side of the worker processes: one ROUTER, one handle per role, the event log.

    events: None keeps every event in self.events (for callers that read them afterwards); an object with
    add(list_of_events) receives each request's events when the request ends (collect_done) and the rest
    at close, so a long run holds no finished request's events in memory.
    """

    def __init__(self, specs: list[WorkerSpec], *, log_dir: Path, startup_timeout_s: float = 120.0,
                 request_timeout_s: float = 600.0, heartbeat_timeout_s: float = 30.0,
                 allow_public_endpoint: bool = False, events=None):
        self.events: list[dict] = []
        self.event_sink = events
        self.log_dir = Path(log_dir)
        self.startup_timeout_s = startup_timeout_s
        self.request_timeout_s = request_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.workers = {spec.role: WorkerHandle(spec) for spec in specs}
        self._sent: dict[str, dict] = {}          # msg_id -> event, to join recv stamps from DONE
        self.context: dict = {}                   # sample_id / mode of the request in flight
        self._active_at = time.monotonic()        # last message sent or answered (the request timeout)
        self._rejected = 0
        self.ctx = zmq.Context()
        self.ipc_dir = private_ipc_dir()
        sock = make_socket(self.ctx, zmq.ROUTER)
        try:
            self.endpoint = ipc_endpoint(self.ipc_dir, "coordinator")
            sock.bind(self.endpoint)
            bind_attach_endpoints(sock, specs, allow_public_endpoint)
        except BaseException:
            sock.close(0)
            self.ctx.term()
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
            raise
        self.chan = Channel(sock, "coordinator", router=True)
        self.spin_ms = spin_ms()             # a wait for a worker's message spins this long before it blocks

    # --- processes -------------------------------------------------------------------------

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for handle in self.workers.values():
            if handle.spec.endpoint:
                continue
            handle.log_path = self.log_dir / f"{handle.name}.log"
            env = {**os.environ, **handle.spec.env, "PYTHONUNBUFFERED": "1"}
            with open(handle.log_path, "wb") as log:
                # own session: a terminal's Ctrl-C or a group signal reaches the coordinator only, which then
                # shuts the workers down in order (and they die with it: PR_SET_PDEATHSIG in the worker)
                handle.proc = subprocess.Popen(worker_command(handle.spec, self.endpoint, os.getpid()),
                                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               env=env, start_new_session=True, preexec_fn=ignore_sigint)
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
            handle = self.workers[msg.src]
            if isinstance(msg, m.Hello):
                handle.hello = msg
            elif isinstance(msg, m.Ready):
                handle.ready = msg
            elif isinstance(msg, m.Heartbeat) and handle.hello is None and not handle.asked_hello:
                self.send(m.Hello(), handle.name)      # an attached worker that announced itself earlier
                handle.asked_hello = True
            elif isinstance(msg, m.Error) and msg.fatal:
                raise WorkerDied(self._fatal_message(msg, "failed to start"))

    def check_workers(self) -> None:
        now = time.monotonic()
        for h in self.workers.values():
            if h.proc is not None:
                code = h.proc.poll()
                if code is not None:
                    raise WorkerDied(h.death_message(code))
            elif h.ready is not None and now - h.last_seen > self.heartbeat_timeout_s:
                raise WorkerDied(f"{h.name} worker attached at {h.spec.endpoint} sent nothing for "
                                 f"{now - h.last_seen:.0f} s, not even a heartbeat (--heartbeat-timeout "
                                 f"{self.heartbeat_timeout_s:g}); is it still running?")

    def _lost_message(self, role: str, why: str) -> str:
        """A worker that cannot be reached: name its death (pid, signal, log) when it is one of ours."""
        h = self.workers.get(role)
        if h is None:
            return f"no worker called {role!r} ({why})"
        if h.proc is None:
            return f"{role} worker attached at {h.spec.endpoint} disconnected ({why})"
        try:
            code = h.proc.wait(timeout=3)      # the socket goes before the process is reaped
        except subprocess.TimeoutExpired:
            return f"{role} worker (pid {h.proc.pid}) is running but unreachable ({why})"
        return h.death_message(code)

    def _fatal_message(self, msg: m.Error, what: str = "reported a fatal error") -> str:
        h = self.workers[msg.src]
        text = f"{msg.src} worker {what}: {msg.reason}"
        if h.proc is not None:
            try:
                code = h.proc.wait(timeout=3)
                text += "\n" + h.death_message(code)
            except subprocess.TimeoutExpired:
                pass
        return text

    def close(self) -> None:
        """Shut every spawned worker down, escalating to SIGKILL; never leaves a process behind."""
        try:
            spawned = [h for h in self.workers.values() if h.proc is not None and h.proc.poll() is None]
            for h in spawned:
                try:
                    self.chan.send(m.Shutdown(reason="run finished"), to=h.name)
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
        finally:
            self.chan.close()
            self.ctx.term()
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
            self.flush_events()

    # --- messages --------------------------------------------------------------------------

    def send(self, msg: m.Message, to: str) -> m.Message:
        try:
            self.chan.send(msg, to=to)
        except zmq.ZMQError as exc:
            raise WorkerDied(self._lost_message(to, f"sending {msg.type}: {exc}")) from None
        self._active_at = time.monotonic()
        self._log_message(msg)
        return msg

    def _log_message(self, msg: m.Message) -> None:
        if isinstance(msg, m.Heartbeat):
            return                                 # liveness only: nothing to time or to draw
        event = {"kind": "message", "type": msg.type, "src": msg.src, "dst": msg.dst or "coordinator",
                 "request_id": msg.request_id, "msg_id": msg.msg_id, "sent_ns": msg.sent_ns,
                 "recv_ns": msg.recv_ns or None, **self.context}
        if isinstance(msg, (m.Draft, m.Verify)):      # which answer positions: the pipeline is visible in the log
            event.update(start_pos=msg.start_pos, n_tokens=len(msg.tokens))
        elif isinstance(msg, m.Rebase):
            event.update(epoch=msg.epoch, committed_len=len(msg.committed), max_ahead=msg.max_ahead)
        if msg.src == "coordinator":
            self._sent[msg.msg_id] = event
        self.events.append(event)

    def flush_events(self) -> None:
        """Hand the events logged so far to the sink (if any) and forget them."""
        if self.event_sink is not None and self.events:
            events, self.events = self.events, []
            self.event_sink.add(events)

    def _recv_raw(self, timeout_ms: float, spin_ms: float = 0.0) -> m.Message | None:
        """One message from a known worker, or None (timeout, or a message dropped or answered with ERROR)."""
        self.check_workers()
        msg, bad = self.chan.recv(timeout_ms, spin_ms)
        if bad:
            sender = bad.split(":", 1)[0]
            self._rejected += 1
            if self._rejected <= 20:
                print(f"coordinator: rejected a malformed message from {bad[:300]}", file=sys.stderr)
                if self._rejected == 20:
                    print("coordinator: further malformed messages are rejected silently", file=sys.stderr)
            if sender in self.workers:
                try:
                    self.send(m.Error(reason=f"malformed message rejected: {bad[:300]}"), sender)
                except WorkerDied:
                    pass                           # its death is reported by check_workers
            return None
        if msg is None:
            return None
        handle = self.workers.get(msg.src)
        if handle is None:
            self._rejected += 1
            if self._rejected <= 20:
                print(f"coordinator: dropped a {msg.type} from unknown peer {msg.src[:40]!r}", file=sys.stderr)
            return None
        msg.dst = "coordinator"
        handle.last_seen = time.monotonic()
        if isinstance(msg, m.Error):
            handle.last_error = msg.reason
        self._log_message(msg)
        return msg

    def recv(self, deadline: float | None = None, timeout_ok: bool = False) -> m.Message | None:
        """The next message from a worker that is not a heartbeat.

        With timeout_ok, returns None at deadline (monotonic seconds). Raises RequestFailed when no worker
        has answered for request_timeout_s since the coordinator last sent or received a message, and
        WorkerDied for a dead worker or a fatal ERROR.
        """
        spin_until = time.monotonic() + self.spin_ms / 1e3
        while True:
            now = time.monotonic()
            if timeout_ok and deadline is not None and now > deadline:
                return None
            if now - self._active_at > self.request_timeout_s:
                raise RequestFailed(f"no answer from the workers for {self.request_timeout_s:g} s "
                                    f"(--request-timeout)")
            msg = self._recv_raw(POLL_MS, max(0.0, (spin_until - now) * 1e3))
            if msg is None or isinstance(msg, m.Heartbeat):
                continue
            self._active_at = time.monotonic()
            if isinstance(msg, m.Error) and msg.fatal:
                raise WorkerDied(self._fatal_message(msg))
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
                raise WorkerDied(self._fatal_message(msg))
        self._sent.clear()                         # this request's stamps are joined; keep nothing per request
        self.flush_events()
        return dones
