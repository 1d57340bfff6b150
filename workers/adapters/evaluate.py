"""Offline acceptance of an adapter (and of the raw draft) under greedy verification.

The maths is over token ids only (`window_acceptance`, `chained_acceptance`), so it is tested without
models. Teacher-forced predictions are exact for this purpose: within a verify window, draft j only counts
when drafts 0..j-1 matched the target, and then the draft has seen exactly the target's tokens, as in
teacher forcing.

Two families of numbers:
- every window start: for each answer position s, k drafts at s..s+k-1 accepted up to the first mismatch;
  acceptance by draft index, `accepted / drafted` and the mean accepted prefix;
- chained (the live definitions of results.json): windows start where the previous round ended (accepted
  drafts + the target's correction/bonus token), at most `max_new_tokens - committed - 1` drafts and none
  after the draft's own EOS (the draft worker stops there), position 0 is the target's prefill token;
  `acceptance_rate` = accepted / drafted, `mean_acceptance_length` =
  1 + accepted / rounds. With a fixed k this is what an in-process speculative loop measures live.
Never trains anything.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from workers.engine.core import common_prefix_len


def accepted_prefix(drafts: Sequence[int], target: Sequence[int]) -> int:
    return common_prefix_len(drafts, target)


def window_acceptance(preds: list[np.ndarray], targets: list[np.ndarray], k: int) -> dict:
    """Every window start s: k drafts (fewer at the end of an answer)."""
    drafted = accepted = windows = 0
    by_index = np.zeros(k)
    reached = np.zeros(k)
    for pred, tgt in zip(preds, targets):
        match = np.asarray(pred) == np.asarray(tgt)
        for s in range(len(tgt)):
            m = match[s : s + k]
            a = int(np.argmin(m)) if not m.all() else len(m)
            drafted += len(m)
            accepted += a
            windows += 1
            reached[: len(m)] += 1
            by_index[:a] += 1
    return {"k": k, "windows": windows, "drafted": drafted, "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_accepted_prefix": accepted / windows if windows else 0.0,
            "per_position_acceptance": [float(x) for x in np.divide(by_index, np.maximum(reached, 1))]}


def chained_acceptance(preds: list[np.ndarray], targets: list[np.ndarray], k: int, max_new_tokens: int,
                       eos_id: int) -> dict:
    """Fixed-k speculative rounds over each answer, as the coordinator runs them (see module docstring)."""
    drafted = accepted = rounds = 0
    for pred, tgt in zip(preds, targets):
        tgt = [int(t) for t in tgt]
        committed = 1                       # the target's prefill token
        while committed < min(max_new_tokens, len(tgt)) and eos_id not in tgt[:committed]:
            room = max_new_tokens - committed - 1
            window = max(0, min(k, room))
            drafts = [int(p) for p in pred[committed : committed + window]]
            if eos_id in drafts:            # the live draft stops after proposing EOS
                drafts = drafts[: drafts.index(eos_id) + 1]
            a = accepted_prefix(drafts, tgt[committed:])
            drafted += len(drafts)
            accepted += a
            rounds += 1
            committed += a + 1
    return {"k": k, "rounds": rounds, "drafted": drafted, "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_acceptance_length": 1 + accepted / rounds if rounds else 0.0}


def topk_accuracy(logits_list, targets: list[np.ndarray], ks=(1, 5)) -> dict:
    import torch

    hits = {k: 0 for k in ks}
    total = 0
    for logits, tgt in zip(logits_list, targets):
        tgt = torch.as_tensor(np.asarray(tgt, dtype=np.int64))
        top = logits.topk(max(ks), dim=-1).indices
        for k in ks:
            hits[k] += int((top[:, :k] == tgt[:, None]).any(dim=-1).sum())
        total += len(tgt)
    return {f"top{k}": hits[k] / total if total else 0.0 for k in ks}


def summarize(preds, targets, k: int, max_new_tokens: int, eos_id: int) -> dict:
    top1 = sum(int((np.asarray(p) == np.asarray(t)).sum()) for p, t in zip(preds, targets))
    n = sum(len(t) for t in targets)
    return {"top1": top1 / n if n else 0.0, "positions": n,
            "every_window": window_acceptance(preds, targets, k),
            "chained": chained_acceptance(preds, targets, k, max_new_tokens, eos_id)}


# ---------------------------------------------------------------------------------------------- models
def adapter_logits(model, records, *, device="cpu", batch_size: int = 32) -> list:
    """Teacher-forced logits [n, vocab] per record (float32, CPU)."""
    import torch

    from .train import make_batch

    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            batch = make_batch(chunk, model.cfg, device)
            logits = run_adapter(model, batch).float().cpu()
            for j, rec in enumerate(chunk):
                out.append(logits[j, : min(len(rec.target), model.cfg.max_len)])
    return out


def run_adapter(model, batch: dict):
    if model.cfg.kind == "token":
        return model(batch["draft"])
    return model(batch["hidden"], batch["prev"])


def predictions(model, records, *, device="cpu") -> tuple[list[np.ndarray], list]:
    """Adapter's greedy token per position; past max_len it falls back to the draft's own token, as live."""
    logits = adapter_logits(model, records, device=device)
    preds = []
    for rec, lg in zip(records, logits):
        p = np.asarray(rec.draft, dtype=np.int64).copy()
        p[: len(lg)] = lg.argmax(-1).numpy()
        preds.append(p)
    return preds, logits


def evaluate(data_dir, ckpt, *, split: str = "test", k: int = 8, device: str = "cpu",
             max_new_tokens: int | None = None) -> dict:
    from .data import read_index, read_split
    from .models import load_adapter

    index = read_index(data_dir)
    cfg = index["config"]
    model = load_adapter(ckpt, device=device)
    records = read_split(data_dir, split, hidden=model.cfg.kind == "hidden")
    if not records:
        raise ValueError(f"{data_dir}: split {split!r} has no records")
    targets = [r.target for r in records]
    n_max = max_new_tokens or int(cfg["max_new_tokens"])
    eos = int(cfg.get("eos_id", 2))
    preds, logits = predictions(model, records, device=device)
    adapter = summarize(preds, targets, k, n_max, eos)
    adapter.update(topk_accuracy(logits, [t[: len(lg)] for t, lg in zip(targets, logits)]))
    raw = summarize([r.draft for r in records], targets, k, n_max, eos)
    return {"data": str(data_dir), "ckpt": str(ckpt), "kind": model.cfg.kind, "split": split, "k": k,
            "records": len(records), "max_new_tokens": n_max, "adapter": adapter, "raw_draft": raw}


def format_table(result: dict) -> str:
    a, r = result["adapter"], result["raw_draft"]
    rows = [
        ("top-1 (teacher-forced)", f"{a['top1']:.3f}", f"{r['top1']:.3f}"),
        ("top-5 (teacher-forced)", f"{a.get('top5', float('nan')):.3f}", "n/a"),
        (f"every window, k={result['k']}: accepted/drafted", f"{a['every_window']['acceptance_rate']:.3f}",
         f"{r['every_window']['acceptance_rate']:.3f}"),
        ("every window: mean accepted prefix", f"{a['every_window']['mean_accepted_prefix']:.3f}",
         f"{r['every_window']['mean_accepted_prefix']:.3f}"),
        ("chained (live): acceptance_rate", f"{a['chained']['acceptance_rate']:.3f}",
         f"{r['chained']['acceptance_rate']:.3f}"),
        ("chained (live): mean_acceptance_length", f"{a['chained']['mean_acceptance_length']:.3f}",
         f"{r['chained']['mean_acceptance_length']:.3f}"),
    ]
    w = max(len(x[0]) for x in rows)
    lines = [f"{result['kind']} adapter on split {result['split']}: {result['records']} answers, "
             f"{a['positions']} positions", f"{'':{w}}  {'adapter':>8}  {'raw draft':>9}"]
    lines += [f"{name:{w}}  {x:>8}  {y:>9}" for name, x, y in rows]
    per = a["every_window"]["per_position_acceptance"]
    raw_per = r["every_window"]["per_position_acceptance"]
    lines.append("P(draft i accepted), i = 0..k-1:")
    lines.append("  adapter   " + " ".join(f"{x:.2f}" for x in per))
    lines.append("  raw draft " + " ".join(f"{x:.2f}" for x in raw_per))
    return "\n".join(lines)


def write_result(result: dict, path) -> None:
    Path(path).write_text(json.dumps(result, indent=1))
