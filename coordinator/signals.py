"""Signals that end a run in order: SIGTERM (kill, timeout, a batch scheduler), SIGINT (Ctrl-C), SIGHUP.

The handler raises Interrupted once in the main thread, like Ctrl-C's KeyboardInterrupt, so the run's
`finally` stops the workers and the MPS daemon and writes every output; while that happens a further
signal is only noted. Never imports torch.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager


class Interrupted(BaseException):
    """A signal (SIGTERM, SIGINT, SIGHUP) asked the run to end; raised in the main thread, like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalGuard:
    """SIGTERM, SIGINT and SIGHUP end the run through Interrupted, once; while shutting down (raising is
    False) a signal is only noted, so the workers, the MPS daemon and the outputs are always seen to."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.signum: int | None = None
        self.raising = True
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        if self.raising:
            self.raising = False
            raise Interrupted(signum)

    @contextmanager
    def deferred(self):
        """A few lines no signal may cut in two: one arriving meanwhile is raised right after them."""
        was, self.raising = self.raising, False
        try:
            yield
        finally:
            self.raising = was
            if was and self.signum is not None:
                self.raising = False
                raise Interrupted(self.signum)

    def install(self) -> "SignalGuard":
        self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
