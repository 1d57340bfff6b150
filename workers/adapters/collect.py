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

import os
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


class ModelPair:
    """Both models loaded in this process, and one sample's records from them. Used by `collect` here and by
    each pipeline of `adapter collect --ray` (coordinator.cluster.collect)."""

    def __init__(self, draft_model, target_model, *, clip_path=None, precision="fp32", device="cpu"):
        from workers.engine.core import TokenEngine
        from workers.engine.hf import HFStepModel
        from workers.models.loading import load_eventgpt, load_videollava

        self.draft = load_eventgpt(draft_model, clip_path=clip_path, precision=precision, device=device)
        self.target = load_videollava(target_model, precision=precision, device=device)
        self.draft_vocab = int(self.draft.model.config.vocab_size)
        target_config = getattr(self.target.model.config, "text_config", self.target.model.config)
        tokenizer = self.target.tokenizer
        self.eos_id = int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 2)
        self.config = {"draft_vocab_size": self.draft_vocab, "target_vocab_size": int(target_config.vocab_size),
                       "draft_hidden_size": int(self.draft.model.config.hidden_size),
                       "target_hidden_size": int(target_config.hidden_size), "eos_id": self.eos_id}
        self.target_engine = TokenEngine(HFStepModel(self.target.model))
        self.draft_step = HFStepModel(self.draft.model, want_hidden=True)

    def write_target_head(self, out: Path) -> None:
        """target_head.safetensors, once (atomic: a partial file never has the final name)."""
        if (out / TARGET_HEAD).is_file():
            return
        from safetensors.torch import save_file

        from workers.models.loading import embed_tokens, lm_head_weight
        tmp = out / f"{TARGET_HEAD}.{os.getpid()}.tmp"
        save_file({"lm_head": lm_head_weight(self.target).detach().cpu().contiguous(),
                   "embed_tokens": embed_tokens(self.target).weight.detach().cpu().contiguous()}, str(tmp))
        tmp.replace(out / TARGET_HEAD)

    def collect_sample(self, sample: dict, questions: list[tuple[int, str]], split_name: str, *,
                       event_frames: int, max_new_tokens: int) -> tuple[list[dict], int]:
        """(records, answers cut at an id the draft cannot read) for one sample and its (index, question)
        pairs. Raises InputError when the sample's inputs cannot be loaded."""
        from workers.inputs import load_sample_inputs
        from workers.models.loading import eventgpt_prefill_inputs, videollava_prefill_inputs

        frames = load_sample_inputs(sample, "target")["video_frames"]
        events = load_sample_inputs(sample, "draft", event_frames=event_frames)["event_images"]
        records, truncated = [], 0
        for q_i, question in questions:
            target_prompt, _ = videollava_prefill_inputs(self.target, frames, question)
            answer = target_answer(self.target_engine, target_prompt, max_new_tokens, self.eos_id)
            if any(t >= self.draft_vocab for t in answer):   # ids the draft cannot read (e.g. <video>): cut there
                answer = answer[: next(i for i, t in enumerate(answer) if t >= self.draft_vocab)]
                truncated += 1
            if answer:
                draft_prompt, _ = eventgpt_prefill_inputs(self.draft, events, question)
                greedy, hidden = teacher_force(self.draft_step, draft_prompt, answer)
                records.append({
                    "key": record_key(sample["sample_id"], q_i), "sample_id": sample["sample_id"],
                    "sequence": sample["sequence"], "question": question, "split": split_name,
                    "target": np.asarray(answer, dtype=np.int32), "draft": greedy, "hidden": hidden})
        return records, truncated


def _new_index(config: dict, split_of: dict[str, str]) -> dict:
    return {"format": FORMAT, "version": VERSION, "config": config, "splits": split_of, "records": [],
            "shards": {s: 0 for s in SPLITS}, "bad": []}


def plan_collection(input_dir, draft_model, target_model, out_dir, *, clip_path=None, max_new_tokens: int = 50,
                    samples: int | None = None, precision: str = "fp32", seed: int = 0,
                    question_set: str = "dataset", event_frames: int = 5, val_fraction: float = 0.1,
                    test_fraction: float = 0.1, split: str | None = None, split_by: str = "sequence",
                    warn=None) -> dict:
    """What is left to collect into `out_dir` (created, or resumed after checking its settings): the index,
    the split of every sequence, the unusable samples, and the to-do list as {sample_id: [(sample, q_i, q)]}.

    split_by "sequence": a seeded shuffle of the sequences (`assign_splits`); "dataset": each sample's split
    label from the dataset index (train / val / test, one label per sequence), e.g. make-demo's. `warn` (a
    callable) hears about empty splits before anything is collected."""
    from workers.inputs import discover_samples

    if split_by not in SPLIT_BY:
        raise DataError(f"--split-by must be one of {', '.join(SPLIT_BY)}, not {split_by!r}")
    if question_set not in QUESTION_SETS:
        raise DataError(f"--question-set must be one of {', '.join(QUESTION_SETS)}, not {question_set!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

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
              "clip_path": str(clip_path) if clip_path else None, "max_new_tokens": max_new_tokens,
              "precision": precision, "question_set": question_set, "event_frames": event_frames, "seed": seed,
              "val_fraction": val_fraction, "test_fraction": test_fraction, "split_by": split_by}
    if (out / INDEX).is_file():
        index = read_index(out)
        _check_resumable(out, index, config, split_of)
    else:
        index = _new_index(config, split_of)

    done = {r["key"] for r in index["records"]}
    by_sample: dict[str, list] = {}
    for s in chosen:
        for q_i, q in enumerate(_questions(s, question_set)):
            if record_key(s["sample_id"], q_i) not in done:
                by_sample.setdefault(s["sample_id"], []).append((s, q_i, q))
    return {"out": out, "index": index, "split_of": split_of, "bad": bad, "by_sample": by_sample}


def summarize(plan: dict, new_records: int, truncated: int) -> dict:
    index, split_of = plan["index"], plan["split_of"]
    counts = {s: sum(1 for r in index["records"] if r["split"] == s) for s in SPLITS}
    positions = {s: sum(r["n"] for r in index["records"] if r["split"] == s) for s in SPLITS}
    return {"out": str(plan["out"]), "records": counts, "positions": positions, "new_records": new_records,
            "bad_samples": len(index["bad"]) + len(plan["bad"]), "truncated_answers": truncated,
            "sequences": {s: sorted(q for q, v in split_of.items() if v == s) for s in SPLITS}}


def collect(input_dir, draft_model, target_model, out_dir, *, clip_path=None, max_new_tokens: int = 50,
            samples: int | None = None, precision: str = "fp32", device: str = "cpu", seed: int = 0,
            question_set: str = "dataset", event_frames: int = 5, val_fraction: float = 0.1,
            test_fraction: float = 0.1, split: str | None = None, split_by: str = "sequence",
            progress: bool = True, warn=None) -> dict:
    """Write (or extend) the data folder `out_dir`; returns a summary dict (see plan_collection)."""
    import torch
    from tqdm import tqdm

    from workers.inputs import InputError

    plan = plan_collection(input_dir, draft_model, target_model, out_dir, clip_path=clip_path,
                           max_new_tokens=max_new_tokens, samples=samples, precision=precision, seed=seed,
                           question_set=question_set, event_frames=event_frames, val_fraction=val_fraction,
                           test_fraction=test_fraction, split=split, split_by=split_by, warn=warn)
    torch.manual_seed(seed)
    out, index, split_of, by_sample = plan["out"], plan["index"], plan["split_of"], plan["by_sample"]
    todo = [item for items in by_sample.values() for item in items]

    pair = ModelPair(draft_model, target_model, clip_path=clip_path, precision=precision, device=device)
    index["config"].update(pair.config)
    pair.write_target_head(out)
    write_index(out, index)

    pending: dict[str, list[dict]] = {s: [] for s in SPLITS}
    bar = tqdm(total=len(todo), unit="answer", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    truncated = 0
    for sample_items in by_sample.values():
        sample = sample_items[0][0]
        try:
            records, cut = pair.collect_sample(sample, [(q_i, q) for _, q_i, q in sample_items],
                                               split_of[sample["sequence"]], event_frames=event_frames,
                                               max_new_tokens=max_new_tokens)
        except InputError as exc:
            index["bad"].append({"sample_id": sample["sample_id"], "error": str(exc)})
            bar.update(len(sample_items))
            continue
        truncated += cut
        pending[split_of[sample["sequence"]]] += records
        bar.update(len(sample_items))
        if sum(len(v) for v in pending.values()) >= 64:
            _flush(out, index, pending)
    _flush(out, index, pending)
    bar.close()
    return summarize(plan, len(todo), truncated)


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
