"""Where a one-GPU speculative round spends the time that is neither a draft step nor a verification: the
hand-over from the draft's last step to the target's verification and back to the draft's rebase, message
by message, from a bench run's events (every message and span is timestamped with `time.monotonic_ns`):

    python benchmarks/handover.py OUT/events.jsonl[.gz] OUT/bench.json[.gz]

For every `speculative` request that drafted and every verification: draft step end
-> DRAFT sent -> coordinator -> VERIFY sent -> target -> verify span start, and verify end -> VERIFY_RESULT
-> coordinator -> REBASE -> draft -> rebase span start; plus the gaps between consecutive draft steps.
Prints the median and mean of each part in ms.
"""
from __future__ import annotations

import gzip
import json
import statistics
import sys
from collections import defaultdict


def _open(path: str):
    return gzip.open(path, "rt") if path.endswith(".gz") else open(path)


def breakdown(events: list[dict], request_ids: set[str]) -> dict[str, list[float]]:
    """Per part of the hand-over, its durations (ms) over every round of the given requests."""
    parts: dict[str, list[float]] = defaultdict(list)
    by_request: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("request_id") in request_ids:
            by_request[e["request_id"]].append(e)
    for es in by_request.values():
        spans = sorted((e for e in es if e["kind"] == "span"), key=lambda e: e["start_ns"])
        msgs = sorted((e for e in es if e["kind"] == "message"), key=lambda e: e["sent_ns"])
        draft_work = [s for s in spans if s["proc"] == "draft" and s["name"] in ("draft_step", "rebase")]

        def first(kind, after):
            return next((x for x in msgs if x["type"] == kind and x["sent_ns"] >= after), None)

        def add(name, start, end):
            parts[name].append((end - start) / 1e6)

        for v in (s for s in spans if s["proc"] == "target" and s["name"] == "verify"):
            verify = [x for x in msgs if x["type"] == "verify" and x["recv_ns"] <= v["start_ns"]]
            before = [s for s in draft_work if verify and s["end_ns"] <= verify[-1]["sent_ns"]]
            if verify and before:
                verify, last = verify[-1], before[-1]
                draft = first("draft", last["end_ns"])
                if draft is not None and draft["recv_ns"] <= verify["sent_ns"]:
                    add("1 draft step end -> DRAFT sent", last["end_ns"], draft["sent_ns"])
                    add("2 DRAFT draft -> coordinator", draft["sent_ns"], draft["recv_ns"])
                    add("3 coordinator: DRAFT in -> VERIFY out", draft["recv_ns"], verify["sent_ns"])
                add("4 VERIFY coordinator -> target", verify["sent_ns"], verify["recv_ns"])
                add("5 target: VERIFY in -> verify span", verify["recv_ns"], v["start_ns"])
            result = first("verify_result", v["end_ns"])
            if result is None:
                continue
            add("6 verify span end -> VERIFY_RESULT sent", v["end_ns"], result["sent_ns"])
            add("7 VERIFY_RESULT target -> coordinator", result["sent_ns"], result["recv_ns"])
            rebase = first("rebase", result["recv_ns"])
            if rebase is None:
                continue
            add("8 coordinator: VERIFY_RESULT in -> REBASE out", result["recv_ns"], rebase["sent_ns"])
            add("9 REBASE coordinator -> draft", rebase["sent_ns"], rebase["recv_ns"])
            span = next((s for s in draft_work if s["name"] == "rebase" and s["start_ns"] >= rebase["recv_ns"]), None)
            if span is not None and span["start_ns"] - rebase["recv_ns"] < 5e6:    # not a paused draft
                add("10 draft: REBASE in -> rebase span", rebase["recv_ns"], span["start_ns"])
                add("rebase span (the round's first draft)", span["start_ns"], span["end_ns"])
        for a, b in zip(draft_work, draft_work[1:]):
            if b["name"] == "draft_step" and b["start_ns"] - a["end_ns"] < 1e6:
                add("gap between draft steps", a["end_ns"], b["start_ns"])
    return dict(parts)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with _open(argv[0]) as f:
        events = [json.loads(line) for line in f if line.strip()]
    with _open(argv[1]) as f:
        records = json.load(f)["records"]
    drafting = {r["request_id"] for r in records if r["mode"] == "speculative" and (r.get("drafted_tokens") or 0) > 0}
    parts = breakdown(events, drafting)
    if not parts:
        print("no drafting speculative request with verifications in these events", file=sys.stderr)
        return 1
    print(f"{len(drafting)} drafting speculative requests")
    hand_over = 0.0
    for name in sorted(parts, key=lambda n: (not n[0].isdigit(), int(n.split()[0]) if n[0].isdigit() else 0, n)):
        xs = parts[name]
        med = statistics.median(xs)
        hand_over += med if name[0].isdigit() else 0.0
        print(f"{name:48s} n={len(xs):5d}  median {med:7.3f} ms  mean {statistics.fmean(xs):7.3f} ms")
    print(f"{'hand-over a round (sum of the numbered medians)':48s} {hand_over:7.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
