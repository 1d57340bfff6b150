"""Reports over one run: aggregates, events.jsonl, a Perfetto trace, a timeline PNG and summary.md.

This package owns turning what the coordinator recorded (message/span events and one result record per
(sample, mode)) into numbers and pictures. Every number it prints is computed from those records; it never
fills a gap with a constant or an estimate, it prints "—" instead. It must never import torch or talk to a
worker: it runs after the fact, on plain dicts.

stats (median, percentile, paired speedup: shared with bench) · aggregate (per-mode statistics) ·
trace (events.jsonl, trace.json) · timeline (timeline.png) · summary (summary.md, the terminal table).
"""
from .aggregate import MEDIAN_FIELDS, MODE_ORDER, aggregate
from .stats import median, number, numbers, paired_speedup, percentile
from .summary import format_table, write_summary_md
from .timeline import write_timeline_png
from .trace import write_events_jsonl, write_trace_json

__all__ = ["MEDIAN_FIELDS", "MODE_ORDER", "aggregate", "format_table", "median", "number", "numbers",
           "paired_speedup", "percentile", "write_events_jsonl", "write_summary_md", "write_timeline_png",
           "write_trace_json"]
