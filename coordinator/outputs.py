"""The files of one run, kept current while it runs so that no ending loses a finished record.

records.jsonl gets each record the moment it exists (one line, flushed); events.jsonl and trace.json get
each request's events when the request ends (coordinator.reports.trace.EventFiles); results.json is
rewritten at most every few seconds while running and once more at the end, with how the run ended;
summary.md and timeline.png are written at the end. Nothing here grows with the number of requests except
the records themselves. Never imports torch.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from . import reports
from .reports.trace import EventFiles, read_events_jsonl

RESULTS_EVERY_S = 5.0


def json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


class RunOutputs:
    def __init__(self, out_dir: Path, command: str, *, results_every_s: float = RESULTS_EVERY_S,
                 defer_signals=nullcontext, events=None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.command = command
        self.records: list[dict] = []
        self.run_info: dict = {}
        self.results_every_s = results_every_s
        self._results_at = time.monotonic()
        self.records_file = (self.out_dir / "records.jsonl").open("w", encoding="utf-8")
        self.events = events if events is not None else EventFiles(self.out_dir)   # --ray brings its own
        self.finished = False
        self.defer_signals = defer_signals       # a signal guard's deferred(): add() is never torn

    def add(self, record: dict) -> None:
        """Keep a finished record: in memory and, at once, as a line of records.jsonl. A signal arriving
        meanwhile waits until both hold it, so results.json and records.jsonl never disagree."""
        with self.defer_signals():
            self.records.append(record)
            self.records_file.write(json.dumps(record, default=json_default) + "\n")
            self.records_file.flush()
            if time.monotonic() - self._results_at >= self.results_every_s:
                self.write_results(ended="running", failure=None)

    def write_results(self, *, ended: str, failure: str | None) -> dict:
        agg = reports.aggregate(self.records) if self.records else {}
        results = {"command": self.command, "created": dt.datetime.now().isoformat(timespec="seconds"),
                   "ended": ended, "failure": failure, "run_info": self.run_info, "records": self.records,
                   "aggregate": agg}
        tmp = self.out_dir / "results.json.tmp"
        with open(tmp, "w") as handle:      # streamed: no string of the whole run is built in memory
            json.dump(results, handle, indent=1, default=json_default)
        os.replace(tmp, self.out_dir / "results.json")
        self._results_at = time.monotonic()
        return agg

    def finish(self, *, ended: str, failure: str | None) -> dict:
        """Close the streams and write results.json, timeline.png and summary.md. Returns the aggregate."""
        self.finished = True
        self.records_file.close()
        self.events.close()
        agg = self.write_results(ended=ended, failure=failure)
        try:
            write_timeline(self.out_dir, self.records)
        except Exception as exc:     # a plot must never cost the results
            print(f"warning: timeline.png not written: {exc}", file=sys.stderr)
        reports.write_summary_md(self.out_dir / "summary.md", self.records, agg, command=self.command,
                                 run_info=self.run_info, ended=ended)
        return agg


def write_timeline(out_dir: Path, records: list[dict], max_samples: int = 4) -> None:
    """timeline.png from the events of the first max_samples samples only, read back from events.jsonl."""
    samples = list(dict.fromkeys(r.get("sample_id") for r in records))[:max_samples]
    wanted = set(samples)
    events = read_events_jsonl(out_dir / "events.jsonl", lambda e: e.get("sample_id") in wanted)
    reports.write_timeline_png(out_dir / "timeline.png", events,
                               [r for r in records if r.get("sample_id") in wanted], max_samples=max_samples)
