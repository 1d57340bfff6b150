"""Train a draft-to-target adapter: AdamW, warmup + cosine schedule, early stopping on val.

Reads data only through `data.TrainValData`, which has no way to return the test split: neither training
nor checkpoint selection (best val chained acceptance, then val loss) can see it. Writes into the output
folder: `adapter.safetensors`, `config.json` (models.AdapterConfig, with data and training provenance),
`metrics.json` (per-epoch curves, selected epoch), `curves.png`; the hidden kind also gets
`target_head.safetensors`. Deterministic for a seed on the CPU (GPU kernels may vary in the last bits).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .data import TrainValData
from .evaluate import chained_acceptance, run_adapter
from .models import AdapterConfig, build_adapter, load_target_head, n_parameters, save_adapter

IGNORE = -100


def make_batch(records, cfg: AdapterConfig, device) -> dict:
    """Right-padded tensors: draft [B,T], target [B,T] (IGNORE where padded), prev [B,T], hidden [B,T,H].
    Positions past cfg.max_len are cut (the live adapter hands those back to the draft)."""
    n = min(max(len(r.target) for r in records), cfg.max_len)
    b = len(records)
    draft = torch.zeros(b, n, dtype=torch.long)
    target = torch.full((b, n), IGNORE, dtype=torch.long)
    prev = torch.full((b, n), -1, dtype=torch.long)
    hidden = None
    if cfg.kind == "hidden":
        hidden = torch.zeros(b, n, records[0].hidden.shape[-1])
    for i, r in enumerate(records):
        m = min(len(r.target), n)
        tgt = torch.as_tensor(np.asarray(r.target[:m], dtype=np.int64))
        draft[i, :m] = torch.as_tensor(np.asarray(r.draft[:m], dtype=np.int64)).clamp(0, cfg.vocab_size - 1)
        target[i, :m] = tgt
        prev[i, 1:m] = tgt[: m - 1]        # the token before position t is the (accepted) target token t-1
        if hidden is not None:
            hidden[i, :m] = torch.as_tensor(r.hidden[:m].astype(np.float32))
    batch = {"draft": draft, "target": target, "prev": prev}
    if hidden is not None:
        batch["hidden"] = hidden
    return {k: v.to(device) for k, v in batch.items()}


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _val_metrics(model, records, cfg: AdapterConfig, device, batch_size: int, k: int, max_new_tokens: int,
                 eos_id: int) -> dict:
    model.eval()
    loss_sum, n_tok, correct = 0.0, 0, 0
    preds, targets = [], []
    with torch.no_grad():
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            batch = make_batch(chunk, cfg, device)
            logits = run_adapter(model, batch)
            loss_sum += float(F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten(), ignore_index=IGNORE,
                                              reduction="sum"))
            valid = batch["target"] != IGNORE
            n_tok += int(valid.sum())
            greedy = logits.argmax(-1)
            correct += int(((greedy == batch["target"]) & valid).sum())
            for j, r in enumerate(chunk):
                p = np.asarray(r.draft, dtype=np.int64).copy()
                m = min(len(r.target), greedy.shape[1])
                p[:m] = greedy[j, :m].cpu().numpy()
                preds.append(p)
                targets.append(r.target)
    chained = chained_acceptance(preds, targets, k, max_new_tokens, eos_id)
    return {"loss": loss_sum / max(1, n_tok), "top1": correct / max(1, n_tok),
            "acceptance_rate": chained["acceptance_rate"], "mean_acceptance_length": chained["mean_acceptance_length"]}


def train(data_dir, kind: str, out, *, epochs: int = 20, lr: float = 3e-4, batch_size: int = 16, seed: int = 0,
          device: str = "cpu", patience: int = 5, weight_decay: float = 0.01, warmup_fraction: float = 0.05,
          d_model: int | None = None, n_layers: int | None = None, n_heads: int | None = None,
          dropout: float | None = None, max_len: int | None = None, k: int = 8, progress: bool = True) -> dict:
    """Train, keep the best-on-val weights, write the checkpoint folder `out`; returns metrics."""
    torch.manual_seed(seed)
    data = TrainValData(data_dir)
    info = data.config
    train_recs = data.split("train", hidden=kind == "hidden")
    val_recs = data.split("val", hidden=kind == "hidden")
    vocab = min(int(info["draft_vocab_size"]), int(info["target_vocab_size"]))
    max_new = int(info["max_new_tokens"])
    cfg = AdapterConfig.defaults(
        kind, vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, dropout=dropout,
        max_len=max_len or max(512, max_new),
        draft_hidden_size=int(info["draft_hidden_size"]) if kind == "hidden" else 0,
        target_hidden_size=int(info["target_hidden_size"]) if kind == "hidden" else 0)
    model = build_adapter(cfg).to(device)
    if kind == "hidden":
        model.set_target_head(*load_target_head(data.target_head_path(), device))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_recs) / batch_size)
    total = steps_per_epoch * epochs
    warmup = max(1, int(warmup_fraction * total))
    shuffle = torch.Generator().manual_seed(seed)
    eos = int(info.get("eos_id", 2))

    history, best, best_state, bad_epochs, step = [], None, None, 0, 0
    val0 = _val_metrics(model, val_recs, cfg, device, batch_size, k, max_new, eos)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_recs), generator=shuffle).tolist()
        loss_sum, n_batches = 0.0, 0
        for i in range(0, len(order), batch_size):
            batch = make_batch([train_recs[j] for j in order[i : i + batch_size]], cfg, device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, lr)
            logits = run_adapter(model, batch)
            loss = F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten(), ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            loss_sum += float(loss.detach())
            n_batches += 1
            step += 1
        val = _val_metrics(model, val_recs, cfg, device, batch_size, k, max_new, eos)
        row = {"epoch": epoch, "train_loss": loss_sum / max(1, n_batches), "lr": lr_at(step - 1, total, warmup, lr),
               **{f"val_{name}": v for name, v in val.items()}}
        history.append(row)
        key = (val["acceptance_rate"], -val["loss"])
        if best is None or key > best[0]:
            best = (key, epoch)
            best_state = {n: t.detach().clone() for n, t in model.state_dict().items()}
            bad_epochs = 0
        else:
            bad_epochs += 1
        if progress:
            print(f"epoch {epoch:3d}  train loss {row['train_loss']:.4f}  val loss {val['loss']:.4f}  "
                  f"val top1 {val['top1']:.3f}  val acceptance {val['acceptance_rate']:.3f}"
                  + ("  *" if best[1] == epoch else ""), file=sys.stderr)
        if bad_epochs >= patience:
            break

    model.load_state_dict(best_state)
    cfg.extra = {"data": str(data_dir), "draft_model": info.get("draft_model"), "target_model": info.get("target_model"),
                 "max_new_tokens": max_new, "event_frames": info.get("event_frames"), "eos_id": eos,
                 # `coordinator run --adapter` flags samples of these sequences: not held-out numbers
                 "sequences": {"train": sorted({r.sequence for r in train_recs}),
                               "val": sorted({r.sequence for r in val_recs})},
                 "train": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "patience": patience,
                           "weight_decay": weight_decay, "warmup_steps": warmup, "k": k,
                           "selected_epoch": best[1], "selection": "val chained acceptance_rate, then val loss"}}
    out = Path(out)
    save_adapter(model, out, target_head=data.target_head_path() if kind == "hidden" else None)
    metrics = {"kind": kind, "parameters": n_parameters(model), "selected_epoch": best[1],
               "train_records": len(train_recs), "val_records": len(val_recs), "val_before_training": val0,
               "best_val": {k_: v for k_, v in history[best[1] - 1].items() if k_.startswith("val_")},
               "history": history}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_curves(history, out / "curves.png", best[1])
    return metrics


def plot_curves(history: list[dict], path, selected_epoch: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    ax1.set_xlabel("epoch")
    ax1.legend()
    ax2.plot(epochs, [h["val_top1"] for h in history], label="val top-1")
    ax2.plot(epochs, [h["val_acceptance_rate"] for h in history], label="val acceptance rate (chained)")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend()
    for ax in (ax1, ax2):
        ax.axvline(selected_epoch, color="grey", linestyle=":", linewidth=1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
