"""`coordinator adapter collect | train | eval`: draft-to-target adapter data, training and offline evaluation.

Flags are parsed here and handed to workers.adapters; every module that uses torch is imported inside the
command function, so importing this module (and the coordinator CLI) never imports torch.
"""
from __future__ import annotations

import json
from pathlib import Path

import click


def _fail(exc: Exception):
    raise click.ClickException(str(exc)) from None


@click.group("adapter")
def adapter_group():
    """Draft-to-target adapters: collect teacher-forced data, train, evaluate offline."""


@adapter_group.command("collect")
@click.option("--input", "input_", required=True, type=click.Path(exists=True, file_okay=False),
              help="dataset / DSEC / clip folder (as for `run`)")
@click.option("--draft-model", required=True, type=click.Path(exists=True, file_okay=False),
              help="EventGPT checkpoint folder")
@click.option("--target-model", required=True, type=click.Path(exists=True, file_okay=False),
              help="Video-LLaVA checkpoint folder (-hf layout)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="data folder (created or resumed)")
@click.option("--clip-path", type=click.Path(exists=True, file_okay=False),
              help="local CLIP folder (overrides mm_visual_tower)")
@click.option("--max-new-tokens", type=click.IntRange(1), default=50, show_default=True)
@click.option("--samples", type=click.IntRange(1), help="use the first N samples (splits still use them all)")
@click.option("--precision", type=click.Choice(["nf4", "bf16", "fp16", "fp32"]),
              help="both models (default: nf4 on a GPU, fp32 on the CPU)")
@click.option("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
@click.option("--seed", type=int, default=0, show_default=True, help="seeds the split of sequences")
@click.option("--question-set", type=click.Choice(["dataset", "top10"]), default="dataset", show_default=True,
              help="dataset: each sample's own question; top10: every sample x the ten common questions")
@click.option("--split", "dataset_split", help="only entries of this dataset split (e.g. train)")
@click.option("--split-by", type=click.Choice(["sequence", "dataset"]), default="sequence", show_default=True,
              help="sequence: a seeded shuffle of the DSEC sequences into train/val/test (--val-fraction, "
                   "--test-fraction); dataset: the dataset index's own split labels (e.g. make-demo's), so that "
                   "`run --split test` runs exactly the held-out samples")
@click.option("--event-frames", type=click.IntRange(1), default=5, show_default=True)
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="share of sequences for val")
@click.option("--test-fraction", type=float, default=0.1, show_default=True, help="share of sequences for test")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--ray", "ray_address", metavar="local|auto|HOST:PORT",
              help="collect with many pipelines on Ray (needs eventspec[cluster]); the same --out resumes")
@click.option("--pipelines", type=click.IntRange(1), help="with --ray: how many (default: one per GPU, or one "
              "per 2 CPUs on a CPU-only cluster)")
def collect_command(input_, draft_model, target_model, out, clip_path, max_new_tokens, samples, precision, device,
                    seed, question_set, dataset_split, split_by, event_frames, val_fraction, test_fraction, quiet,
                    ray_address, pipelines):
    """Target greedy answers + the draft teacher-forced on them, split by DSEC sequence."""
    from workers.adapters.data import DataError
    from workers.inputs.errors import InputError

    if pipelines and not ray_address:
        raise click.UsageError("--pipelines needs --ray local|auto|HOST:PORT")
    if ray_address:
        from .cluster import RayMissing
        from .cluster.collect import collect_on_ray
        plan_args = dict(input_dir=input_, draft_model=draft_model, target_model=target_model, out_dir=out,
                         clip_path=clip_path, max_new_tokens=max_new_tokens, samples=samples, seed=seed,
                         question_set=question_set, event_frames=event_frames, val_fraction=val_fraction,
                         test_fraction=test_fraction, split=dataset_split, split_by=split_by,
                         warn=lambda text: click.echo(text, err=True))
        settings = dict(draft_model=draft_model, target_model=target_model, clip_path=clip_path, precision=precision,
                        device=device, event_frames=event_frames, max_new_tokens=max_new_tokens)
        try:
            summary = collect_on_ray(address=ray_address, pipelines=pipelines, settings=settings, plan_args=plan_args,
                                     quiet=quiet)
        except (RayMissing, InputError, DataError, ConnectionError, ValueError) as exc:
            _fail(exc)
        _echo_summary(summary)
        if summary.get("failure"):
            raise click.ClickException(summary["failure"])
        return
    from workers.adapters.collect import collect
    from workers.models.loading import CheckpointError

    device = device or _default_device()
    precision = precision or ("nf4" if device.startswith("cuda") else "fp32")
    try:
        summary = collect(input_, draft_model, target_model, out, clip_path=clip_path, max_new_tokens=max_new_tokens,
                          samples=samples, precision=precision, device=device, seed=seed, question_set=question_set,
                          event_frames=event_frames, val_fraction=val_fraction, test_fraction=test_fraction,
                          split=dataset_split, split_by=split_by, progress=not quiet,
                          warn=lambda text: click.echo(text, err=True))
    except (InputError, DataError, CheckpointError, ValueError) as exc:
        _fail(exc)
    _echo_summary(summary)


def _echo_summary(summary: dict) -> None:
    if "records" not in summary:
        return
    click.echo(f"{summary['out']}: records {summary['records']}, positions {summary['positions']}, "
               f"{summary['new_records']} new, {summary['bad_samples']} unusable samples")
    for split_name, seqs in summary["sequences"].items():
        click.echo(f"  {split_name}: {len(seqs)} sequences, {summary['records'][split_name]} records"
                   + ("  <- empty" if not summary["records"][split_name] else ""))
    tp = (summary.get("ray") or {}).get("throughput") or {}
    if tp.get("items_per_s"):
        click.echo(f"  {tp['items']} sample(s) on {summary['ray']['pipelines']} pipeline(s): "
                   f"{tp['items_per_s']:.3f} samples/s (first dispatch to last result)")


@adapter_group.command("train")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="folder written by `adapter collect`")
@click.option("--kind", type=click.Choice(["token", "hidden"]), required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="checkpoint folder to write")
@click.option("--epochs", type=click.IntRange(1), default=20, show_default=True)
@click.option("--lr", type=float, default=3e-4, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--patience", type=click.IntRange(1), default=5, show_default=True,
              help="stop after this many epochs without a better val acceptance")
@click.option("--weight-decay", type=float, default=0.01, show_default=True)
@click.option("--d-model", type=click.IntRange(1), help="width (token: 512, hidden: 1024)")
@click.option("--layers", "n_layers", type=click.IntRange(1), help="transformer layers (token: 4, hidden: 1)")
@click.option("--heads", "n_heads", type=click.IntRange(1), help="attention heads (8)")
@click.option("--dropout", type=float, help="(0.1)")
@click.option("--k", type=click.IntRange(1), default=8, show_default=True, help="draft window for val acceptance")
@click.option("--quiet", is_flag=True)
def train_command(data_dir, kind, out, epochs, lr, batch_size, seed, device, patience, weight_decay, d_model,
                  n_layers, n_heads, dropout, k, quiet):
    """Train on train, select on val (the test split is never read)."""
    from workers.adapters.data import DataError, check_training_splits

    try:
        check_training_splits(data_dir)           # before torch is even imported
        from workers.adapters.train import train
        metrics = train(data_dir, kind, out, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device,
                        patience=patience, weight_decay=weight_decay, d_model=d_model, n_layers=n_layers,
                        n_heads=n_heads, dropout=dropout, k=k, progress=not quiet)
    except (DataError, ValueError, FileNotFoundError) as exc:
        _fail(exc)
    best = metrics["best_val"]
    click.echo(f"{out}: {kind} adapter, {metrics['parameters']:,} parameters, epoch {metrics['selected_epoch']} "
               f"selected: val top-1 {best['val_top1']:.3f}, val acceptance rate {best['val_acceptance_rate']:.3f}")


@adapter_group.command("eval")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--ckpt", required=True, type=click.Path(exists=True, file_okay=False), help="checkpoint folder")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--k", type=click.IntRange(1), default=8, show_default=True, help="drafts per verification")
@click.option("--max-new-tokens", type=click.IntRange(1), help="live budget (default: the collection's)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="also write the result here")
def eval_command(data_dir, ckpt, split, k, max_new_tokens, device, json_out):
    """Acceptance under greedy verification, adapter vs raw draft, as a table and JSON."""
    from workers.adapters.data import DataError
    from workers.adapters.evaluate import evaluate, format_table

    try:
        result = evaluate(data_dir, ckpt, split=split, k=k, device=device, max_new_tokens=max_new_tokens)
    except (DataError, ValueError, FileNotFoundError) as exc:
        _fail(exc)
    click.echo(format_table(result))
    path = Path(json_out) if json_out else Path(ckpt) / f"eval_{split}_k{k}.json"
    path.write_text(json.dumps(result, indent=1))
    click.echo(f"written: {path}")


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"
