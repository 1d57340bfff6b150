"""Typed messages between the coordinator and the workers, and their wire encoding.

Owns what travels: one msgpack map per message (never pickle), plus one extra ZeroMQ frame per numpy
array (zero-copy; described in the map by name, dtype and shape). Every message carries `sent_ns`
(time.monotonic_ns() of the sender) and gets `recv_ns` on arrival. Must never import torch or touch
sockets: `protocol.transport` does that.

The field annotations are the schema: `decode` checks every header and body field against them
(protocol.schema) and every array frame against the class's ARRAYS, so whatever a peer sends is either a
well-typed message or a ProtocolError with a readable reason, never another exception.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, get_type_hints

import msgpack
import numpy as np

from .schema import Count, Span, Stamp, TokenIds, kind, problem

PROTOCOL_VERSION = 1


class ProtocolError(Exception):
    """A message that cannot be decoded or does not fit the protocol."""


_REGISTRY: dict[str, type["Message"]] = {}


_SCHEMA: dict[type, dict[str, Any]] = {}       # class -> {body field: annotation}


def _message(type_name: str):
    def register(cls):
        cls.TYPE = type_name
        cls = dataclass(cls)
        _REGISTRY[type_name] = cls
        base = {f.name for f in fields(Message)}
        hints = get_type_hints(cls, include_extras=True)
        _SCHEMA[cls] = {f.name: hints[f.name] for f in fields(cls) if f.name not in base}
        return cls
    return register


@dataclass
class Message:
    """Common header. Subclasses add their payload fields."""

    TYPE: ClassVar[str] = ""
    # array frames this type may carry: name -> (dtypes, shape), a shape entry being None (any length) or
    # the name of a list field whose length it must equal
    ARRAYS: ClassVar[dict[str, tuple[tuple[str, ...], tuple]]] = {}
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
    pid: Count = 0
    backend: str = ""


@_message("ready")
class Ready(Message):
    role: str = ""
    pid: Count = 0
    backend: str = ""
    model_id: str = ""
    vocab_size: Count = 0
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
    max_new_tokens: Count = 50
    max_ahead: Count = 32             # draft: stop drafting this far beyond the committed prefix
    options: dict = field(default_factory=dict)


@_message("prefill_done")
class PrefillDone(Message):
    first_token: int = -1
    prompt_len: Count = 0
    info: dict = field(default_factory=dict)


@_message("draft")
class Draft(Message):
    ARRAYS = {"probs": (("<f4",), ("tokens", None))}     # q of each drafted token (sampling)
    epoch: Count = 0
    start_pos: Count = 0            # answer position of tokens[0]; the first answer token is position 0
    tokens: TokenIds = field(default_factory=list)


@_message("verify")
class Verify(Message):
    ARRAYS = {"probs": (("<f4",), ("tokens", None))}     # the draft's q for rejection sampling
    start_pos: Count = 0            # answer position of tokens[0] (= number of committed tokens)
    tokens: TokenIds = field(default_factory=list)


@_message("verify_result")
class VerifyResult(Message):
    start_pos: Count = 0
    drafted: Count = 0
    accepted: Count = 0
    next_token: int = -1            # correction (a draft was rejected) or bonus (all accepted)


@_message("decode")
class Decode(Message):
    max_tokens: Count = 0           # target decodes alone this many more tokens or until EOS


@_message("decode_result")
class DecodeResult(Message):
    tokens: TokenIds = field(default_factory=list)


@_message("rebase")
class Rebase(Message):
    epoch: Count = 0
    committed: TokenIds = field(default_factory=list)
    max_ahead: int = -1             # new lookahead limit for the draft (0 pauses it); -1 keeps the current one


@_message("stop")
class Stop(Message):
    reason: str = ""


@_message("done")
class Done(Message):
    """A worker's account of one request: spans and stamps of the messages it received."""

    spans: list[Span] = field(default_factory=list)        # [name, start_ns, end_ns, attrs]
    received: list[Stamp] = field(default_factory=list)    # [msg_id, type, recv_ns]
    stats: dict = field(default_factory=dict)


MESSAGE_TYPES: dict[str, type[Message]] = _REGISTRY


_HEADER: dict[str, Any] = {"v": int, "type": str, "src": str, "dst": str, "request_id": str, "msg_id": str,
                           "sent_ns": int, "body": dict, "arrays": list}
_REQUIRED = ("v", "type")
_ALLOWED_DTYPES = {"<f4", "<f2", "<f8", "<i4", "<i8", "|u1", "|i1", "<u2", "<i2", "|b1"}   # never object
MAX_ARRAY_DIMS = 8


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


def decode(frames: list, recv_ns: int | None = None) -> Message:
    """Parse frames into a typed message; raises ProtocolError (and only ProtocolError) with a reason."""
    if recv_ns is None:
        recv_ns = time.monotonic_ns()
    if not frames:
        raise ProtocolError("empty message")
    try:
        head = msgpack.unpackb(frames[0], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types (and UnicodeDecodeError for bad strings)
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}"[:200]) from None
    if not isinstance(head, dict):
        raise ProtocolError(f"header is not a map but {kind(head)}")
    for key in _REQUIRED:
        if key not in head:
            raise ProtocolError(f"header has no {key!r}")
    unknown = sorted(map(str, set(head) - set(_HEADER)))
    if unknown:
        raise ProtocolError(f"header has unknown keys {unknown}")
    for key, tp in _HEADER.items():
        if key in head and problem(head[key], tp):
            raise ProtocolError(f"header {key!r} {problem(head[key], tp)}")
    if head["v"] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {head['v']!r} not supported (this side speaks {PROTOCOL_VERSION})")
    cls = MESSAGE_TYPES.get(head["type"])
    if cls is None:
        raise ProtocolError(f"unknown message type {head['type'][:40]!r}")
    body = head.get("body", {})
    schema = _SCHEMA[cls]
    unknown = sorted(set(body) - set(schema))
    if unknown:
        raise ProtocolError(f"{cls.TYPE}: unknown fields {unknown}")
    for name, value in body.items():
        found = problem(value, schema[name])
        if found:
            raise ProtocolError(f"{cls.TYPE}: field {name!r} {found}")
    msg = cls(**body)
    for key in ("src", "dst", "request_id", "msg_id", "sent_ns"):
        if key in head:
            setattr(msg, key, head[key])
    msg.arrays = _decode_arrays(msg, head.get("arrays", []), frames[1:])
    msg.recv_ns = recv_ns
    return msg


def _decode_arrays(msg: Message, specs: list, frames: list) -> dict[str, np.ndarray]:
    where = msg.TYPE
    if len(specs) != len(frames):
        raise ProtocolError(f"{where}: {len(specs)} arrays described but {len(frames)} frames sent")
    arrays: dict[str, np.ndarray] = {}
    for i, (spec, frame) in enumerate(zip(specs, frames)):
        if not (isinstance(spec, list) and len(spec) == 3):
            raise ProtocolError(f"{where}: array descriptor {i} must be [name, dtype, shape], not {kind(spec)}")
        name, dtype, shape = spec
        if not isinstance(name, str) or name not in msg.ARRAYS:
            allowed = sorted(msg.ARRAYS) or "none"
            raise ProtocolError(f"{where}: array {kind(name)} is not one this message carries (allowed: {allowed})")
        if name in arrays:
            raise ProtocolError(f"{where}: array {name!r} sent twice")
        dtypes, dims = msg.ARRAYS[name]
        if not isinstance(dtype, str) or dtype not in _ALLOWED_DTYPES or dtype not in dtypes:
            raise ProtocolError(f"{where}: array {name!r} has unsupported dtype {kind(dtype)} (expected {dtypes})")
        if (not isinstance(shape, list) or len(shape) != len(dims) or len(shape) > MAX_ARRAY_DIMS
                or any(problem(d, Count) for d in shape)):
            raise ProtocolError(f"{where}: array {name!r} shape {kind(shape)} is not a list of {len(dims)} "
                                f"non-negative integers")
        for axis, (size, rule) in enumerate(zip(shape, dims)):
            if rule is not None and size != len(getattr(msg, rule)):
                raise ProtocolError(f"{where}: array {name!r} has {size} rows on axis {axis} but {rule} has "
                                    f"{len(getattr(msg, rule))} entries")
        itemsize = np.dtype(dtype).itemsize
        nbytes = len(memoryview(frame).cast("B"))
        if math.prod(shape) * itemsize != nbytes:      # python ints: a huge shape cannot overflow
            raise ProtocolError(f"{where}: array {name!r} frame has {nbytes} bytes but shape {shape} of {dtype} "
                                f"needs {math.prod(shape) * itemsize}")
        arr = np.frombuffer(frame, dtype=np.dtype(dtype)).reshape(shape)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ProtocolError(f"{where}: array {name!r} holds NaN or infinity")
        arrays[name] = arr
    return arrays
