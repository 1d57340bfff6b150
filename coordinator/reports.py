"""Reports over one run: aggregates, events.jsonl, a Perfetto trace, a timeline PNG and summary.md.

This module owns turning what the coordinator recorded (message/span events and one result record per
(sample, mode)) into numbers and pictures. Every number it prints is computed from those records; it never
fills a gap with a constant or an estimate, it prints "—" instead. It must never import torch or talk to a
worker: it runs after the fact, on plain dicts.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable

MISSING = "—"
MODE_ORDER = ("baseline", "parallel", "speculative")
PROC_ORDER = ("coordinator", "draft", "target")
MODELS = ("draft", "target")
MODEL_FIELDS = ("prefill_ms", "decode_ms", "ms_per_token", "tokens", "load_ms")
MEDIAN_FIELDS = (
    "ttft_ms",
    "overlap_window_ms",
    "free_draft_tokens",
    "drafted_tokens",
    "accepted_tokens",
    "verify_rounds",
    "mean_acceptance_length",
    "verify_ms",
)


# ---------------------------------------------------------------------------------------------- numbers


def _number(value: Any) -> float | None:
    """A finite float, or None for anything missing (None, NaN, a string from a failed run)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _numbers(values: Iterable[Any]) -> list[float]:
    return [v for v in (_number(x) for x in values) if v is not None]


def _median(values: Iterable[Any]) -> float | None:
    found = _numbers(values)
    return statistics.median(found) if found else None


def _percentile(values: Iterable[Any], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default): position (n - 1) * q."""
    found = sorted(_numbers(values))
    if not found:
        return None
    position = (len(found) - 1) * q
    lower = math.floor(position)
    upper = min(lower + 1, len(found) - 1)
    return found[lower] + (found[upper] - found[lower]) * (position - lower)


def _ordered_modes(modes: Iterable[str]) -> list[str]:
    seen = list(dict.fromkeys(modes))
    return [m for m in MODE_ORDER if m in seen] + [m for m in seen if m not in MODE_ORDER]


def _wall_by_sample(records: list[dict]) -> dict[str, float]:
    """Median wall_ms per sample_id (a repeated sample counts once)."""
    walls: dict[str, list[float]] = {}
    for record in records:
        wall = _number(record.get("wall_ms"))
        if wall is not None:
            walls.setdefault(record.get("sample_id"), []).append(wall)
    return {sample: statistics.median(values) for sample, values in walls.items()}


def aggregate(results: list[dict]) -> dict:
    """Per-mode statistics over the records with status == "ok".

    Returns {mode: stats}, modes ordered baseline, parallel, speculative, then any others. stats holds:
    n, n_failed; wall_ms_median / wall_ms_p10 / wall_ms_p90 (percentiles by linear interpolation between
    closest ranks, numpy's default); the median over samples of each of ttft_ms, overlap_window_ms,
    free_draft_tokens, drafted_tokens, accepted_tokens, verify_rounds, mean_acceptance_length, verify_ms;
    "draft" and "target": medians of prefill_ms, decode_ms, ms_per_token, tokens, load_ms plus
    tok_per_s = 1000 / median ms_per_token; acceptance_rate = sum accepted / sum drafted over samples that
    report both; speedup = median over samples of (baseline wall / this mode's wall) and time_saved_ms =
    median of (baseline wall - this mode's wall), both paired by sample_id within these results, with
    n_paired and None when no sample has both; matches_baseline = {"matched": k, "compared": n} counting
    records whose matches_baseline is not None, or None when none was compared. Missing values are None.
    """
    by_mode: dict[str, list[dict]] = {}
    failed: dict[str, int] = {}
    for record in results:
        mode = record.get("mode")
        by_mode.setdefault(mode, [])
        if record.get("status") == "ok":
            by_mode[mode].append(record)
        else:
            failed[mode] = failed.get(mode, 0) + 1

    baseline_walls = _wall_by_sample(by_mode.get("baseline", []))
    aggregated: dict[str, dict] = {}
    for mode in _ordered_modes(by_mode):
        records = by_mode[mode]
        walls = [r.get("wall_ms") for r in records]
        stats: dict[str, Any] = {
            "n": len(records),
            "n_failed": failed.get(mode, 0),
            "wall_ms_median": _median(walls),
            "wall_ms_p10": _percentile(walls, 0.10),
            "wall_ms_p90": _percentile(walls, 0.90),
        }
        for field in MEDIAN_FIELDS:
            stats[field] = _median(r.get(field) for r in records)
        for model in MODELS:
            parts = [r.get(model) or {} for r in records]
            model_stats = {field: _median(p.get(field) for p in parts) for field in MODEL_FIELDS}
            ms_per_token = model_stats["ms_per_token"]
            model_stats["tok_per_s"] = 1000.0 / ms_per_token if ms_per_token else None
            stats[model] = model_stats

        pairs = [
            (_number(r.get("accepted_tokens")), _number(r.get("drafted_tokens"))) for r in records
        ]
        pairs = [(a, d) for a, d in pairs if a is not None and d is not None]
        drafted = sum(d for _, d in pairs)
        stats["acceptance_rate"] = sum(a for a, _ in pairs) / drafted if drafted else None

        mode_walls = _wall_by_sample(records)
        paired = [s for s in mode_walls if s in baseline_walls and mode_walls[s] > 0]
        stats["n_paired"] = len(paired)
        stats["speedup"] = _median(baseline_walls[s] / mode_walls[s] for s in paired)
        stats["time_saved_ms"] = _median(baseline_walls[s] - mode_walls[s] for s in paired)

        compared = [r["matches_baseline"] for r in records if r.get("matches_baseline") is not None]
        stats["matches_baseline"] = (
            {"matched": sum(1 for m in compared if m), "compared": len(compared)} if compared else None
        )
        aggregated[mode] = stats
    return aggregated


# ---------------------------------------------------------------------------------------------- files


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays sneak into attrs; everything else is stringified rather than lost.
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _prepare(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_events_jsonl(path, events) -> None:
    """One JSON object per line, in the order recorded."""
    with _prepare(path).open("w", encoding="utf-8") as handle:
        for event in events:
            handle.write(json.dumps(event, default=_json_default) + "\n")


def _stamps(event: dict) -> list[int]:
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
    stamps = [s for e in events for s in _stamps(e)]
    origin_ns = min(stamps) if stamps else 0
    pids = _pids(events)

    def us(ns: int) -> float:
        return (ns - origin_ns) / 1000.0

    # (start_ns, end_ns, proc, build(tid) -> trace events); placed on lanes in start order.
    slices: list[tuple[int, int, str, Any]] = []
    flow_id = 0
    for event in events:
        common = {k: event.get(k) for k in ("request_id", "sample_id", "mode")}
        if event.get("kind") == "span" and event.get("proc") in pids and len(_stamps(event)) == 2:

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
    with _prepare(path).open("w", encoding="utf-8") as handle:
        json.dump(document, handle, default=_json_default)


# ---------------------------------------------------------------------------------------------- timeline

SPAN_COLOURS = {
    "load_inputs": "#9e9e9e",
    "prefill": "#1f77b4",
    "decode": "#ff7f0e",
    "draft_step": "#ffbb78",
    "verify": "#2ca02c",
    "rebase": "#d62728",
}
EXTRA_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def _colour(name: str, extra: dict[str, str]) -> str:
    if name in SPAN_COLOURS:
        return SPAN_COLOURS[name]
    if name not in extra:
        extra[name] = EXTRA_COLOURS[len(extra) % len(EXTRA_COLOURS)]
    return extra[name]


def write_timeline_png(path, events, results=None, max_samples=4) -> None:
    """A Gantt chart: one panel per (sample, mode) for the first max_samples samples, one lane per process.

    Spans are bars coloured by name; delivered messages are thin arrows from sender lane at sent_ns to
    receiver lane at recv_ns; a dashed line marks request_end_ns when results give it. The x axis is ms since the request started (request_start_ns from results
    when given, else the panel's earliest stamp), shared by all panels so modes compare at a glance.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    events = list(events)
    results = list(results or [])
    groups: dict[tuple, list[dict]] = {}
    for record in results:
        groups.setdefault((record.get("sample_id"), record.get("mode")), [])
    for event in events:
        # Events outside any request (heartbeats, worker start-up) have no panel to go in.
        if _stamps(event) and event.get("sample_id") is not None:
            groups.setdefault((event.get("sample_id"), event.get("mode")), []).append(event)
    samples = list(dict.fromkeys(sample for sample, _ in groups))[:max_samples]
    keys = [
        (sample, mode)
        for sample in samples
        for mode in _ordered_modes(m for s, m in groups if s == sample)
    ]
    records = {(r.get("sample_id"), r.get("mode")): r for r in results}

    heights = []
    for key in keys:
        procs = {e.get("proc") for e in groups[key] if e.get("kind") == "span"}
        heights.append(len(_lanes_for(procs)))
    fig = Figure(figsize=(11, 1.2 + sum(0.45 * h + 0.6 for h in heights)), dpi=110)
    FigureCanvasAgg(fig)
    if not keys:
        fig.text(0.5, 0.5, "no spans or messages recorded", ha="center", va="center")
        fig.savefig(_prepare(path))
        return

    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False, height_ratios=heights)[:, 0]
    extra: dict[str, str] = {}
    names_seen: list[str] = []
    for ax, key in zip(axes, keys):
        spans = [e for e in groups[key] if e.get("kind") == "span"]
        lanes = _lanes_for({e.get("proc") for e in spans})
        row = {proc: i for i, proc in enumerate(reversed(lanes))}
        record = records.get(key, {})
        origin_ns = record.get("request_start_ns")
        if not isinstance(origin_ns, int):
            origin_ns = min((s for e in groups[key] for s in _stamps(e)), default=0)

        def ms(ns: int) -> float:
            return (ns - origin_ns) / 1e6

        for span in spans:
            if span.get("proc") not in row or len(_stamps(span)) != 2:
                continue
            name = str(span.get("name"))
            names_seen.append(name)
            ax.broken_barh(
                [(ms(span["start_ns"]), (span["end_ns"] - span["start_ns"]) / 1e6)],
                (row[span["proc"]] - 0.35, 0.7),
                facecolors=_colour(name, extra), edgecolors="white", linewidth=0.4,
            )
        for message in groups[key]:
            if message.get("kind") != "message" or not isinstance(message.get("recv_ns"), int):
                continue
            if message.get("src") in row and message.get("dst") in row:
                ax.annotate(
                    "", xy=(ms(message["recv_ns"]), row[message["dst"]]),
                    xytext=(ms(message["sent_ns"]), row[message["src"]]),
                    arrowprops={"arrowstyle": "->", "color": "#444444", "lw": 0.5, "alpha": 0.6},
                )
        if isinstance(record.get("request_end_ns"), int):
            ax.axvline(ms(record["request_end_ns"]), color="black", linestyle="--", linewidth=0.8)
        ax.set_yticks(range(len(lanes)), list(reversed(lanes)))
        ax.set_ylim(-0.6, len(lanes) - 0.4)
        ax.grid(axis="x", linestyle=":", linewidth=0.5)
        title = f"{key[0]} · {key[1]}"
        if _number(record.get("wall_ms")) is not None:
            title += f" · wall {record['wall_ms']:.1f} ms"
        if record.get("status") not in (None, "ok"):
            title += f" · {record.get('status')}"
        ax.set_title(title, loc="left", fontsize=9)
    axes[-1].set_xlabel("ms since request start")
    legend_names = list(dict.fromkeys(names_seen))
    handles = [Patch(color=_colour(n, extra), label=n) for n in legend_names]
    if handles:
        fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 7), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))
    fig.savefig(_prepare(path))


def _lanes_for(procs: set) -> list[str]:
    """Draft and target always (so panels line up); the coordinator and others only when they have spans."""
    lanes = ["draft", "target"]
    if "coordinator" in procs:
        lanes.append("coordinator")
    return lanes + sorted(p for p in procs if p is not None and p not in lanes)


# ---------------------------------------------------------------------------------------------- text


def _fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    value = _number(value)
    return MISSING if value is None else f"{value:.{digits}f}{suffix}"


def _count(value: Any) -> str:
    """Token counts: whole numbers plainly, a median between two counts with one decimal."""
    value = _number(value)
    if value is None:
        return MISSING
    return f"{value:.0f}" if value.is_integer() else f"{value:.1f}"


def _percent(value: Any) -> str:
    value = _number(value)
    return MISSING if value is None else f"{100 * value:.1f}%"


def _matches(value: Any) -> str:
    if not isinstance(value, dict):
        return MISSING
    return f"{value.get('matched')}/{value.get('compared')}"


def _spread(stats: dict) -> str:
    low, high = _number(stats.get("wall_ms_p10")), _number(stats.get("wall_ms_p90"))
    return MISSING if low is None or high is None else f"{low:.1f}–{high:.1f}"


def format_table(agg) -> str:
    """A fixed-width plain-text table, one row per mode, for the terminal."""
    header = ["mode", "n", "fail", "wall ms", "p10–p90", "TTFT ms", "speedup", "saved ms",
              "accept", "mean len", "lossless"]
    rows = [header]
    for mode, stats in agg.items():
        rows.append([
            str(mode), str(stats.get("n", MISSING)), str(stats.get("n_failed", MISSING)),
            _fmt(stats.get("wall_ms_median")), _spread(stats), _fmt(stats.get("ttft_ms")),
            _fmt(stats.get("speedup"), 2, "×"), _fmt(stats.get("time_saved_ms")),
            _percent(stats.get("acceptance_rate")), _fmt(stats.get("mean_acceptance_length"), 2),
            _matches(stats.get("matches_baseline")),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


WEIGHTS_TEXT = {
    "released": "released checkpoints",
    "tiny-trained": "tiny models trained on synthetic scenes (`coordinator make-tiny --trained`): real captions, "
                    "real acceptance, CPU-sized timings",
    "tiny-random": "tiny random checkpoints (`coordinator make-tiny`): the text is noise",
    "synthetic-7b": "random full-size weights (`--synthetic-weights 7b`): real timings, meaningless text",
    "fake": "fake backends (scripted): these numbers describe the harness, not the models",
}


def weights_label(run_info: dict) -> str:
    """Which weights ran, in words: one label, or one per role when they differ."""
    weights = {r: w for r, w in (run_info.get("weights") or {}).items() if w}
    if not weights:
        return ""
    labels = sorted(set(weights.values()))
    if len(labels) == 1:
        return WEIGHTS_TEXT.get(labels[0], labels[0])
    return "; ".join(f"{role}: {WEIGHTS_TEXT.get(w, w)}" for role, w in weights.items())


def _how_made(run_info: dict) -> str:
    synthetic = run_info.get("synthetic")
    parts = []
    label = weights_label(run_info)
    if label:
        parts.append(f"**Weights: {label}.**")
    elif synthetic:
        parts.append("**Synthetic run** (fake backends): these numbers describe the harness, not the models.")
    described = []
    for key in ("backends", "device", "precision"):
        if run_info.get(key) is not None:
            value = run_info[key]
            if isinstance(value, dict):
                value = ", ".join(f"{k}: {v}" for k, v in value.items())
            elif isinstance(value, (list, tuple)):
                value = ", ".join(map(str, value))
            described.append(f"{key}: {value}")
    others = {k: v for k, v in run_info.items() if k not in ("synthetic", "backends", "device", "precision", "weights")}
    described += [f"{k}: {v}" for k, v in others.items()]
    parts.append("Every number below was measured in this run" + (f" ({'; '.join(described)})." if described else "."))
    return " ".join(parts)


def write_summary_md(path, results, agg, *, command: str, run_info: dict) -> None:
    """summary.md: the seed report's tables, filled only with values measured in this run.

    Speedup and time saved are against the baseline (target only) measured in the same run, paired by
    sample. The exact command is written in a code block so the report can be reproduced.
    """
    results = list(results)
    lines = ["# eventspec run summary", "", "## How this was made", "", _how_made(run_info or {}), "",
             "```bash", command, "```", ""]

    lines += ["## End to end", ""]
    lines += _md_table(
        ["mode", "ok", "failed", "wall ms (median)", "wall ms p10–p90", "TTFT ms", "time saved ms",
         "speedup vs baseline", "paired samples", "lossless (matches baseline)"],
        [[str(mode), str(s.get("n", MISSING)), str(s.get("n_failed", MISSING)),
          _fmt(s.get("wall_ms_median")), _spread(s), _fmt(s.get("ttft_ms")), _fmt(s.get("time_saved_ms")),
          _fmt(s.get("speedup"), 2, "×"), str(s.get("n_paired", MISSING)), _matches(s.get("matches_baseline"))]
         for mode, s in agg.items()],
    )

    lines += ["", "## Per-model breakdown", ""]
    model_rows = []
    for mode, s in agg.items():
        for model in MODELS:
            m = s.get(model) or {}
            if all(_number(v) is None for v in m.values()):
                continue
            model_rows.append([str(mode), model, _fmt(m.get("load_ms")), _fmt(m.get("prefill_ms")),
                               _fmt(m.get("decode_ms")), _fmt(m.get("ms_per_token"), 2),
                               _fmt(m.get("tok_per_s")), _count(m.get("tokens"))])
    lines += _md_table(["mode", "model", "load ms", "prefill ms", "decode ms", "decode ms/token",
                        "decode tok/s", "tokens"], model_rows)

    lines += ["", "## Speculation", ""]
    lines += _md_table(
        ["mode", "overlap window ms", "free draft tokens", "drafted tokens", "accepted tokens",
         "acceptance rate", "verify rounds", "mean acceptance length", "verify ms"],
        [[str(mode), _fmt(s.get("overlap_window_ms")), _count(s.get("free_draft_tokens")),
          _count(s.get("drafted_tokens")), _count(s.get("accepted_tokens")),
          _percent(s.get("acceptance_rate")), _count(s.get("verify_rounds")),
          _fmt(s.get("mean_acceptance_length"), 2), _fmt(s.get("verify_ms"))]
         for mode, s in agg.items() if mode != "baseline"],
    )
    lines += ["", "Medians over samples, except acceptance rate = sum accepted / sum drafted over samples. "
              "Mean acceptance length (1 + accepted / verify rounds) is the coordinator's per-sample value. Speedup = median over "
              "samples of baseline wall / mode wall, paired by sample in this run.", ""]

    lines += ["## Per sample", ""]
    lines += _md_table(
        ["sample", "mode", "status", "wall ms", "TTFT ms", "drafted", "accepted", "matches baseline"],
        [[str(r.get("sample_id")), str(r.get("mode")), str(r.get("status")), _fmt(r.get("wall_ms")),
          _fmt(r.get("ttft_ms")), _count(r.get("drafted_tokens")), _count(r.get("accepted_tokens")),
          MISSING if r.get("matches_baseline") is None else ("yes" if r["matches_baseline"] else "**no**")]
         for r in results],
    )

    lines += ["", "## Failed samples", ""]
    failures = [r for r in results if r.get("status") != "ok"]
    lines += [f"- `{r.get('sample_id')}` ({r.get('mode')}): {r.get('error') or 'no error message'}"
              for r in failures] or ["None."]
    _prepare(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
