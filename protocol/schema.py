"""Checks a decoded value against a message field's annotation: the one declarative schema of the wire.

A message class's field annotations (protocol.messages) are its schema; this module reads them. Types
understood: bool, int (int64 range; a bool is not an int), float (finite), str, dict (string keys), list,
list[T], tuple[A, B, ...] (a list of exactly those element types, as msgpack gives tuples back) and
Annotated[T, mark] with the marks below. Pure; never imports torch or touches sockets.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, get_args, get_origin

NON_NEGATIVE = "non-negative"     # an int (or every int of a list) >= 0
TOKEN_ID_LIMIT = 2 ** 31          # token ids are indices into an embedding table: 0 <= id < 2**31

Count = Annotated[int, NON_NEGATIVE]                   # positions, lengths, epochs, pids
TokenIds = Annotated[list[int], NON_NEGATIVE, "token ids"]
Span = tuple[str, int, int, dict]                      # [name, start_ns, end_ns, attrs]
Stamp = tuple[str, str, int]                           # [msg_id, type, recv_ns]

_INT64 = 2 ** 63


def kind(value: Any) -> str:
    """A short description of a value for error messages (never the whole value)."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '…' if len(text) > 40 else text}"


def problem(value: Any, tp: Any) -> str | None:
    """None when value fits tp, else what is wrong in a few words."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *marks = get_args(tp)
        found = problem(value, base)
        if found:
            return found
        ints = value if isinstance(value, list) else [value]
        if NON_NEGATIVE in marks and ints and min(ints) < 0:
            return "must not be negative"
        if "token ids" in marks and ints and max(ints) >= TOKEN_ID_LIMIT:
            return f"token ids must be below {TOKEN_ID_LIMIT}"
        return None
    if tp is bool:
        return None if isinstance(value, bool) else f"must be true or false, not {kind(value)}"
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be an integer, not {kind(value)}"
        return None if -_INT64 <= value < _INT64 else "is outside the 64-bit integer range"
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else f"must be a finite number, not {kind(value)}"
    if tp is str:
        return None if isinstance(value, str) else f"must be a string, not {kind(value)}"
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            return f"must be a map, not {kind(value)}"
        bad = [k for k in value if not isinstance(k, str)]
        return f"has a non-string key {kind(bad[0])}" if bad else None
    if tp is list:
        return None if isinstance(value, list) else f"must be a list, not {kind(value)}"
    if origin is list:
        if not isinstance(value, list):
            return f"must be a list, not {kind(value)}"
        (item,) = get_args(tp)
        if item is int and set(map(type, value)) <= {int} and (
                not value or (-_INT64 <= min(value) and max(value) < _INT64)):
            return None     # token ids at C speed: a REBASE's ~200 ids, checked one by one, cost the draft
                            # 0.12 ms a round on an H200 host (benchmarks/handover.py)
        for i, element in enumerate(value):
            found = problem(element, item)
            if found:
                return f"element {i} {found}"
        return None
    if origin is tuple:
        items = get_args(tp)
        if not isinstance(value, list) or len(value) != len(items):
            return f"must be a list of {len(items)} values, not {kind(value)}"
        for i, (element, item) in enumerate(zip(value, items)):
            found = problem(element, item)
            if found:
                return f"element {i} {found}"
        return None
    if tp is Any:
        return None
    raise TypeError(f"protocol.schema: unsupported annotation {tp!r}")     # a bug in messages.py, not input
