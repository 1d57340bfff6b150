"""`coordinator demo`: every mode on the held-out demo clips with the tiny trained pair, and a summary a newcomer
can read (what ran, real acceptance, lossless or not, the speedup and why the CPU cannot show the GPU's overlap).

The run itself is `coordinator run` (runner.run: warm-up, results.json, summary.md, trace); this module adds a
short draft-alone probe (the draft's load and prefill with the target idle, beside the run's baseline = the
target alone) and writes `demo.md`. `demo_summary` is a pure function of results.json and the probe.
Never imports torch.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

from . import reports
from .runner import RunConfig, run
from .session import Session, WorkerSpec

MODES = ("baseline", "parallel", "speculative")


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def probe_draft_alone(draft: WorkerSpec, samples: list[dict], log_dir: Path, *, steps: int = 4) -> dict:
    """The draft worker on its own: load_inputs and prefill per sample (after one unmeasured request)."""
    session = Session([WorkerSpec(draft.role, draft.backend, dict(draft.options), draft.endpoint)], log_dir=log_dir)
    try:
        session.start()
        session.run_draft_alone(samples[0], question=samples[0].get("question") or "", steps=steps)
        session.events.clear()
        for sample in samples:
            session.run_draft_alone(sample, question=sample.get("question") or "", steps=steps)
        spans = [e for e in session.events if e.get("kind") == "span" and e.get("proc") == "draft"]
        out = {}
        for name in ("load_inputs", "prefill"):
            out[f"{name}_ms"] = _median([(e["end_ns"] - e["start_ns"]) / 1e6 for e in spans if e["name"] == name])
        out["samples"] = len(samples)
        return out
    finally:
        session.close()


def _stage_ms(records: list[dict], mode: str, role: str, name: str):
    return _median([(r.get(role) or {}).get(name) for r in records if r.get("mode") == mode and r.get("status") == "ok"])


def _fmt(ms) -> str:
    return "n/a" if ms is None else f"{ms:.1f} ms"


def demo_summary(results: dict, probe: dict | None, *, references: dict | None = None, cpu_count: int | None = None,
                 out_dir: str = "") -> str:
    """The newcomer's summary: plain sentences, every number from results.json or the probe."""
    info = results.get("run_info") or {}
    records = [r for r in results.get("records", []) if r.get("status") == "ok"]
    agg = results.get("aggregate") or {}
    samples = sorted({r["sample_id"] for r in records})
    lines = ["# What the demo ran", ""]
    weights = reports.weights_label(info) or "unknown weights"
    params = {role: (wi or {}).get("parameters") for role, wi in (info.get("worker_info") or {}).items()}
    size = ", ".join(f"{role} {p / 1e6:.2f} M parameters" for role, p in params.items() if p)
    lines += [f"- **Models**: EventGPT drafts from 5 event images, Video-LLaVA is the target and reads 8 video frames. "
              f"Weights: {weights}" + (f" ({size})." if size else "."),
              "  The synthetic scenes show one coloured shape, small or large, moving through one of three rows "
              "over a dark background; the target names its colour, the draft cannot see it (events carry no "
              "colour) and words some things differently, so the draft is right often but not always.",
              f"- **Clips**: {len(samples)} held-out clips (the `test` split of the demo data, never used in "
              f"training), {len(MODES)} modes each, greedy, after one unmeasured warm-up request per mode; "
              f"devices: {', '.join(f'{k} {v}' for k, v in (info.get('device') or {}).items())}."]
    refs = references or {}
    base = [r for r in records if r.get("mode") == "baseline"]
    for r in base[:2]:
        lines.append(f"- **{r['sample_id']}**, asked \"{r.get('question')}\": the target answered "
                     f"\"{(r.get('text') or '').strip()}\"" + (f"; the scene's caption is \"{refs[r['sample_id']]}\"."
                                                              if r["sample_id"] in refs else "."))
    spec = agg.get("speculative") or {}
    par = agg.get("parallel") or {}
    lines += ["", "## Results", ""]
    if spec.get("acceptance_rate") is not None:
        lines.append(f"- **Acceptance** (speculative): {spec.get('accepted_tokens')} of {spec.get('drafted_tokens')} "
                     f"drafted tokens accepted per sample (median), {100 * spec['acceptance_rate']:.1f}% over all samples; "
                     f"mean acceptance length {spec.get('mean_acceptance_length') or 0:.2f} tokens per verification. "
                     "The adaptive policy verifies the drafts that are ready when the target is, so windows are "
                     "short here; README's adapter recipe measures fixed windows of 4 drafts.")
    for mode, stats in (("parallel", par), ("speculative", spec)):
        m = stats.get("matches_baseline") or {}
        if m:
            same = "every output equals the baseline's, token for token" if m.get("matched") == m.get("compared") \
                else "**some outputs differ from the baseline** (a bug: speculative decoding must be lossless)"
            lines.append(f"- **{mode}**: {m.get('matched')}/{m.get('compared')} outputs equal to the baseline "
                         f"({same}); speedup {stats.get('speedup') or 0:.2f}× (median of baseline wall / {mode} "
                         f"wall, paired by clip; baseline {_fmt((agg.get('baseline') or {}).get('wall_ms_median'))}, "
                         f"{mode} {_fmt(stats.get('wall_ms_median'))}).")
    devices = set((info.get("device") or {}).values())
    if devices == {"cpu"}:
        t_alone = [_stage_ms(records, "baseline", "target", k) for k in ("load_ms", "prefill_ms")]
        t_beside = [_stage_ms(records, m, "target", k) for m in ("parallel",) for k in ("load_ms", "prefill_ms")]
        d_beside = [_stage_ms(records, "parallel", "draft", k) for k in ("load_ms", "prefill_ms")]
        d_alone = [probe.get("load_inputs_ms"), probe.get("prefill_ms")] if probe else [None, None]
        window = _median([r.get("overlap_window_ms") for r in records if r.get("mode") == "parallel"])
        cores = cpu_count or os.cpu_count()
        lines += ["", f"## Why the CPU cannot show the GPU's overlap ({cores} CPU cores, both workers on them)", "",
                  "The method wins time by letting the draft load and prefill *while* the target does, on hardware "
                  "that has room for both. Measured here (medians, load inputs / prefill):", "",
                  "| worker | alone | beside the other worker |", "|---|---|---|",
                  f"| target (Video-LLaVA) | {_fmt(t_alone[0])} / {_fmt(t_alone[1])} | "
                  f"{_fmt(t_beside[0])} / {_fmt(t_beside[1])} |",
                  f"| draft (EventGPT) | {_fmt(d_alone[0])} / {_fmt(d_alone[1])} | "
                  f"{_fmt(d_beside[0])} / {_fmt(d_beside[1])} |", "",
                  "Target alone = the baseline mode; beside = the parallel mode (both start at the same moment); draft "
                  "alone = a separate draft-only probe. "
                  f"The draft's prefill ends {_fmt(window)} before the target's (median overlap window). On a GPU "
                  "the target's prefill of ~2,000 positions takes tens of milliseconds and, with two GPUs or MPS, "
                  "the draft runs beside it (BENCHMARKS.md has the measured GPU numbers). Here both workers share "
                  "the same cores, so whatever one computes the other waits for (compare the two columns), the "
                  "target's prefill is a few milliseconds, and each step of a model this small costs about as much "
                  "in Python and message passing as in arithmetic: the speedups above are CPU numbers over a few "
                  "clips on a shared machine (see the p10–p90 spread in summary.md), not the GPU's. The acceptance "
                  "and the lossless outputs carry over; the timings do not."]
    lines += ["", f"Every number above comes from `{out_dir}/results.json` (per-sample records in `summary.md`, the "
              "timeline in `trace.json`: open it in https://ui.perfetto.dev)." if out_dir else ""]
    return "\n".join(lines).rstrip() + "\n"


def run_demo(data_dir: str, models_dir: str, out_dir: str, *, max_new_tokens: int = 40, mps: str = "auto",
             extra: dict | None = None) -> int:
    """runner.run on the test split with the tiny pair, the draft-alone probe, demo.md. Returns the exit code."""
    models = Path(models_dir)
    options = {"model": str(models / "eventgpt"), "temperature": 0.0, "seed": 0}
    draft = WorkerSpec("draft", "eventgpt", dict(options, **(extra or {})))
    target = WorkerSpec("target", "videollava", dict(options, model=str(models / "videollava"), **(extra or {})))
    cfg = RunConfig(input=data_dir, output_dir=out_dir, modes=list(MODES), max_new_tokens=max_new_tokens,
                    split="test", draft=draft, target=target, mps=mps,
                    command=f"coordinator demo --data {data_dir} --models {models_dir} --output-dir {out_dir}")
    code = run(cfg)
    results_path = Path(out_dir) / "results.json"
    if not results_path.is_file():
        return code
    results = json.loads(results_path.read_text())
    probe = None
    devices = set(((results.get("run_info") or {}).get("device") or {}).values())
    if code == 0 and devices == {"cpu"}:
        from .runner import discover
        samples, _ = discover(cfg)
        print("measuring the draft alone (draft-only probe)", file=sys.stderr)
        probe = probe_draft_alone(draft, samples, Path(out_dir) / "logs-probe")
    references = _references(data_dir)
    text = demo_summary(results, probe, references=references, out_dir=out_dir)
    (Path(out_dir) / "demo.md").write_text(text)
    if probe is not None:
        results["draft_alone_probe"] = probe
        results_path.write_text(json.dumps(results, indent=1))
    print(text)
    return code


def _references(data_dir: str) -> dict:
    index = Path(data_dir) / "EventGPT_Instruction_Subset.json"
    try:
        entries = json.loads(index.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for e in entries:
        turns = [t for t in e.get("conversations") or [] if t.get("from") == "gpt"]
        if turns:
            out[str(e.get("id"))] = turns[0].get("value")
    return out
