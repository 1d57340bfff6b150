"""Typed messages between the coordinator and the workers, and their wire encoding.

Owns what travels: one msgpack map per message (never pickle), plus one extra ZeroMQ frame per numpy
array (zero-copy; described in the map by name, dtype and shape). Every message carries `sent_ns`
(time.monotonic_ns() of the sender) and gets `recv_ns` on arrival. Must never import torch or touch
sockets: `protocol.transport` does that.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack
import numpy as np

PROTOCOL_VERSION = 1


class ProtocolError(Exception):
    """A message that cannot be decoded or does not fit the protocol."""


_REGISTRY: dict[str, type["Message"]] = {}


def _message(type_name: str):
    def register(cls):
        cls.TYPE = type_name
        _REGISTRY[type_name] = cls
        return dataclass(cls)
    return register


@dataclass
class Message:
    """Common header. Subclasses add their payload fields."""

    TYPE: ClassVar[str] = ""
    src: str = ""
    dst: str = ""
    request_id: str = ""
    msg_id: str = ""
    sent_ns: int = 0
    recv_ns: int = 0
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def type(self) -> str:
        return self.TYPE

    def payload(self) -> dict[str, Any]:
        base = {f.name for f in fields(Message)}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in base}


# --- life cycle -----------------------------------------------------------------------------

@_message("hello")
class Hello(Message):
    role: str = ""
    pid: int = 0
    backend: str = ""


@_message("ready")
class Ready(Message):
    role: str = ""
    pid: int = 0
    backend: str = ""
    model_id: str = ""
    vocab_size: int = 0
    eos_id: int = -1
    tokenizer_checksum: str = ""
    device: str = ""
    synthetic: bool = False
    memory: dict = field(default_factory=dict)      # peak_gpu_bytes, rss_bytes
    info: dict = field(default_factory=dict)


@_message("heartbeat")
class Heartbeat(Message):
    busy: bool = False


@_message("shutdown")
class Shutdown(Message):
    reason: str = ""


@_message("error")
class Error(Message):
    reason: str = ""
    fatal: bool = False
    in_reply_to: str = ""


# --- one request ----------------------------------------------------------------------------

@_message("prefill")
class Prefill(Message):
    mode: str = ""                  # baseline | parallel | speculative
    sample: dict = field(default_factory=dict)   # input references (paths), never pixels
    question: str = ""
    max_new_tokens: int = 50
    max_ahead: int = 32             # draft: stop drafting this far beyond the committed prefix
    options: dict = field(default_factory=dict)


@_message("prefill_done")
class PrefillDone(Message):
    first_token: int = -1
    prompt_len: int = 0
    info: dict = field(default_factory=dict)


@_message("draft")
class Draft(Message):
    epoch: int = 0
    start_pos: int = 0              # answer position of tokens[0]; the first answer token is position 0
    tokens: list = field(default_factory=list)
    # arrays: optional "probs" [len(tokens), vocab] float32 (sampling), "hidden" [len, H]


@_message("verify")
class Verify(Message):
    start_pos: int = 0              # answer position of tokens[0] (= number of committed tokens)
    tokens: list = field(default_factory=list)
    # arrays: optional "probs" [len(tokens), vocab] float32 for rejection sampling


@_message("verify_result")
class VerifyResult(Message):
    start_pos: int = 0
    drafted: int = 0
    accepted: int = 0
    next_token: int = -1            # correction (a draft was rejected) or bonus (all accepted)


@_message("decode")
class Decode(Message):
    max_tokens: int = 0             # target decodes alone this many more tokens or until EOS


@_message("decode_result")
class DecodeResult(Message):
    tokens: list = field(default_factory=list)


@_message("rebase")
class Rebase(Message):
    epoch: int = 0
    committed: list = field(default_factory=list)
    max_ahead: int = -1             # new lookahead limit for the draft (0 pauses it); -1 keeps the current one


@_message("stop")
class Stop(Message):
    reason: str = ""


@_message("done")
class Done(Message):
    """A worker's account of one request: spans and stamps of the messages it received."""

    spans: list = field(default_factory=list)          # [name, start_ns, end_ns, attrs]
    received: list = field(default_factory=list)      # [msg_id, type, recv_ns]
    stats: dict = field(default_factory=dict)


MESSAGE_TYPES: dict[str, type[Message]] = _REGISTRY

_HEADER_KEYS = ("v", "type", "src", "dst", "request_id", "msg_id", "sent_ns")


def encode(msg: Message) -> list[bytes | memoryview]:
    """Frames for one message: the msgpack header, then one frame per array."""
    arrays = []
    frames: list[bytes | memoryview] = []
    for name, arr in msg.arrays.items():
        arr = np.ascontiguousarray(arr)
        arrays.append([name, arr.dtype.str, list(arr.shape)])
        frames.append(memoryview(arr).cast("B") if arr.size else b"")
    head = {
        "v": PROTOCOL_VERSION, "type": msg.TYPE, "src": msg.src, "dst": msg.dst,
        "request_id": msg.request_id, "msg_id": msg.msg_id, "sent_ns": msg.sent_ns,
        "body": msg.payload(), "arrays": arrays,
    }
    return [msgpack.packb(head, use_bin_type=True)] + frames


_ALLOWED_DTYPES = {"<f4", "<f2", "<f8", "<i4", "<i8", "|u1", "|i1", "<u2", "<i2", "|b1"}


def decode(frames: list[bytes], recv_ns: int | None = None) -> Message:
    """Parse frames into a typed message; raises ProtocolError with a readable reason."""
    if recv_ns is None:
        recv_ns = time.monotonic_ns()
    if not frames:
        raise ProtocolError("empty message")
    try:
        head = msgpack.unpackb(frames[0], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(head, dict):
        raise ProtocolError("header is not a map")
    if head.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {head.get('v')!r} not supported (this side speaks {PROTOCOL_VERSION})")
    cls = MESSAGE_TYPES.get(head.get("type"))
    if cls is None:
        raise ProtocolError(f"unknown message type {head.get('type')!r}")
    body = head.get("body", {})
    if not isinstance(body, dict):
        raise ProtocolError(f"{cls.TYPE}: body is not a map")
    known = {f.name for f in fields(cls)} - {f.name for f in fields(Message)}
    unknown = set(body) - known
    if unknown:
        raise ProtocolError(f"{cls.TYPE}: unknown fields {sorted(unknown)}")
    try:
        msg = cls(**body)
        for key in _HEADER_KEYS[2:]:
            value = head.get(key, getattr(msg, key))
            if key == "sent_ns" and not isinstance(value, int):
                raise ProtocolError(f"{cls.TYPE}: sent_ns must be an integer")
            setattr(msg, key, value)
    except TypeError as exc:
        raise ProtocolError(f"{cls.TYPE}: {exc}") from None
    specs = head.get("arrays", [])
    if len(specs) != len(frames) - 1:
        raise ProtocolError(f"{cls.TYPE}: {len(specs)} arrays described but {len(frames) - 1} frames sent")
    for (name, dtype, shape), frame in zip(specs, frames[1:]):
        if dtype not in _ALLOWED_DTYPES:
            raise ProtocolError(f"{cls.TYPE}: array {name!r} has unsupported dtype {dtype!r}")
        arr = np.frombuffer(frame, dtype=np.dtype(dtype))
        count = int(np.prod(shape)) if shape else 1
        if arr.size != count:
            raise ProtocolError(f"{cls.TYPE}: array {name!r} has {arr.size} elements, shape says {shape}")
        msg.arrays[name] = arr.reshape(shape)
    msg.recv_ns = recv_ns
    return msg
