"""`coordinator ceiling BENCH_JSON`: what a measured machine allows at any acceptance, before an adapter is
trained. Reads the costs a `coordinator bench` run measured alone (bench.json's costs_alone) and prints the
ceiling of each mode and placement for the acceptances asked for. Never imports torch.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from . import bench_model, ceiling


@click.command("ceiling")
@click.argument("bench_json", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--alphas", default="0.3,0.5,0.7,0.9,1", show_default=True, help="acceptance per position")
@click.option("--oracle-profile", "profiles", default="seed", show_default=True, help="per-position profiles ('' for none)")
@click.option("--max-new-tokens", type=click.IntRange(1), default=200, show_default=True)
@click.option("--k-max", type=click.IntRange(1, 64), default=16, show_default=True)
@click.option("--draft-step-ms", type=click.FloatRange(min=0, min_open=True),
              help="what if: replace the measured draft step by this (e.g. a faster draft kernel)")
def ceiling_command(bench_json: Path, alphas: str, profiles: str, max_new_tokens: int, k_max: int,
                    draft_step_ms: float | None) -> None:
    """Predicted speedups from the costs measured in BENCH_JSON (a `coordinator bench` output)."""
    try:
        data = json.loads(bench_json.read_text())
        sessions = data["aggregate"]["costs_alone"]
    except (ValueError, KeyError, TypeError):
        raise click.ClickException(f"{bench_json}: not a bench.json with measured costs (costs_alone); "
                                   "run `coordinator bench` again with this version") from None
    try:
        accs = [(f"alpha={float(a):g}", ceiling.Acceptance.iid(float(a))) for a in alphas.split(",") if a.strip()]
        accs += [(f"profile={p.strip()}", ceiling.Acceptance.profile(p.strip())) for p in profiles.split(",") if p.strip()]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--alphas / --oracle-profile") from None
    click.echo(f"| session | c | mode | {' | '.join(label for label, _ in accs)} |")
    click.echo("|---|---|---|" + "---|" * len(accs))
    for key, measured in sessions.items():
        costs = bench_model.costs_from(measured)
        if costs is None:
            click.echo(f"| {key} | — | costs alone not all measured |" + " |" * len(accs))
            continue
        if draft_step_ms is not None:
            costs = dataclasses.replace(costs, draft_step_ms=draft_step_ms)
        placement = "two-gpu" if key.startswith("two-gpu") else "same-gpu"
        c = costs.draft_step_ms / costs.target_step_ms
        for mode in ("parallel", "speculative"):
            cells = [ceiling.predict(mode, placement, max_new_tokens, costs, acc, k_max=k_max)["speedup"]
                     for _, acc in accs]
            click.echo(f"| {key} | {c:.2f} | {mode} | " + " | ".join(f"{x:.2f}×" for x in cells) + " |")
