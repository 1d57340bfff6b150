"""events.jsonl and the Perfetto trace (trace.json) from the coordinator's message and span events.

Both are written as events arrive (EventFiles: one batch per request), so a long run holds no event in
memory once its request is over and a run that ends early keeps every finished request's events. Plain
dicts in, files out; never imports torch or talks to a worker.
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


def read_events_jsonl(path, keep=lambda event: True) -> list[dict]:
    """The events of an events.jsonl that keep(event) accepts, read line by line (a torn last line is
    skipped: the file of a run that was killed mid-write)."""
    found = []
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and keep(event):
                found.append(event)
    return found


def stamps(event: dict) -> list[int]:
    keys = ("start_ns", "end_ns") if event.get("kind") == "span" else ("sent_ns", "recv_ns")
    return [event[k] for k in keys if isinstance(event.get(k), int)]


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


class TraceWriter:
    """Chrome trace-event JSON for ui.perfetto.dev, written batch by batch: one process per proc (coordinator,
    draft, target, then others as they appear), spans as complete events.

    Times are microseconds since the earliest stamp of the first batch. Each delivered message becomes a
    flow arrow ("s" at the sender at sent_ns, "f" with bp "e" at the receiver at recv_ns, same id), each
    end bound to a 1 µs complete event named after the message so the arrow has a slice to start and end
    on. Slices are packed onto threads (_Lanes) across batches. close() ends the JSON document.
    """

    def __init__(self, path):
        self.handle = prepare(path).open("w", encoding="utf-8")
        self.handle.write('{"traceEvents": [')
        self.written = 0
        self.origin_ns: int | None = None
        self.pids: dict[str, int] = {}
        self.lanes: dict[str, _Lanes] = {}
        self.flow_id = 0

    def _emit(self, items: list[dict]) -> None:
        for item in items:
            self.handle.write(("\n" if not self.written else ",\n") + json.dumps(item, default=_json_default))
            self.written += 1

    def _pid(self, proc: str) -> int:
        if proc not in self.pids:
            others = sum(1 for p in self.pids if p not in PROC_ORDER)
            pid = PROC_ORDER.index(proc) + 1 if proc in PROC_ORDER else len(PROC_ORDER) + 1 + others
            self.pids[proc] = pid
            self.lanes[proc] = _Lanes()
            self._emit([{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": proc}},
                        {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                         "args": {"sort_index": pid}}])
        return self.pids[proc]

    def add(self, events) -> None:
        events = list(events)
        if self.origin_ns is None:
            all_stamps = [s for e in events for s in stamps(e)]
            if not all_stamps:
                return
            self.origin_ns = min(all_stamps)
        origin_ns = self.origin_ns

        def us(ns: int) -> float:
            return (ns - origin_ns) / 1000.0

        # (start_ns, end_ns, proc, build(tid) -> trace events); placed on lanes in start order.
        slices: list[tuple[int, int, str, Any]] = []
        for event in events:
            common = {k: event.get(k) for k in ("request_id", "sample_id", "mode")}
            if event.get("kind") == "span" and isinstance(event.get("proc"), str) and len(stamps(event)) == 2:

                def build(tid, event=event, common=common):
                    args = {**common, **(event.get("attrs") or {})}
                    return [{
                        "name": event.get("name"), "cat": "span", "ph": "X", "pid": self._pid(event["proc"]),
                        "tid": tid, "ts": us(event["start_ns"]),
                        "dur": (event["end_ns"] - event["start_ns"]) / 1000.0, "args": args,
                    }]

                slices.append((event["start_ns"], event["end_ns"], event["proc"], build))
            elif event.get("kind") == "message" and isinstance(event.get("sent_ns"), int):
                args = {**common, "type": event.get("type"), "msg_id": event.get("msg_id"),
                        "src": event.get("src"), "dst": event.get("dst")}
                name = str(event.get("type"))
                delivered = isinstance(event.get("recv_ns"), int) and isinstance(event.get("dst"), str)
                self.flow_id += 1
                ends = [(event.get("src"), event["sent_ns"], "s", f"send {name}")]
                if delivered:
                    ends.append((event["dst"], event["recv_ns"], "f", f"recv {name}"))
                for proc, ns, phase, label in ends:
                    if not isinstance(proc, str):
                        continue

                    def build(tid, proc=proc, ns=ns, phase=phase, label=label, args=args, fid=self.flow_id,
                              name=name, delivered=delivered):
                        pid = self._pid(proc)
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
        for start_ns, end_ns, proc, build in sorted(slices, key=lambda s: (s[0], -s[1])):
            self._pid(proc)
            self._emit(build(self.lanes[proc].place(start_ns, end_ns)))
        self.handle.flush()

    def close(self) -> None:
        if self.handle.closed:
            return
        for proc, pid in self.pids.items():
            self._emit([{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                         "args": {"name": proc if tid == 0 else f"{proc} ({tid})"}}
                        for tid in range(len(self.lanes[proc].open_ends))])
        self.handle.write('\n], "displayTimeUnit": "ms", "otherData": %s}\n'
                          % json.dumps({"origin_ns": self.origin_ns or 0}))
        self.handle.close()


def write_trace_json(path, events) -> None:
    """The whole trace of a list of events at once (see TraceWriter)."""
    writer = TraceWriter(path)
    try:
        writer.add(events)
    finally:
        writer.close()


class EventFiles:
    """events.jsonl and trace.json of a run, appended one batch of events at a time (each flushed)."""

    def __init__(self, out_dir):
        self.events_path = prepare(Path(out_dir) / "events.jsonl")
        self.jsonl = self.events_path.open("w", encoding="utf-8")
        self.trace = TraceWriter(Path(out_dir) / "trace.json")

    def add(self, events) -> None:
        events = list(events)
        for event in events:
            self.jsonl.write(json.dumps(event, default=_json_default) + "\n")
        self.jsonl.flush()
        self.trace.add(events)

    def close(self) -> None:
        if not self.jsonl.closed:
            self.jsonl.close()
        self.trace.close()
