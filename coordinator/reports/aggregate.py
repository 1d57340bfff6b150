"""Per-mode statistics of one run's result records (medians, spread, paired speedup, acceptance).

Pure: plain dicts in, plain dicts out; never imports torch, never fills a gap with a constant.
"""
from __future__ import annotations

import statistics
from typing import Any, Iterable

from .stats import median as _median, number as _number, paired_speedup, percentile as _percentile

MODE_ORDER = ("baseline", "parallel", "speculative")
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


def ordered_modes(modes: Iterable[str]) -> list[str]:
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
    for mode in ordered_modes(by_mode):
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

        stats["speedup"], stats["time_saved_ms"], stats["n_paired"] = paired_speedup(
            baseline_walls, _wall_by_sample(records))

        compared = [r["matches_baseline"] for r in records if r.get("matches_baseline") is not None]
        stats["matches_baseline"] = (
            {"matched": sum(1 for m in compared if m), "compared": len(compared)} if compared else None
        )
        aggregated[mode] = stats
    return aggregated

