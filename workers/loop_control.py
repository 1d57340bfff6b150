"""What the worker's loops share: the heartbeat period and the exception that ends a request early."""
from __future__ import annotations

HEARTBEAT_S = 1.0


class RequestAborted(Exception):
    """The coordinator stopped the request (STOP) or the worker (SHUTDOWN) mid-way."""

    def __init__(self, shutdown: bool = False):
        super().__init__("stopped")
        self.shutdown = shutdown
