"""Hostile and unusual peers, through real processes: malformed frames to a worker and to the coordinator's
attached endpoint (answered with ERROR or dropped, nobody dies), an attached worker busy for longer than
the silence limit, endpoint mistakes, a worker's last fatal ERROR."""
import socket
import subprocess
import time

import zmq

from protocol import messages as m
from protocol.transport import Channel, make_socket
from tests.conftest import ROOT, coordinator_cmd, load_results, run_cli
from tests.fuzz_frames import malformed
from tests.peer_support import recv_until, router_channel, spawn_worker

FAKE = ["--draft-backend", "fake", "--target-backend", "fake", "--mps", "off"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc, timeout_s=60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


def test_a_worker_answers_every_malformed_message_with_error_and_keeps_serving():
    cases = malformed()
    ctx, sock, endpoint, chan = router_channel("fuzz")
    procs = {role: spawn_worker(role, endpoint) for role in ("target", "draft")}
    try:
        for role in procs:
            recv_until(chan, m.Ready)

        def fuzz(role):
            for label, frames in cases:
                sock.send_multipart([role.encode(), *frames])
                err = recv_until(chan, m.Error)
                assert "malformed message rejected" in err.reason and err.src == role, label
                assert not err.fatal and procs[role].poll() is None, label

        fuzz("draft")                                       # idle
        fuzz("target")
        chan.send(m.Prefill(request_id="r1", mode="baseline", sample={"sample_id": "x"}, question="q",
                            max_new_tokens=5), to="target")
        recv_until(chan, m.PrefillDone)
        fuzz("target")                                      # in the middle of a request
        chan.send(m.Decode(request_id="r1", max_tokens=4), to="target")
        assert 1 <= len(recv_until(chan, m.DecodeResult).tokens) <= 4
        chan.send(m.Stop(request_id="r1"), to="target")
        assert recv_until(chan, m.Done).request_id == "r1"
        for role, proc in procs.items():
            chan.send(m.Shutdown(), to=role)
            assert proc.wait(timeout=10) == 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        chan.close()
        ctx.term()


def test_the_coordinators_attached_endpoint_survives_malformed_messages_and_strangers(fake_input, tmp_path):
    cases = malformed()
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    out = tmp_path / "out"
    coordinator = subprocess.Popen(
        coordinator_cmd("run", "--input", fake_input, *FAKE, "--output-dir", out, "--draft-endpoint", endpoint,
                        "--mode", "speculative", "--quiet", "--startup-timeout", "120"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = None
    ctx = zmq.Context()
    try:
        wait_listening(port, coordinator)
        stranger = make_socket(ctx, zmq.DEALER, identity="stranger")
        stranger.connect(endpoint)
        for _, frames in cases:                         # dropped: a stranger gets no answer
            stranger.send_multipart(frames)
        stranger_chan = Channel(stranger, "stranger", router=False)
        for msg in (m.Ready(role="draft", vocab_size=32000), m.VerifyResult(request_id="x", accepted=3),
                    m.Error(reason="fatal!", fatal=True)):
            stranger_chan.send(msg)                     # well-formed, but not from a worker of this run
        # the same frames under the draft's name are answered with ERROR, one each
        impostor = make_socket(ctx, zmq.DEALER, identity="draft")
        impostor.connect(endpoint)
        impostor_chan = Channel(impostor, "draft", router=False)
        for label, frames in cases:
            impostor.send_multipart(frames)
            err = recv_until(impostor_chan, m.Error, timeout_s=30)
            assert "malformed message rejected" in err.reason, label
        assert coordinator.poll() is None
        impostor.close(0)
        stranger.close(0)
        time.sleep(0.5)                                 # the identity "draft" is free again
        worker = spawn_worker("draft", endpoint)
        _, err = coordinator.communicate(timeout=120)
        assert coordinator.returncode == 0, err
        records = load_results(out)["records"]
        assert len(records) == 3 and all(r["status"] == "ok" and r["draft"]["prefill_ms"] > 0 for r in records)
        assert "rejected a malformed message from stranger" in err and "Traceback" not in err
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
        if worker is not None:
            worker.kill()
            worker.wait()
        ctx.destroy(linger=0)


def test_an_attached_worker_computing_longer_than_the_silence_limit_is_not_lost(fake_input, tmp_path):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    out = tmp_path / "out"
    # the draft's prefill computes for 4 s without a message of its own; the limit is 1.5 s of silence
    worker = spawn_worker("draft", endpoint, prefill_ms=4000)
    try:
        proc = run_cli("run", "--input", fake_input, *FAKE, "--output-dir", out, "--draft-endpoint", endpoint,
                       "--mode", "speculative", "--samples", "1", "--heartbeat-timeout", "1.5", "--quiet",
                       timeout=120)
        assert proc.returncode == 0, proc.stderr
        record = load_results(out)["records"][0]
        assert record["status"] == "ok" and record["draft"]["prefill_ms"] >= 4000
        assert worker.poll() is None
    finally:
        worker.kill()
        worker.wait()


def test_endpoint_mistakes_name_the_flag(fake_input, tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = run_cli("run", "--input", fake_input, *FAKE, "--output-dir", tmp_path / "a", "--draft-endpoint", endpoint,
                   "--target-endpoint", endpoint, timeout=60)
    assert proc.returncode == 4
    assert f"--target-endpoint {endpoint} is also --draft-endpoint" in proc.stderr
    assert "Traceback" not in proc.stderr and "ZMQError" not in proc.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("run", "--input", fake_input, *FAKE, "--output-dir", tmp_path / "b",
                       "--target-endpoint", f"tcp://127.0.0.1:{port}", timeout=60)
    assert proc.returncode == 4
    assert f"--target-endpoint tcp://127.0.0.1:{port}: cannot listen there" in proc.stderr
    assert "port is in use" in proc.stderr and "Traceback" not in proc.stderr


def test_a_workers_last_fatal_error_reaches_the_coordinator(fake_input, tmp_path):
    """An attached worker that fails to load: its ERROR is the only news (no process to watch, no log)."""
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    coordinator = subprocess.Popen(
        coordinator_cmd("run", "--input", fake_input, *FAKE, "--output-dir", tmp_path / "out",
                        "--draft-endpoint", endpoint, "--startup-timeout", "100", "--quiet"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(port, coordinator)
        worker = spawn_worker("draft", endpoint, crash_on_load="boom")
        assert worker.wait(timeout=60) == 2
        _, err = coordinator.communicate(timeout=60)     # well before the 100 s startup timeout
        assert coordinator.returncode == 3, err
        assert "draft worker failed to start" in err and "boom" in err
    finally:
        if coordinator.poll() is None:
            coordinator.kill()


def test_request_timeout_counts_seconds_without_an_answer(fake_input, tmp_path):
    slow = ["--samples", "1", "--max-new-tokens", "50", "--target-option", "step_ms=40", "--no-adaptive",
            "--request-timeout", "1", "--quiet"]
    # speculative with hopeless drafts: ~50 rounds of one 40 ms step each, > 1 s in all, an answer every step
    proc = run_cli("run", "--input", fake_input, *FAKE, *slow, "--output-dir", tmp_path / "a", "--mode",
                   "speculative", "--draft-option", "quality=wrong", timeout=120)
    assert proc.returncode == 0, proc.stderr
    (record,) = load_results(tmp_path / "a")["records"]
    assert record["status"] == "ok" and record["wall_ms"] > 1500
    # baseline: the target decodes all 50 tokens before it answers, silent for ~2 s
    proc = run_cli("run", "--input", fake_input, *FAKE, *slow, "--output-dir", tmp_path / "b", "--mode", "baseline",
                   timeout=120)
    assert proc.returncode == 1
    (record,) = load_results(tmp_path / "b")["records"]
    assert record["status"] == "error" and "no answer from the workers for 1 s (--request-timeout)" in record["error"]
