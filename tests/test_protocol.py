"""The wire format: typed msgpack messages, array frames, rejection of what does not fit."""
import msgpack
import numpy as np
import pytest

from protocol import messages as m
from protocol.transport import check_endpoint


def roundtrip(msg):
    return m.decode([bytes(f) for f in m.encode(msg)])


def test_every_type_roundtrips_with_its_fields():
    for name, cls in m.MESSAGE_TYPES.items():
        got = roundtrip(cls(src="draft", request_id="r1", msg_id="draft-3", sent_ns=123))
        assert type(got) is cls and got.type == name
        assert (got.src, got.request_id, got.msg_id, got.sent_ns) == ("draft", "r1", "draft-3", 123)
        assert got.recv_ns >= 0


def test_payload_and_arrays_travel_as_frames():
    probs = np.random.default_rng(0).random((3, 7), dtype=np.float32)
    msg = m.Draft(epoch=2, start_pos=5, tokens=[4, 5, 6])
    msg.arrays["probs"] = probs
    frames = m.encode(msg)
    assert len(frames) == 2                       # header + one zero-copy array frame
    assert b"probs" in frames[0] and len(frames[1]) == probs.nbytes
    got = m.decode([bytes(f) for f in frames])
    assert (got.epoch, got.start_pos, got.tokens) == (2, 5, [4, 5, 6])
    np.testing.assert_array_equal(got.arrays["probs"], probs)


def test_unknown_type_and_version_are_rejected_with_reasons():
    head = msgpack.unpackb(m.encode(m.Stop())[0])
    bad_type = dict(head, type="launch_missiles")
    with pytest.raises(m.ProtocolError, match="unknown message type 'launch_missiles'"):
        m.decode([msgpack.packb(bad_type)])
    bad_version = dict(head, v=99)
    with pytest.raises(m.ProtocolError, match="version 99"):
        m.decode([msgpack.packb(bad_version)])
    with pytest.raises(m.ProtocolError, match="not valid msgpack|not a map"):
        m.decode([b"\xc1garbage"])
    with pytest.raises(m.ProtocolError, match="unknown fields"):
        m.decode([msgpack.packb(dict(head, body={"reason": "x", "evil": 1}))])


def test_array_frames_must_match_their_description():
    msg = m.Verify(tokens=[1, 2])
    msg.arrays["probs"] = np.zeros((2, 3), np.float32)
    frames = [bytes(f) for f in m.encode(msg)]
    with pytest.raises(m.ProtocolError, match="2 frames|1 arrays described"):
        m.decode(frames + [b"extra"])
    with pytest.raises(m.ProtocolError, match="bytes"):
        m.decode([frames[0], frames[1][:-4]])
    head = msgpack.unpackb(frames[0])
    head["arrays"][0][1] = "|O"                  # object arrays would need pickle: never
    with pytest.raises(m.ProtocolError, match="dtype"):
        m.decode([msgpack.packb(head), frames[1]])


def test_endpoints_stay_on_loopback_unless_allowed():
    assert check_endpoint("ipc:///tmp/x.sock")
    assert check_endpoint("tcp://127.0.0.1:5555")
    assert check_endpoint("tcp://[::1]:5555")
    with pytest.raises(ValueError, match="not on loopback"):
        check_endpoint("tcp://0.0.0.0:5555")
    assert check_endpoint("tcp://0.0.0.0:5555", allow_public=True)
    with pytest.raises(ValueError):
        check_endpoint("http://127.0.0.1:80")


def test_every_malformed_frame_is_a_protocol_error_and_nothing_else():
    from tests.fuzz_frames import malformed

    cases = malformed()
    assert len(cases) >= 30 and len({label for label, _ in cases}) == len(cases)
    for label, frames in cases:
        with pytest.raises(m.ProtocolError):
            m.decode(frames)
            pytest.fail(f"{label}: accepted")


def test_field_types_come_from_the_annotations():
    good = m.Prefill(mode="baseline", max_new_tokens=7, sample={"sample_id": "a"}, options={"k": [1, 2]})
    assert roundtrip(good).max_new_tokens == 7
    head = msgpack.unpackb(m.encode(good)[0])
    head["body"]["max_new_tokens"] = "many"
    with pytest.raises(m.ProtocolError, match="prefill: field 'max_new_tokens' must be an integer, not str 'many'"):
        m.decode([msgpack.packb(head)])
    done = m.Done(spans=[["prefill", 1, 2, {"k": 1}]], received=[["c-1", "prefill", 3]], stats={"text": "hi"})
    assert roundtrip(done).spans == [["prefill", 1, 2, {"k": 1}]]


def test_spin_length_follows_the_environment_then_the_cores():
    from protocol.transport import SPIN_MS, spin_ms
    assert spin_ms({}, cpus=2) == 0.0                 # a spinner would starve the work on a small host
    assert spin_ms({}, cpus=16) == SPIN_MS
    assert spin_ms({"EVENTSPEC_SPIN_MS": "0"}, cpus=16) == 0.0
    assert spin_ms({"EVENTSPEC_SPIN_MS": "5"}, cpus=2) == 5.0
    for bad in ("fast", "-1", "1e9"):
        with pytest.raises(ValueError, match="EVENTSPEC_SPIN_MS"):
            spin_ms({"EVENTSPEC_SPIN_MS": bad}, cpus=16)


@pytest.mark.parametrize("spin", [0.0, 50.0])
def test_a_spinning_receive_gets_a_late_message_and_times_out_like_a_blocking_one(tmp_path, spin):
    """A message sent while the receiver spins arrives whole; with nothing sent, recv returns (None, None)
    at its deadline whether it spun or not; a heartbeat thread sharing the channel still sends meanwhile."""
    import threading
    import time
    import zmq
    from protocol.transport import Channel, ipc_endpoint, make_socket
    ctx = zmq.Context()
    try:
        router = make_socket(ctx, zmq.ROUTER)
        endpoint = ipc_endpoint(str(tmp_path), "spin")
        router.bind(endpoint)
        dealer = make_socket(ctx, zmq.DEALER, identity="worker")
        dealer.connect(endpoint)
        coordinator = Channel(router, "coordinator", router=True)
        worker = Channel(dealer, "worker", router=False)
        worker.send(m.Hello(role="draft", pid=1, backend="fake"))
        hello, bad = coordinator.recv(2000)
        assert bad is None and isinstance(hello, m.Hello)

        start = time.monotonic()
        msg, bad = worker.recv(120, spin)
        assert (msg, bad) == (None, None) and time.monotonic() - start >= 0.119

        sent = threading.Event()

        def later():
            time.sleep(0.02)
            coordinator.send(m.Verify(request_id="r1", start_pos=3, tokens=[5, 6, 7]), to="worker")
            worker.send(m.Heartbeat())          # the receiving thread holds the channel's lock in turns
            sent.set()

        thread = threading.Thread(target=later)
        thread.start()
        msg, bad = worker.recv(2000, spin)
        thread.join()
        assert bad is None and isinstance(msg, m.Verify) and msg.tokens == [5, 6, 7] and msg.start_pos == 3
        assert sent.wait(2)
        beat, bad = coordinator.recv(2000)
        assert isinstance(beat, m.Heartbeat)
    finally:
        ctx.destroy(linger=0)
