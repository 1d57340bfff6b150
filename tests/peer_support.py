"""What the tests that talk to real worker processes over a test ROUTER share: the socket, a fake worker,
and waiting for one message type."""
import json
import subprocess
import sys
import time

import zmq

from protocol.transport import Channel, ipc_endpoint, make_socket, private_ipc_dir
from tests.conftest import ROOT


def router_channel(name: str = "t"):
    """A coordinator-side ROUTER bound on a private ipc endpoint: (context, socket, endpoint, channel)."""
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.ROUTER)
    endpoint = ipc_endpoint(private_ipc_dir(), name)
    sock.bind(endpoint)
    return ctx, sock, endpoint, Channel(sock, "coordinator", router=True)


def spawn_worker(role, endpoint, **options):
    """A fake-backend worker process connecting to `endpoint`."""
    return subprocess.Popen([sys.executable, "-m", "workers", "--role", role, "--backend", "fake", "--connect",
                             endpoint, "--options-json", json.dumps(options)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def recv_until(chan, cls, timeout_s=20):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg, bad = chan.recv(200)
        assert bad is None, bad
        if isinstance(msg, cls):
            return msg
    raise AssertionError(f"no {cls.__name__} within {timeout_s} s")
