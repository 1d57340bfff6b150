"""One-way latency of a message hop between two processes on this machine: bare pyzmq (ROUTER/DEALER over
ipc) against eventspec's `protocol.transport.Channel` (VERIFY out, VERIFY_RESULT back), the receiver
blocking or spinning on a zero-timeout poll:

    python benchmarks/zmq_hop.py [--rounds 500]

Each round trip is timed with `time.monotonic_ns`, with 3 ms of sleep between rounds (as a worker idles
between a verification and the next window); prints the median one-way time (half a round trip) in µs.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol import messages as m  # noqa: E402
from protocol.transport import Channel, make_socket  # noqa: E402


def _bare_peer(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send(b"hello")
    while (frame := sock.recv()) != b"stop":
        sock.send(frame)
    ctx.destroy(linger=0)


def _recv(chan: Channel, spin: bool):
    if spin:
        end = time.monotonic() + 0.005
        while time.monotonic() < end:
            if chan.sock.poll(0):
                return chan.recv(0)[0]
    return chan.recv(1000)[0]


def _channel_peer(endpoint: str, spin: bool) -> None:
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.DEALER, identity="peer")
    sock.connect(endpoint)
    chan = Channel(sock, "peer", router=False)
    chan.send(m.Heartbeat(busy=False))
    while not isinstance(msg := _recv(chan, spin), m.Stop):
        if msg is not None:
            chan.send(m.VerifyResult(request_id=msg.request_id, accepted=1, next_token=2))
    chan.close()
    ctx.term()


def bare(endpoint: str, rounds: int) -> float:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    peer = mp.Process(target=_bare_peer, args=(endpoint,))
    peer.start()
    ident, _ = sock.recv_multipart()
    hops = []
    for _ in range(rounds):
        start = time.monotonic_ns()
        sock.send_multipart([ident, b"x" * 100])
        sock.recv_multipart()
        hops.append((time.monotonic_ns() - start) / 2e3)
        time.sleep(0.003)
    sock.send_multipart([ident, b"stop"])
    peer.join()
    ctx.destroy(linger=0)
    return statistics.median(hops)


def channel(endpoint: str, rounds: int, spin: bool) -> float:
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.ROUTER)
    sock.bind(endpoint)
    chan = Channel(sock, "coordinator", router=True)
    peer = mp.Process(target=_channel_peer, args=(endpoint, spin))
    peer.start()
    chan.recv(10_000)
    hops = []
    for _ in range(rounds):
        sent = chan.send(m.Verify(request_id="r", start_pos=1, tokens=[1, 2, 3]), to="peer")
        reply = _recv(chan, spin)
        hops.append((reply.recv_ns - sent.sent_ns) / 2e3)
        time.sleep(0.003)
    chan.send(m.Stop(request_id="r"), to="peer")
    peer.join()
    chan.close()
    ctx.term()
    return statistics.median(hops)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="es-hop-") as tmp:
        endpoint = f"ipc://{os.path.join(tmp, 'hop.sock')}"
        print(f"bare pyzmq, blocking:    {bare(endpoint + '0', args.rounds):6.1f} µs one way")
        print(f"Channel, blocking:       {channel(endpoint + '1', args.rounds, False):6.1f} µs one way")
        print(f"Channel, spinning:       {channel(endpoint + '2', args.rounds, True):6.1f} µs one way")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
