"""Malformed messages, one per kind of mistake a peer can make: frames and bodies the protocol must refuse.

Each entry is (label, frames). Used by the unit test of protocol.messages.decode and by the tests that send
them to a spawned worker and to the coordinator's attached endpoint.
"""
import msgpack
import numpy as np

from protocol import messages as m


def _head(msg: m.Message, **changes) -> dict:
    head = msgpack.unpackb(m.encode(msg)[0])
    head.update(changes)
    return head


def _pack(head) -> bytes:
    return msgpack.packb(head, use_bin_type=True)


def _body(msg: m.Message, **fields) -> bytes:
    head = _head(msg)
    head["body"] = dict(head["body"], **fields)
    return _pack(head)


def _probs(rows=2, vocab=3):
    return np.full((rows, vocab), 0.25, np.float32).tobytes()


def _verify_with(descriptor, *frames, tokens=(5, 6)) -> list[bytes]:
    return [_pack(_head(m.Verify(request_id="fz", tokens=list(tokens)), arrays=descriptor)), *frames]


def malformed() -> list[tuple[str, list[bytes]]]:
    stop = m.Stop(request_id="fz")
    prefill = m.Prefill(request_id="fz", mode="baseline", sample={"sample_id": "x"}, question="q")
    cases = [
        # frames that are not a header
        ("empty header frame", [b""]),
        ("not msgpack", [b"\xc1\xc1 not msgpack"]),
        ("truncated msgpack", [_pack(_head(stop))[:-3]]),
        ("header is a list", [_pack([1, "stop", {}])]),
        ("header is an integer", [_pack(5)]),
        ("header with integer keys", [msgpack.packb({1: 2})]),
        ("invalid utf-8 in a string", [b"\x81\xa1v\xa2\xff\xfe"]),
        ("nested 100,000 levels deep", [b"\x91" * 100_000 + b"\x00"]),
        ("a map claiming 4 billion entries", [b"\xdf\xff\xff\xff\xff"]),
        ("msgpack extension type", [_pack({"v": 1, "type": msgpack.ExtType(5, b"x"), "body": {}})]),
        # the header's own fields
        ("no version", [_pack({"type": "stop", "body": {}})]),
        ("wrong version", [_pack(_head(stop, v=7))]),
        ("version true", [_pack(_head(stop, v=True))]),
        ("version as string", [_pack(_head(stop, v="1"))]),
        ("no type", [_pack({"v": 1, "body": {}})]),
        ("unknown type", [_pack(_head(stop, type="explode"))]),
        ("type as integer", [_pack(_head(stop, type=3))]),
        ("unknown header key", [_pack(_head(stop, evil=1))]),
        ("sent_ns as string", [_pack(_head(stop, sent_ns="now"))]),
        ("request_id as integer", [_pack(_head(stop, request_id=12))]),
        ("body is a list", [_pack(_head(stop, body=[1, 2]))]),
        # body fields of the wrong type or range
        ("unknown body field", [_body(stop, evil=1)]),
        ("max_new_tokens a string", [_body(prefill, max_new_tokens="many")]),
        ("max_new_tokens a bool", [_body(prefill, max_new_tokens=True)]),
        ("max_new_tokens negative", [_body(prefill, max_new_tokens=-5)]),
        ("max_new_tokens beyond int64", [_body(prefill, max_new_tokens=2 ** 64 - 1)]),
        ("sample not a map", [_body(prefill, sample=["x"])]),
        ("options with integer keys", [msgpack.packb({**_head(prefill), "body": {"options": {1: 2}}})]),
        ("question a number", [_body(prefill, question=4.5)]),
        ("tokens not a list", [_body(m.Verify(request_id="fz"), tokens="abc")]),
        ("tokens with strings", [_body(m.Verify(request_id="fz"), tokens=[1, "two"])]),
        ("tokens with floats", [_body(m.Verify(request_id="fz"), tokens=[1.5])]),
        ("tokens with a bool", [_body(m.Verify(request_id="fz"), tokens=[1, True])]),
        ("token id beyond int64", [_body(m.Rebase(request_id="fz"), committed=[1] * 300 + [2 ** 64 - 1])]),
        ("negative token id", [_body(m.Rebase(request_id="fz"), committed=[3, -1])]),
        ("token id too large", [_body(m.Verify(request_id="fz"), tokens=[2 ** 40])]),
        ("done spans malformed", [_body(m.Done(request_id="fz"), spans=[["prefill", 1]])]),
        ("done received malformed", [_body(m.Done(request_id="fz"), received=[[1, 2, 3]])]),
        ("fatal as integer", [_body(m.Error(request_id="fz"), fatal=1)]),
        # array descriptors and frames
        ("arrays is a number", _verify_with(5)),
        ("arrays holds a number", _verify_with([1], _probs())),
        ("array descriptor too short", _verify_with([["probs", "<f4"]], _probs())),
        ("array shape a string", _verify_with([["probs", "<f4", "ab"]], _probs())),
        ("array shape negative", _verify_with([["probs", "<f4", [-2, -3]]], _probs())),
        ("array shape huge", _verify_with([["probs", "<f4", [2, 2 ** 62]]], _probs())),
        ("array shape of bools", _verify_with([["probs", "<f4", [True, True]]], _probs())),
        ("array of objects", _verify_with([["probs", "|O", [2, 3]]], _probs())),
        ("array dtype unknown", _verify_with([["probs", "zz", [2, 3]]], _probs())),
        ("array dtype not a string", _verify_with([["probs", 4, [2, 3]]], _probs())),
        ("3-byte frame for <f4", _verify_with([["probs", "<f4", [1, 1]]], b"abc", tokens=[5])),
        ("frame shorter than shape", _verify_with([["probs", "<f4", [2, 3]]], _probs()[:-4])),
        ("rows differ from tokens", _verify_with([["probs", "<f4", [3, 2]]], _probs(3, 2))),
        ("array name not allowed", _verify_with([["hidden", "<f4", [2, 3]]], _probs())),
        ("array name not a string", _verify_with([[7, "<f4", [2, 3]]], _probs())),
        ("array sent twice", _verify_with([["probs", "<f4", [2, 3]]] * 2, _probs(), _probs())),
        ("NaN in probabilities", _verify_with([["probs", "<f4", [2, 3]]],
                                              np.full((2, 3), np.nan, np.float32).tobytes())),
        ("more frames than arrays", _verify_with([], _probs())),
        ("array on a message without arrays", [_pack(_head(stop, arrays=[["probs", "<f4", [1]]])), b"\0" * 4]),
    ]
    return cases
