"""What the worker's loops share: heartbeats (sent from a thread, also while a step computes) and the
exception that ends a request early."""
from __future__ import annotations

import threading
import time

from protocol import messages as m

HEARTBEAT_S = 1.0


class RequestAborted(Exception):
    """The coordinator stopped the request (STOP) or the worker (SHUTDOWN) mid-way."""

    def __init__(self, shutdown: bool = False):
        super().__init__("stopped")
        self.shutdown = shutdown


class Heartbeats:
    """Sends HEARTBEAT whenever the channel has sent nothing for period_s, from a daemon thread, so a worker
    computing for minutes (a long prefill, a 500-token decode) is not taken for dead by the coordinator.

    The channel's lock keeps the socket to one thread at a time; busy() says whether a request is open.
    """

    def __init__(self, chan, busy=lambda: False, period_s: float = HEARTBEAT_S):
        self.chan, self.busy, self.period_s = chan, busy, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)

    def start(self) -> "Heartbeats":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s / 4):
            if time.monotonic() - self.chan.last_send >= self.period_s:
                try:
                    self.chan.send(m.Heartbeat(busy=bool(self.busy())), to="coordinator")
                except Exception:          # the socket is closing: the process is ending anyway
                    return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
