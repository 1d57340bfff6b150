"""A real worker process on a test ROUTER: handshake, malformed input answered with ERROR, shutdown."""
from protocol import messages as m
from tests.peer_support import recv_until, router_channel, spawn_worker


def test_worker_handshake_malformed_messages_and_shutdown():
    ctx, sock, endpoint, chan = router_channel()
    proc = spawn_worker("target", endpoint)
    try:
        hello = recv_until(chan, m.Hello)
        ready = recv_until(chan, m.Ready)
        assert hello.pid == proc.pid == ready.pid and ready.role == "target"
        assert ready.vocab_size == 32000 and ready.eos_id == 2 and ready.tokenizer_checksum
        assert ready.memory["rss_bytes"] > 0
        assert ready.sent_ns <= ready.recv_ns
        # garbage, an unknown type, a wrong version: each answered with ERROR, the worker lives on
        sock.send_multipart([b"target", b"\xc1\xc1 not msgpack"])
        err = recv_until(chan, m.Error)
        assert "malformed" in err.reason
        import msgpack
        sock.send_multipart([b"target", msgpack.packb({"v": 1, "type": "explode", "body": {}})])
        assert "unknown message type" in recv_until(chan, m.Error).reason
        sock.send_multipart([b"target", msgpack.packb({"v": 7, "type": "stop", "body": {}})])
        assert "version 7" in recv_until(chan, m.Error).reason
        # a request with a nonexistent input folder: ERROR naming it, then DONE after STOP
        chan.send(m.Prefill(request_id="r1", mode="baseline", sample={"sample_id": "x", "path": "/nonexistent"},
                            question="q", max_new_tokens=5), to="target")
        pd = recv_until(chan, m.PrefillDone)
        assert pd.request_id == "r1"
        chan.send(m.Decode(request_id="r1", max_tokens=4), to="target")
        res = recv_until(chan, m.DecodeResult)
        assert 1 <= len(res.tokens) <= 4
        chan.send(m.Stop(request_id="r1"), to="target")
        done = recv_until(chan, m.Done)
        names = [s[0] for s in done.spans]
        assert names[:2] == ["load_inputs", "prefill"] and names.count("decode") == len(res.tokens)
        assert all(s[1] <= s[2] for s in done.spans)
        chan.send(m.Shutdown(), to="target")
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        chan.close()
        ctx.term()
