"""bench.md and the speedup plot of `coordinator bench`, from the data bench.json holds.

Owns presentation only: every number comes from coordinator.bench's aggregation (and coordinator.bench_model's
ceiling and floor columns). Never imports torch; matplotlib only inside plot_speedup.
"""
from __future__ import annotations

from pathlib import Path

from . import bench_model


def _f(x, digits=1, suffix=""):
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}{suffix}"
    return f"{x}{suffix}"


def render_markdown(data: dict) -> str:
    rows = data["aggregate"]["rows"]
    lines = ["# eventspec benchmark", ""]
    if data.get("synthetic_weights"):
        lines += ["**Random full-size weights (`--synthetic-weights`): timings are real, the text is meaningless; "
                  "acceptance is set by the benchmark oracle.**", ""]
    lines += ["Every number below was measured in one run of:", "", "```bash", data.get("command", ""), "```", ""]
    if data.get("failure"):
        lines += [f"**The run stopped early:** {data['failure']}", ""]
    for skipped in data.get("skipped") or []:
        lines += [f"**Not measured:** {skipped}.", ""]
    for info_key, info in data.get("run_info", {}).items():
        for role, v in info.items():
            about = v.get("info") or {}
            kernels = "".join([", programmatic dependent launch" if about.get("pdl") else ""]
                              + [f", NF4 scales read as {about['nf4_scales']}" if about.get("nf4_scales") else ""]
                              + [f", {k}={val}" for k, val in (about.get("kernel_env") or {}).items()])
            lines.append(f"- {info_key} {role}: {v.get('model_id')} on {v.get('device')} "
                         f"({about.get('cuda_device') or ''}, {about.get('precision')}, "
                         f"step model {about.get('step_model')}, torch {about.get('torch')}{kernels})")
    lines += ["", "## End to end (medians over samples; speedups are paired per sample in this run)", "",
              "| placement | MPS | new tokens | mode | oracle | n | wall ms | p10–p90 | vs baseline | vs best baseline "
              "| vs hf-generate | accept | mean len | free drafts | lossless |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.get('placement') or '—'} | {r['mps']} | {r['max_new_tokens']} | {r['mode']} | {r['oracle'] or '—'} | {r['n']} | "
                     f"{_f(r['wall_ms_median'])} | {_f(r['wall_ms_p10'])}–{_f(r['wall_ms_p90'])} | "
                     f"{_f(r['speedup_vs_baseline'], 2, '×')} | {_f(r.get('speedup_vs_best_baseline'), 2, '×')} | "
                     f"{_f(r['speedup_vs_hf_generate'], 2, '×')} | "
                     f"{_f(r['acceptance_rate'] * 100 if r['acceptance_rate'] is not None else None, 0, '%')} | "
                     f"{_f(r['mean_acceptance_length'], 2)} | {_f(r['free_draft_tokens'], 0)} | "
                     f"{r['matches_baseline'] or '—'} |")
    lines += ["", "## Per-model costs", "",
              "| placement | MPS | new tokens | mode | oracle | target prefill ms | target decode step ms | "
              "target ms/token | draft prefill ms | draft step ms | verify ms by k |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vk = ", ".join(f"{k}: {_f(v, 2)}" for k, v in list(r["verify_ms_by_k"].items())[:8]) or "—"
        lines.append(f"| {r.get('placement') or '—'} | {r['mps']} | {r['max_new_tokens']} | {r['mode']} | {r['oracle'] or '—'} | "
                     f"{_f(r['target_prefill_ms'])} | {_f(r['target_decode_step_ms'], 2)} | "
                     f"{_f(r['target_ms_per_token'], 2)} | {_f(r['draft_prefill_ms'])} | {_f(r['draft_step_ms'], 2)} | {vk} |")
    lines += ["", "## Contention between the workers", "",
              "| placement, MPS | target prefill alone ms | beside the draft ms | slowdown | draft step alone ms | "
              "beside target prefill ms | overlap window ms | free drafts | ideal (window ÷ step alone) | free ÷ ideal |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for mps, c in data["aggregate"]["contention"].items():
        lines.append(f"| {mps} | {_f(c['target_prefill_ms_alone'])} | {_f(c['target_prefill_ms_beside_draft'])} | "
                     f"{_f(c['target_prefill_slowdown'], 3, '×')} | {_f(c['draft_step_ms_alone'], 2)} | "
                     f"{_f(c['draft_step_ms_beside_target_prefill'], 2)} | {_f(c['overlap_window_ms'])} | "
                     f"{_f(c['free_draft_tokens'], 0)} | {_f(c['ideal_free_draft_tokens'], 1)} | "
                     f"{_f(c['free_vs_ideal'], 2)} |")
    lines += [""] + model_sections(data)
    lines += ["", "Definitions: wall = PREFILL sent → last token at the coordinator, input loading included; "
              "acceptance = accepted / drafted; mean len = 1 + accepted / verify rounds; the oracle replaces the "
              "draft's token ids with the baseline's answer (right with probability α per position, or per the "
              "seed's per-position profile) while the draft model runs every forward pass; vs baseline is paired "
              "with the baseline of the same placement and MPS setting, vs best baseline with the fastest "
              "baseline of the run for that sample; lossless = the record's tokens equal the baseline's, which "
              "eventspec's modes must (one row-invariant step); hf-generate runs transformers' own kernels, equal to "
              "the baseline's only to rounding, so at near-tied logits (random weights have many) its tokens may part "
              "from the baseline's (README, where bit-exactness does not hold).", ""]
    return "\n".join(lines)


def plot_speedup(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple, list] = {}
    for r in rows:
        if r["oracle"] and r["oracle"].startswith("alpha=") and r["speedup_vs_baseline"] is not None:
            alpha = float(r["oracle"].split("=", 1)[1])
            series.setdefault((r["mode"], r.get("placement"), r["mps"], r["max_new_tokens"]), []).append(
                (alpha, r["speedup_vs_baseline"], r.get("predicted_speedup")))
    for (mode, placement, mps, n), pts in sorted(series.items(), key=lambda kv: tuple(map(str, kv[0]))):
        pts.sort()
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label=f"{mode}, {placement or ''} MPS {mps}, {n} tok")
        predicted = [(p[0], p[2]) for p in pts if p[2] is not None]
        if predicted:            # the ceiling of the same configuration, dashed in the same colour
            ax.plot([p[0] for p in predicted], [p[1] for p in predicted], ls="--", color=line.get_color(), lw=1)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("oracle acceptance α (per position)")
    ax.set_ylabel("speedup vs baseline (paired, same run)")
    ax.set_title("eventspec: speedup vs draft acceptance (dashed: predicted ceiling)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def model_sections(data: dict) -> list[str]:
    """The ceiling, lost-time, costs-alone and floor sections of bench.md."""
    agg = data["aggregate"]
    rows = [r for r in agg["rows"] if r["mode"] in ("parallel", "speculative")]
    lines = ["## Against the ceiling (coordinator/ceiling.py, from the costs this run measured alone)", "",
             "| placement | MPS | new tokens | mode | oracle | measured vs baseline | predicted | measured ÷ predicted "
             "| predicted wall ms | free drafts (pred.) | how the ceiling gets there |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.get('placement') or '—'} | {r['mps']} | {r['max_new_tokens']} | {r['mode']} | "
                     f"{r['oracle'] or '—'} | {_f(r.get('speedup_vs_baseline'), 2, '×')} | "
                     f"{_f(r.get('predicted_speedup'), 2, '×')} | {_f(r.get('ceiling_ratio'), 2)} | "
                     f"{_f(r.get('predicted_wall_ms'))} | {_f(r.get('predicted_free_drafts'))} | "
                     f"{r.get('ceiling_policy') or r.get('ceiling_note') or '—'} |")
    below = [r for r in rows if r.get("ceiling_ratio") is not None and r["ceiling_ratio"] < 0.9 and r.get("lost_ms")]
    if below:
        lines += ["", "### Where the time went, below 90% of the ceiling (ms per request, medians; the parts add "
                  "up to measured − predicted wall per request)", "",
                  "| placement | MPS | new tokens | mode | oracle | measured − predicted | "
                  + " | ".join(label for _, label in bench_model.LOST_PARTS) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(bench_model.LOST_PARTS)]
        for r in below:
            lost = r["lost_ms"]
            lines.append(f"| {r.get('placement') or '—'} | {r['mps']} | {r['max_new_tokens']} | {r['mode']} | "
                         f"{r['oracle'] or '—'} | {_f(lost.get('total_ms'))} | "
                         + " | ".join(_f(lost.get(k)) for k, _ in bench_model.LOST_PARTS) + " |")
    lines += ["", "Costs measured alone, per session: target decode step and loading/prefill from `baseline`, "
              "the draft's from its draft-alone runs, verification by k from verifications with no draft work "
              "beside them.", "",
              "| session | target step ms | draft step ms | c | target load + prefill ms | draft load + prefill ms | "
              "verify ms by k | verify measured |", "|---|---|---|---|---|---|---|---|"]
    for key, c in (agg.get("costs_alone") or {}).items():
        ratio = (c["draft_step_ms"] / c["target_step_ms"]) if c.get("draft_step_ms") and c.get("target_step_ms") else None
        vk = ", ".join(f"{k}: {_f(v, 2)}" for k, v in list((c.get("verify_ms_by_k") or {}).items())[:8]) or "—"
        lines.append(f"| {key} | {_f(c.get('target_step_ms'), 2)} | {_f(c.get('draft_step_ms'), 2)} | "
                     f"{_f(ratio, 2)} | {_f(c.get('target_load_ms'))} + {_f(c.get('target_prefill_ms'))} | "
                     f"{_f(c.get('draft_load_ms'))} + {_f(c.get('draft_prefill_ms'))} | {vk} | "
                     f"{c.get('verify_source')} |")
    lines += ["", "## Against the bandwidth floor (bytes a step must read ÷ bandwidth; coordinator/floor.py)", "",
              "| session | step | GB read per step | K/V positions | floor ms (datasheet) | measured ms | "
              "measured ÷ floor | measured bandwidth GB/s | floor ms (measured bw) | measured ÷ that floor |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    notes = set()
    for f in agg.get("floor") or []:
        notes.add(f"{f['session']}: datasheet {f['datasheet']}" + (f" ({f['datasheet_gbs']:g} GB/s)" if
                                                                   f.get("datasheet_gbs") else ""))
        if f.get("bandwidth_error"):        # say why the measured-bandwidth columns are empty
            notes.add(f"{f['session']}: the {f['step'].split()[0]}'s bandwidth probe failed: "
                      f"{f['bandwidth_error'].splitlines()[0]}")
        lines.append(f"| {f['session']} | {f['step']} | {_f(f['bytes'] / 1e9 if f['bytes'] else None, 3)} | "
                     f"{_f(f['kv_positions'], 0)} | {_f(f['floor_ms'], 2)} | {_f(f['measured_ms'], 2)} | "
                     f"{_f(f['ratio'], 2, '×')} | {_f(f['measured_gbs'], 0)} | {_f(f['floor_ms_measured_bw'], 2)} | "
                     f"{_f(f['ratio_measured_bw'], 2, '×')} |")
    lines += [""] + [f"- {n}" for n in sorted(notes)] + [""]
    return lines
