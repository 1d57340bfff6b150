"""Collect adapter training data: the target's greedy answer, and the draft teacher-forced on that answer.

For each sample x question: Video-LLaVA answers greedily (up to `max_new_tokens`, through the same
HFStepModel + TokenEngine as the workers); then EventGPT reads its own prompt and event images and, in one
more forward pass, the target's answer minus its last token. Row t of the draft's output is then exactly
what the draft would offer the verifier for answer position t when everything before t was accepted: the
prefill row for t = 0, the row after feeding answer[t-1] for t > 0. Pairs from two independently generated
answers (the seed's mistake) stop describing the same text after the first difference; these never do.

In-process, one model of each kind; resumable (records already in the index are skipped; shards are
written at sample boundaries). Never trains or evaluates anything.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .data import (FORMAT, INDEX, SPLITS, TARGET_HEAD, VERSION, DataError, assign_splits, read_index, record_key,
                   write_index, write_shard)

QUESTION_SETS = ("dataset", "top10")
SPLIT_BY = ("sequence", "dataset")


def dataset_splits(samples: list[dict], input_dir) -> dict[str, str]:
    """sequence -> split from the samples' own labels; every sequence needs one label among SPLITS."""
    split_of: dict[str, str] = {}
    for s in samples:
        label = s.get("split")
        if label not in SPLITS:
            raise DataError(f"{input_dir}: sample {s['sample_id']} has split {label!r}; --split-by dataset needs "
                            f"every sample labelled {', '.join(SPLITS)} (or use --split-by sequence)")
        if split_of.setdefault(s["sequence"], label) != label:
            raise DataError(f"{input_dir}: sequence {s['sequence']} has samples in splits {split_of[s['sequence']]} "
                            f"and {label}; --split-by dataset needs one split per sequence")
    return split_of


def _questions(sample: dict, question_set: str) -> list[str]:
    from workers.inputs import TOP10_QUESTIONS

    return [sample["question"]] if question_set == "dataset" else list(TOP10_QUESTIONS)


def target_answer(target_engine, prompt, max_new_tokens: int, eos_id: int) -> list[int]:
    """The target's greedy answer: up to max_new_tokens tokens, EOS included when it comes."""
    answer = [target_engine.start(prompt)]
    while len(answer) < max_new_tokens and answer[-1] != eos_id:
        answer.append(target_engine.step())
    return answer


def teacher_force(draft_step_model, prompt, answer: list[int]):
    """(draft greedy [n], draft hidden [n, H]) with row t = the draft's offer for answer position t."""
    import torch

    first = draft_step_model.prefill(prompt)
    greedy, hidden = list(first.greedy), [first.hidden]
    if len(answer) > 1:
        rest = draft_step_model.forward(answer[:-1])
        greedy += list(rest.greedy)
        hidden.append(rest.hidden)
    return np.asarray(greedy, dtype=np.int32), torch.cat(hidden).float().cpu().numpy()


def _new_index(config: dict, split_of: dict[str, str]) -> dict:
    return {"format": FORMAT, "version": VERSION, "config": config, "splits": split_of, "records": [],
            "shards": {s: 0 for s in SPLITS}, "bad": []}


def collect(input_dir, draft_model, target_model, out_dir, *, clip_path=None, max_new_tokens: int = 50,
            samples: int | None = None, precision: str = "fp32", device: str = "cpu", seed: int = 0,
            question_set: str = "dataset", event_frames: int = 5, val_fraction: float = 0.1,
            test_fraction: float = 0.1, split: str | None = None, split_by: str = "sequence",
            progress: bool = True, warn=None) -> dict:
    """Write (or extend) the data folder `out_dir`; returns a summary dict.

    split_by "sequence": a seeded shuffle of the sequences (`assign_splits`); "dataset": each sample's split
    label from the dataset index (train / val / test, one label per sequence), e.g. make-demo's. `warn` (a
    callable) hears about empty splits before anything is collected."""
    import torch
    from tqdm import tqdm

    from workers.engine.core import TokenEngine
    from workers.engine.hf import HFStepModel
    from workers.inputs import InputError, discover_samples, load_sample_inputs
    from workers.models.loading import (embed_tokens, eventgpt_prefill_inputs, lm_head_weight, load_eventgpt,
                                        load_videollava, videollava_prefill_inputs)

    if split_by not in SPLIT_BY:
        raise DataError(f"--split-by must be one of {', '.join(SPLIT_BY)}, not {split_by!r}")
    if question_set not in QUESTION_SETS:
        raise DataError(f"--question-set must be one of {', '.join(QUESTION_SETS)}, not {question_set!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    # splits come from every sequence of the input, before --samples cuts it, so they do not depend on it
    found, bad = discover_samples(input_dir, split=split)
    if split_by == "dataset":
        split_of = dataset_splits(found, input_dir)
    else:
        split_of = assign_splits([s["sequence"] for s in found], seed=seed, val_fraction=val_fraction,
                                 test_fraction=test_fraction)
    empty = [s for s in SPLITS if s not in split_of.values()]
    if empty and warn is not None:
        warn(f"warning: {len(split_of)} sequence(s) in {input_dir} leave the {' and '.join(empty)} split(s) empty "
             "(splits are by sequence): `adapter train` needs train and val, `adapter eval` needs test. Use more "
             "sequences (e.g. `coordinator make-demo DIR --sequences 10`)"
             + (" or other --val-fraction/--test-fraction." if split_by == "sequence" else "."))
    chosen = found[:samples] if samples else found

    config = {"input": str(input_dir), "draft_model": str(draft_model), "target_model": str(target_model),
              "split_by": split_by,
              "clip_path": str(clip_path) if clip_path else None, "max_new_tokens": max_new_tokens,
              "precision": precision, "question_set": question_set, "event_frames": event_frames, "seed": seed,
              "val_fraction": val_fraction, "test_fraction": test_fraction}
    if (out / INDEX).is_file():
        index = read_index(out)
        _check_resumable(out, index, config, split_of)
    else:
        index = _new_index(config, split_of)

    done = {r["key"] for r in index["records"]}
    todo = [(s, q_i, q) for s in chosen for q_i, q in enumerate(_questions(s, question_set))
            if record_key(s["sample_id"], q_i) not in done]

    draft = load_eventgpt(draft_model, clip_path=clip_path, precision=precision, device=device)
    target = load_videollava(target_model, precision=precision, device=device)
    draft_vocab = int(draft.model.config.vocab_size)
    target_config = getattr(target.model.config, "text_config", target.model.config)
    eos_id = int(target.tokenizer.eos_token_id if target.tokenizer.eos_token_id is not None else 2)
    index["config"].update({
        "draft_vocab_size": draft_vocab, "target_vocab_size": int(target_config.vocab_size),
        "draft_hidden_size": int(draft.model.config.hidden_size),
        "target_hidden_size": int(target_config.hidden_size), "eos_id": eos_id})
    if not (out / TARGET_HEAD).is_file():
        from safetensors.torch import save_file
        tmp = out / (TARGET_HEAD + ".tmp")
        save_file({"lm_head": lm_head_weight(target).detach().cpu().contiguous(),
                   "embed_tokens": embed_tokens(target).weight.detach().cpu().contiguous()}, str(tmp))
        tmp.replace(out / TARGET_HEAD)
    write_index(out, index)

    target_engine = TokenEngine(HFStepModel(target.model))
    draft_step = HFStepModel(draft.model, want_hidden=True)
    pending: dict[str, list[dict]] = {s: [] for s in SPLITS}
    bar = tqdm(total=len(todo), unit="answer", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    truncated = 0
    by_sample: dict[str, list] = {}
    for item in todo:
        by_sample.setdefault(item[0]["sample_id"], []).append(item)
    for sample_items in by_sample.values():
        sample = sample_items[0][0]
        try:
            frames = load_sample_inputs(sample, "target")["video_frames"]
            events = load_sample_inputs(sample, "draft", event_frames=event_frames)["event_images"]
        except InputError as exc:
            index["bad"].append({"sample_id": sample["sample_id"], "error": str(exc)})
            bar.update(len(sample_items))
            continue
        split_name = split_of[sample["sequence"]]
        for _, q_i, question in sample_items:
            target_prompt, _ = videollava_prefill_inputs(target, frames, question)
            answer = target_answer(target_engine, target_prompt, max_new_tokens, eos_id)
            if any(t >= draft_vocab for t in answer):   # ids the draft cannot read (e.g. <video>): cut there
                answer = answer[: next(i for i, t in enumerate(answer) if t >= draft_vocab)]
                truncated += 1
            if answer:
                draft_prompt, _ = eventgpt_prefill_inputs(draft, events, question)
                greedy, hidden = teacher_force(draft_step, draft_prompt, answer)
                pending[split_name].append({
                    "key": record_key(sample["sample_id"], q_i), "sample_id": sample["sample_id"],
                    "sequence": sample["sequence"], "question": question, "split": split_name,
                    "target": np.asarray(answer, dtype=np.int32), "draft": greedy, "hidden": hidden})
            bar.update(1)
        if sum(len(v) for v in pending.values()) >= 64:
            _flush(out, index, pending)
    _flush(out, index, pending)
    bar.close()

    counts = {s: sum(1 for r in index["records"] if r["split"] == s) for s in SPLITS}
    positions = {s: sum(r["n"] for r in index["records"] if r["split"] == s) for s in SPLITS}
    return {"out": str(out), "records": counts, "positions": positions, "new_records": len(todo),
            "bad_samples": len(index["bad"]) + len(bad), "truncated_answers": truncated,
            "sequences": {s: sorted(q for q, v in split_of.items() if v == s) for s in SPLITS}}


def _check_resumable(out: Path, index: dict, config: dict, split_of: dict[str, str]) -> None:
    old = index["config"]
    for key in ("max_new_tokens", "question_set", "event_frames", "seed", "precision", "split_by"):
        before = old.get(key, "sequence" if key == "split_by" else None)   # older folders had no split_by
        if before != config[key]:
            raise DataError(f"{out / INDEX}: collected with {key}={before!r}, now {config[key]!r}; use a new "
                            "--out folder or the same settings to resume")
    for seq, s in split_of.items():
        if index["splits"].get(seq, s) != s:
            raise DataError(f"{out / INDEX}: sequence {seq} was in split {index['splits'][seq]}, now {s}; the input "
                            "folder changed: use a new --out folder")
    index["splits"].update(split_of)


def _flush(out: Path, index: dict, pending: dict[str, list[dict]]) -> None:
    for split_name, records in pending.items():
        if not records:
            continue
        number = index["shards"][split_name]
        shard = write_shard(out, split_name, number, records)
        index["shards"][split_name] = number + 1
        for row, rec in enumerate(records):
            index["records"].append({"key": rec["key"], "sample_id": rec["sample_id"], "sequence": rec["sequence"],
                                     "question": rec["question"], "split": split_name, "shard": shard, "row": row,
                                     "n": int(len(rec["target"]))})
        records.clear()
    write_index(out, index)
