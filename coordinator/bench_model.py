"""The bench's model columns: each configuration beside its predicted ceiling (coordinator.ceiling), the
time it lost against it, and each step kind beside its bandwidth floor (coordinator.floor).

Owns extracting the costs each session measured alone from the records and the recorded spans and
messages (target steps from `baseline`, the draft's from the draft-alone runs, verifications with no draft
step beside them) and the per-request decomposition of measured − predicted wall; coordinator.bench_report
prints them.
Never imports torch; no clocks.
"""
from __future__ import annotations

import statistics

from . import ceiling, floor

LOST_PARTS = (
    ("overhead_ms", "PREFILL delivery and worker overhead before the target's prefill"),
    ("load_ms", "target input loading beyond its median alone"),
    ("prefill_ms", "target prefill slower beside the draft"),
    ("steps_ms", "target decode/verify steps slower than alone"),
    ("messages_ms", "message latency on the critical path (coordinator ↔ target)"),
    ("idle_ms", "target idle: waiting for drafts or the coordinator"),
    ("passes_ms", "target passes beyond the ceiling's (fewer drafts ready or accepted; < 0: better)"),
)
CRITICAL_MESSAGES = {("target", "prefill_done"), ("target", "verify_result"), ("target", "decode_result")}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _ms(span) -> float:
    return (span["end_ns"] - span["start_ns"]) / 1e6


def session_key(placement, mps) -> str:
    return f"{placement}_mps_{mps}"


def _index(events):
    spans, messages = {}, {}
    for e in events:
        if e.get("kind") == "span":
            spans.setdefault(e["request_id"], []).append(e)
        elif e.get("kind") == "message":
            messages.setdefault(e["request_id"], []).append(e)
    return spans, messages


def _verify_alone(recs, spans, placement) -> tuple[dict, str]:
    """Median verification ms by k, from verifications no draft work overlapped (on two GPUs: all); a k never
    verified alone takes its medians beside the draft, and the source says which."""
    alone, beside = {}, {}
    for r in recs:
        mine = spans.get(r["request_id"], [])
        draft_work = [(s["start_ns"], s["end_ns"]) for s in mine if s["proc"] == "draft"
                      and s["name"] in ("prefill", "draft_step", "rebase")]
        for s in mine:
            if s["proc"] != "target" or s["name"] != "verify":
                continue
            k = int((s.get("attrs") or {}).get("k", 0))
            busy = any(a < s["end_ns"] and b > s["start_ns"] for a, b in draft_work)
            (beside if busy and placement != "two-gpu" else alone).setdefault(k, []).append(_ms(s))
    merged = {k: _median(alone.get(k) or beside[k]) for k in sorted(set(alone) | set(beside))}
    only_beside = sorted(k for k in beside if k not in alone)
    source = "alone" if not only_beside else f"alone, except k = {', '.join(map(str, only_beside))} (beside the draft)"
    return merged, source


def session_costs(records, events, draft_alone, placement, mps) -> dict:
    """The costs one (placement, MPS) session measured with one model at a time."""
    spans, _ = _index(events)
    ok = [r for r in records if r.get("status") == "ok" and r.get("placement") == placement and r.get("mps") == mps]
    base = [r for r in ok if r["mode"] == "baseline"]
    steps = [_ms(s) for r in base for s in spans.get(r["request_id"], []) if s["name"] == "decode"]
    alone_events = [e for e in events if e.get("kind") == "span" and e.get("mode") == "draft-alone"
                    and e.get("placement") == placement and e.get("mps") == mps]
    verify, source = _verify_alone([r for r in ok if r["mode"] in ("parallel", "speculative")], spans, placement)
    return {
        "target_step_ms": _median(steps),
        "target_load_ms": _median([(r.get("target") or {}).get("load_ms") for r in base]),
        "target_prefill_ms": _median([(r.get("target") or {}).get("prefill_ms") for r in base]),
        "draft_step_ms": _median([x for d in draft_alone if (d.get("placement"), d.get("mps")) == (placement, mps)
                                  for x in d.get("draft_step_ms") or []]),
        "draft_load_ms": _median([_ms(s) for s in alone_events if s["name"] == "load_inputs"]),
        "draft_prefill_ms": _median([_ms(s) for s in alone_events if s["name"] == "prefill"]),
        "verify_ms_by_k": verify,
        "verify_source": source,
    }


def _acceptance(oracle: str | None):
    if not oracle:
        return None
    kind, _, value = oracle.partition("=")
    return ceiling.Acceptance.iid(float(value)) if kind == "alpha" else ceiling.Acceptance.profile(value)


def costs_from(c: dict) -> ceiling.Costs | None:
    """ceiling.Costs from one session's costs_alone, or None when a cost was not measured."""
    need = ("target_step_ms", "draft_step_ms", "target_load_ms", "target_prefill_ms", "draft_load_ms",
            "draft_prefill_ms")
    if any(c.get(k) is None for k in need) or c["draft_step_ms"] <= 0:
        return None
    return ceiling.Costs(target_step_ms=c["target_step_ms"], draft_step_ms=c["draft_step_ms"],
                         verify_ms=c["verify_ms_by_k"], target_load_ms=c["target_load_ms"],
                         target_prefill_ms=c["target_prefill_ms"], draft_load_ms=c["draft_load_ms"],
                         draft_prefill_ms=c["draft_prefill_ms"])


def lost_time(rec: dict, spans: list, messages: list, costs: ceiling.Costs, predicted: dict) -> dict | None:
    """measured − predicted wall of one request, split so that the parts add up to it exactly."""
    target = {s["name"]: s for s in spans if s["proc"] == "target" and s["name"] in ("load_inputs", "prefill")}
    if "prefill" not in target or "load_inputs" not in target:
        return None
    load, prefill = target["load_inputs"], target["prefill"]
    steps = [s for s in spans if s["proc"] == "target" and s["name"] in ("decode", "verify")]
    measured = sum(_ms(s) for s in steps)
    alone = sum(costs.verify(int((s.get("attrs") or {}).get("k", 0))) if s["name"] == "verify"
                else costs.target_step_ms for s in steps)
    latency = sum((e["recv_ns"] - e["sent_ns"]) / 1e6 for e in messages if e.get("recv_ns")
                  and ((e["src"], e["type"]) in CRITICAL_MESSAGES
                       or (e["dst"] == "target" and e["type"] in ("verify", "decode"))))
    phase = (rec["request_end_ns"] - prefill["end_ns"]) / 1e6
    parts = {
        "overhead_ms": (prefill["start_ns"] - rec["request_start_ns"]) / 1e6 - _ms(load),
        "load_ms": _ms(load) - costs.target_load_ms,
        "prefill_ms": _ms(prefill) - costs.target_prefill_ms,
        "steps_ms": measured - alone,
        "messages_ms": latency,
        "idle_ms": phase - measured - latency,
        "passes_ms": alone - (predicted["wall_ms"] - costs.target_load_ms - costs.target_prefill_ms),
    }
    parts["total_ms"] = rec["wall_ms"] - predicted["wall_ms"]
    return parts


def add_ceiling(rows: list[dict], records, events, draft_alone, *, k_max: int, trials: int = 400) -> dict:
    """Add predicted_* / ceiling_ratio / lost_ms to the aggregate rows; return the costs per session."""
    spans, messages = _index(events)
    sessions = {}
    for placement, mps in sorted({(r.get("placement"), r.get("mps")) for r in rows}, key=str):
        sessions[session_key(placement, mps)] = session_costs(records, events, draft_alone, placement, mps)
    by_config = {}
    for r in records:
        if r.get("status") == "ok":
            by_config.setdefault((r.get("placement"), r.get("mps"), r.get("max_new_tokens"), r["mode"],
                                  r.get("oracle")), []).append(r)
    for row in rows:
        if row["mode"] not in ("parallel", "speculative"):
            continue
        costs = costs_from(sessions[session_key(row.get("placement"), row["mps"])])
        if costs is None:
            row["ceiling_note"] = "costs alone not all measured"
            continue
        pred = ceiling.predict(row["mode"], row.get("placement") or "same-gpu", row["max_new_tokens"], costs,
                               _acceptance(row["oracle"]), k_max=k_max, trials=trials)
        row.update(predicted_speedup=pred["speedup"], predicted_wall_ms=pred["wall_ms"],
                   predicted_free_drafts=pred.get("free_drafts"), ceiling_policy=pred["policy"])
        measured = row.get("speedup_vs_baseline")
        row["ceiling_ratio"] = measured / pred["speedup"] if measured and pred["speedup"] else None
        parts = [lost_time(rec, spans.get(rec["request_id"], []), messages.get(rec["request_id"], []), costs, pred)
                 for rec in by_config.get((row.get("placement"), row["mps"], row["max_new_tokens"], row["mode"],
                                           row["oracle"]), [])]
        parts = [p for p in parts if p]
        if parts:
            row["lost_ms"] = {k: _median([p[k] for p in parts]) for k in parts[0]}
    return sessions


def floor_rows(run_info: dict, rows: list[dict], sessions: dict, records, *, answer_positions: float,
               bandwidth_gbs: float | None = None) -> list[dict]:
    """Per session and step kind: bytes per step, floors at the datasheet's and the measured bandwidth, the
    measured step and the ratios. K/V is read at prompt + `answer_positions` live positions."""
    out = []
    for key, info in run_info.items():
        costs = sessions.get(key) or {}
        recs = [r for r in records if r.get("status") == "ok" and session_key(r.get("placement"), r.get("mps")) == key]
        for role in ("target", "draft"):
            worker = (info.get(role) or {}).get("info") or {}
            step = worker.get("step_bytes")
            prompt = _median([(r.get(role) or {}).get("prompt_len") for r in recs])
            positions = (prompt or 0) + answer_positions
            if bandwidth_gbs:
                gbs, source = bandwidth_gbs, "--bandwidth-gbs"
            else:
                gbs, source = floor.datasheet_bandwidth(worker.get("cuda_device"))
            probe = worker.get("bandwidth") or {}
            measured_gbs = probe.get("best_gbs")
            kinds = [(f"{role} decode", costs.get(f"{role}_step_ms"))]
            if role == "target":
                measured_k = {k: v for k, v in (costs.get("verify_ms_by_k") or {}).items() if k and v is not None}
                shown = [k for k in measured_k if k <= 8] + [k for k in measured_k if k > 8][-1:]
                kinds += [(f"target verify k={k}", measured_k[k]) for k in shown]
            for kind, measured in kinds:
                nbytes = floor.step_bytes(step, positions)
                fl = floor.floor_ms(nbytes, gbs)
                fl_meas = floor.floor_ms(nbytes, measured_gbs)
                out.append({"session": key, "step": kind, "bytes": nbytes, "kv_positions": positions,
                            "datasheet_gbs": gbs, "datasheet": source, "measured_gbs": measured_gbs,
                            "floor_ms": fl, "floor_ms_measured_bw": fl_meas, "measured_ms": measured,
                            "bandwidth_error": probe.get("error"),
                            "ratio": floor.ratio(measured, fl), "ratio_measured_bw": floor.ratio(measured, fl_meas)})
    return out
