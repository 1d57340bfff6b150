"""ZeroMQ sockets and endpoints: the one place sockets are made.

The coordinator binds a ROUTER, each worker connects a DEALER whose identity is its name. Every socket
has LINGER 0 (close(linger_ms) lets a last message leave), bounded queues and a bounded message size;
every receive has a deadline. A Channel may be shared by two threads (a worker's heartbeat thread): every
socket operation holds its lock. Default endpoints are ipc:// in a private
0700 temporary directory; tcp is loopback unless the user names another address.
"""
from __future__ import annotations

import ipaddress
import itertools
import os
import tempfile
import threading
import time
from urllib.parse import urlparse

import zmq

from .messages import Message, ProtocolError, decode, encode

HWM = 10_000
MAX_MESSAGE_BYTES = 1 << 30      # a peer sending more is disconnected, not buffered
POLL_SLICE_MS = 100             # a waiting recv releases the lock this often
SPIN_MS = 20.0                  # how long a waiting process spins during a request, where cores allow it
SPIN_MIN_CPUS = 8               # spin only on a host with this many usable cores (a spinner holds one)
_yield = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))


def spin_ms(environ=os.environ, cpus: int | None = None) -> float:
    """How long a process waiting for a message during a request polls without sleeping before it blocks:
    EVENTSPEC_SPIN_MS where set (0 turns spinning off), else SPIN_MS on a host with at least SPIN_MIN_CPUS
    usable cores and 0 below. A blocked receiver is woken by the OS; spinning saves that wake-up on every hop
    of a round (the coordinator and both workers spin, so up to three cores are busy while a request runs;
    with too few cores spinning starves the work itself: 2.4 ms a hop measured on 2 cores)."""
    text = environ.get("EVENTSPEC_SPIN_MS")
    if text is not None:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"EVENTSPEC_SPIN_MS must be a number of milliseconds; got {text!r}") from None
        if not 0 <= value <= 60_000:
            raise ValueError(f"EVENTSPEC_SPIN_MS must be between 0 and 60000; got {text!r}")
        return value
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return SPIN_MS if cpus >= SPIN_MIN_CPUS else 0.0


def private_ipc_dir() -> str:
    """A short, user-only directory for ipc sockets (Unix socket paths are limited to ~107 bytes)."""
    base = "/tmp" if os.path.isdir("/tmp") else None
    path = tempfile.mkdtemp(prefix="es-", dir=base)
    os.chmod(path, 0o700)
    return path


def ipc_endpoint(directory: str, name: str) -> str:
    return f"ipc://{os.path.join(directory, name)}.sock"


def check_endpoint(endpoint: str, *, allow_public: bool = False) -> str:
    """Refuse endpoints that would listen on or reach a non-loopback interface unless asked for."""
    parsed = urlparse(endpoint)
    if parsed.scheme == "ipc":
        return endpoint
    if parsed.scheme != "tcp":
        raise ValueError(f"endpoint {endpoint!r}: use ipc://PATH or tcp://HOST:PORT")
    host = parsed.hostname or ""
    if host in ("localhost",):
        return endpoint
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_public:
        raise ValueError(
            f"endpoint {endpoint!r} is not on loopback; pass --allow-public-endpoint to use another interface")
    return endpoint


def make_socket(ctx: zmq.Context, kind: int, identity: str | None = None) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity.encode())
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)   # sending to an unknown peer raises, not drops
    return sock


class Channel:
    """One socket plus stamping, ids and decoding; its lock makes it safe to share between threads."""

    def __init__(self, sock: zmq.Socket, name: str, *, router: bool):
        self.sock = sock
        self.name = name
        self.router = router
        self._ids = itertools.count()
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        self.lock = threading.Lock()
        self.last_send = time.monotonic()

    def send(self, msg: Message, to: str | None = None) -> Message:
        with self.lock:
            msg.src = self.name
            if to is not None:
                msg.dst = to
            if not msg.msg_id:
                msg.msg_id = f"{self.name}-{next(self._ids)}"
            msg.sent_ns = time.monotonic_ns()
            frames = encode(msg)
            if self.router:
                self.sock.send_multipart([msg.dst.encode()] + frames, copy=False)
            else:
                self.sock.send_multipart(frames, copy=False)
            self.last_send = time.monotonic()
        return msg

    def recv(self, timeout_ms: float, spin_ms: float = 0.0) -> tuple[Message | None, str | None]:
        """Wait at most timeout_ms, polling without sleeping for the first spin_ms of it. Returns
        (message, None), (None, None) on timeout, or (None, reason) for a malformed message (the caller
        answers with ERROR)."""
        start = time.monotonic()
        deadline = start + max(0.0, timeout_ms) / 1e3
        spin_until = min(deadline, start + max(0.0, spin_ms) / 1e3)
        frames = None
        while frames is None:
            now = time.monotonic()
            spinning = now < spin_until
            with self.lock:
                wait_ms = 0 if spinning else max(0, min(POLL_SLICE_MS, int((deadline - now) * 1e3)))
                if self.poller.poll(wait_ms):
                    frames = self.sock.recv_multipart()
            if frames is not None:
                break
            if spinning:
                _yield()                        # another thread of this process (heartbeats) may take the lock
            elif time.monotonic() >= deadline:
                return None, None
        recv_ns = time.monotonic_ns()
        sender = None
        if self.router:
            sender, frames = frames[0].decode(errors="replace")[:64], frames[1:]
        try:
            msg = decode(frames, recv_ns)
        except ProtocolError as exc:
            return None, f"{sender or 'peer'}: {exc}"
        if self.router:
            msg.src = sender
        return msg, None

    def close(self, linger_ms: int = 0) -> None:
        """Close the socket; linger_ms > 0 lets queued messages (a last fatal ERROR) leave first."""
        with self.lock:
            self.sock.close(linger_ms)
