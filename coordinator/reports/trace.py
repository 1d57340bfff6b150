"""events.jsonl and the Perfetto trace (trace.json) from the coordinator's message and span events.

Plain dicts in, files out; never imports torch or talks to a worker.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROC_ORDER = ("coordinator", "draft", "target")


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays sneak into attrs; everything else is stringified rather than lost.
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def prepare(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_events_jsonl(path, events) -> None:
    """One JSON object per line, in the order recorded."""
    with prepare(path).open("w", encoding="utf-8") as handle:
        for event in events:
            handle.write(json.dumps(event, default=_json_default) + "\n")


def stamps(event: dict) -> list[int]:
    keys = ("start_ns", "end_ns") if event.get("kind") == "span" else ("sent_ns", "recv_ns")
    return [event[k] for k in keys if isinstance(event.get(k), int)]


def _pids(events: list[dict]) -> dict[str, int]:
    procs = []
    for event in events:
        if event.get("kind") == "span":
            procs.append(event.get("proc"))
        elif event.get("kind") == "message":
            procs += [event.get("src"), event.get("dst") if event.get("recv_ns") is not None else None]
    seen = [p for p in dict.fromkeys(procs) if p is not None]
    ordered = [p for p in PROC_ORDER if p in seen] + [p for p in seen if p not in PROC_ORDER]
    return {proc: pid for pid, proc in enumerate(ordered, start=1)}


class _Lanes:
    """Packs slices of one process onto threads so that slices on a thread nest or follow each other.

    Perfetto draws overlapping-but-not-nested complete events on one thread wrongly, and coordinator spans
    of concurrent requests can overlap that way.
    """

    def __init__(self) -> None:
        self.open_ends: list[list[int]] = []

    def place(self, start_ns: int, end_ns: int) -> int:
        for tid, stack in enumerate(self.open_ends):
            while stack and stack[-1] <= start_ns:
                stack.pop()
            if not stack or end_ns <= stack[-1]:
                stack.append(end_ns)
                return tid
        self.open_ends.append([end_ns])
        return len(self.open_ends) - 1


def write_trace_json(path, events) -> None:
    """Chrome trace-event JSON for ui.perfetto.dev: one process per proc, spans as complete events.

    Times are microseconds since the earliest stamp in events. Each delivered message becomes a flow arrow
    ("s" at the sender at sent_ns, "f" with bp "e" at the receiver at recv_ns, same id), each end bound to
    a 1 µs complete event named after the message so the arrow has a slice to start and end on.
    """
    events = list(events)
    all_stamps = [s for e in events for s in stamps(e)]
    origin_ns = min(all_stamps) if all_stamps else 0
    pids = _pids(events)

    def us(ns: int) -> float:
        return (ns - origin_ns) / 1000.0

    # (start_ns, end_ns, proc, build(tid) -> trace events); placed on lanes in start order.
    slices: list[tuple[int, int, str, Any]] = []
    flow_id = 0
    for event in events:
        common = {k: event.get(k) for k in ("request_id", "sample_id", "mode")}
        if event.get("kind") == "span" and event.get("proc") in pids and len(stamps(event)) == 2:

            def build(tid, event=event, common=common):
                args = {**common, **(event.get("attrs") or {})}
                return [{
                    "name": event.get("name"), "cat": "span", "ph": "X", "pid": pids[event["proc"]],
                    "tid": tid, "ts": us(event["start_ns"]),
                    "dur": (event["end_ns"] - event["start_ns"]) / 1000.0, "args": args,
                }]

            slices.append((event["start_ns"], event["end_ns"], event["proc"], build))
        elif event.get("kind") == "message" and isinstance(event.get("sent_ns"), int):
            args = {**common, "type": event.get("type"), "msg_id": event.get("msg_id"),
                    "src": event.get("src"), "dst": event.get("dst")}
            name = str(event.get("type"))
            delivered = isinstance(event.get("recv_ns"), int) and event.get("dst") in pids
            flow_id += 1
            ends = [(event.get("src"), event["sent_ns"], "s", f"send {name}")]
            if delivered:
                ends.append((event["dst"], event["recv_ns"], "f", f"recv {name}"))
            for proc, ns, phase, label in ends:
                if proc not in pids:
                    continue

                def build(tid, proc=proc, ns=ns, phase=phase, label=label, args=args, fid=flow_id,
                          name=name, delivered=delivered):
                    pid = pids[proc]
                    out = [{"name": label, "cat": "message", "ph": "X", "pid": pid, "tid": tid,
                            "ts": us(ns), "dur": 1.0, "args": args}]
                    if delivered:
                        arrow = {"name": name, "cat": "message", "ph": phase, "id": fid, "pid": pid,
                                 "tid": tid, "ts": us(ns), "args": args}
                        if phase == "f":
                            arrow["bp"] = "e"
                        out.append(arrow)
                    return out

                slices.append((ns, ns + 1000, proc, build))

    trace: list[dict] = []
    for proc, pid in pids.items():
        trace.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": proc}})
        trace.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                      "args": {"sort_index": pid}})
    lanes = {proc: _Lanes() for proc in pids}
    for start_ns, end_ns, proc, build in sorted(slices, key=lambda s: (s[0], -s[1])):
        trace += build(lanes[proc].place(start_ns, end_ns))
    for proc, pid in pids.items():
        for tid in range(len(lanes[proc].open_ends)):
            trace.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                          "args": {"name": proc if tid == 0 else f"{proc} ({tid})"}})

    document = {"traceEvents": trace, "displayTimeUnit": "ms", "otherData": {"origin_ns": origin_ns}}
    with prepare(path).open("w", encoding="utf-8") as handle:
        json.dump(document, handle, default=_json_default)


