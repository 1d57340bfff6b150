"""timeline.png: a Gantt chart of the first samples of a run (matplotlib, Agg, imported lazily).

Plain dicts in, a picture out; never imports torch.
"""
from __future__ import annotations

from .aggregate import ordered_modes as _ordered_modes
from .stats import number as _number
from .trace import prepare as _prepare, stamps as _stamps

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


