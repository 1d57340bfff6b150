"""summary.md and the terminal table: text made only of values measured in the run ("—" for a gap).

Plain dicts in, text out; never imports torch.
"""
from __future__ import annotations

from typing import Any

from .aggregate import MODELS
from .stats import number as _number
from .trace import prepare as _prepare

MISSING = "—"


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


def _how_made(run_info: dict) -> str:
    synthetic = run_info.get("synthetic")
    parts = []
    if synthetic:
        parts.append("**Synthetic run** (fake backends): these numbers describe the harness, not the models.")
    elif synthetic is False:
        parts.append("Real models.")
    described = []
    for key in ("backends", "device", "precision"):
        if run_info.get(key) is not None:
            value = run_info[key]
            if isinstance(value, dict):
                value = ", ".join(f"{k}: {v}" for k, v in value.items())
            elif isinstance(value, (list, tuple)):
                value = ", ".join(map(str, value))
            described.append(f"{key}: {value}")
    others = {k: v for k, v in run_info.items() if k not in ("synthetic", "backends", "device", "precision")}
    described += [f"{k}: {v}" for k, v in others.items()]
    parts.append("Every number below was measured in this run" + (f" ({'; '.join(described)})." if described else "."))
    return " ".join(parts)


def write_summary_md(path, results, agg, *, command: str, run_info: dict, ended: str | None = None) -> None:
    """summary.md: the seed report's tables, filled only with values measured in this run.

    Speedup and time saved are against the baseline (target only) measured in the same run, paired by
    sample. The exact command is written in a code block so the report can be reproduced. ended says how
    the run ended (completed, interrupted by a signal, stopped at the first error, a worker lost).
    """
    results = list(results)
    lines = ["# eventspec run summary", ""]
    if ended is not None:
        lines += [f"**How the run ended:** {ended}", ""]
    lines += ["## How this was made", "", _how_made(run_info or {}), "", "```bash", command, "```", ""]

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
