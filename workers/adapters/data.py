"""The adapter data set on disk: an index JSON plus safetensors shards, one shard family per split.

Layout of a data folder (written by `collect`):

    index.json                    config, split of every DSEC sequence, one entry per record
    train-00000.safetensors ...   records of the train split (val-*, test-* likewise)
    target_head.safetensors       the target's `lm_head` weight and input embedding (hidden adapters)

A record is one (sample, question): the target's greedy answer `target` [n] and, teacher-forced on that
answer, the draft's greedy token `draft` [n] and last-layer hidden state `hidden` [n, H] (float16), where
row t is what the draft offers for answer position t. Splits are by sequence, so no sequence is in two.

Readers: `read_split` reads any split (evaluation); `TrainValData` is the trainer's only way in and refuses
"test" by construction. Never imports torch (the coordinator may read the index).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX = "index.json"
TARGET_HEAD = "target_head.safetensors"
FORMAT = "eventspec-adapter-data"
VERSION = 1
SPLITS = ("train", "val", "test")
TRAINING_SPLITS = ("train", "val")


class DataError(ValueError):
    """An adapter data folder that cannot be used as asked."""


def record_key(sample_id: str, question_index: int) -> str:
    return f"{sample_id}|q{question_index}"


def assign_splits(sequences, *, seed: int, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """sequence -> split. A seeded shuffle of the sorted names; val and test get at least one sequence
    each when there are three or more, so tiny data sets still have all three splits."""
    names = sorted(set(sequences))
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be in [0, 1) "
                        "and leave room for training")
    random.Random(seed).shuffle(names)
    n = len(names)
    n_test = round(test_fraction * n)
    n_val = round(val_fraction * n)
    if n >= 3:
        n_test, n_val = max(1, n_test), max(1, n_val)
    n_test = min(n_test, max(0, n - 1))
    n_val = min(n_val, max(0, n - 1 - n_test))
    split = {}
    for i, name in enumerate(names):
        split[name] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return split


# ---------------------------------------------------------------------------------------------- index
def read_index(data_dir) -> dict:
    path = Path(data_dir) / INDEX
    if not path.is_file():
        raise DataError(f"{path}: not an adapter data folder (no {INDEX}); create one with `coordinator adapter "
                        "collect --out DIR`")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise DataError(f"{path}: format {index.get('format')!r} is not {FORMAT!r}")
    return index


def write_index(data_dir, index: dict) -> None:
    """Atomic: a crash leaves the old index, never half of the new one."""
    path = Path(data_dir) / INDEX
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, path)


def write_shard(data_dir, split: str, number: int, records: list[dict]) -> str:
    """records: dicts with key, target, draft, hidden (numpy). Returns the shard's file name."""
    from safetensors.numpy import save_file

    name = f"{split}-{number:05d}.safetensors"
    tensors = {}
    for i, rec in enumerate(records):
        tensors[f"{i}.target"] = np.asarray(rec["target"], dtype=np.int32)
        tensors[f"{i}.draft"] = np.asarray(rec["draft"], dtype=np.int32)
        tensors[f"{i}.hidden"] = np.ascontiguousarray(rec["hidden"], dtype=np.float16)
    tmp = Path(data_dir) / (name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, Path(data_dir) / name)
    return name


@dataclass
class Record:
    key: str
    sequence: str
    target: np.ndarray            # [n] int32
    draft: np.ndarray             # [n] int32
    hidden: np.ndarray | None     # [n, H] float16, when asked for


def read_split(data_dir, split: str, *, hidden: bool = True) -> list[Record]:
    """Every record of one split, in index order."""
    from safetensors import safe_open

    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    index = read_index(data_dir)
    entries = [e for e in index["records"] if e["split"] == split]
    by_shard: dict[str, list[dict]] = {}
    for e in entries:
        by_shard.setdefault(e["shard"], []).append(e)
    loaded: dict[str, Record] = {}
    for shard, shard_entries in by_shard.items():
        if not shard.startswith(split + "-"):   # shards hold one split only: a test shard is never opened here
            raise DataError(f"{Path(data_dir) / INDEX}: record of split {split} in shard {shard}")
        path = Path(data_dir) / shard
        if not path.is_file():
            raise DataError(f"{path}: shard listed in {INDEX} is missing; re-run `coordinator adapter collect`")
        try:
            with safe_open(str(path), framework="numpy") as f:
                for e in shard_entries:
                    i = e["row"]
                    loaded[e["key"]] = Record(
                        key=e["key"], sequence=e["sequence"], target=f.get_tensor(f"{i}.target"),
                        draft=f.get_tensor(f"{i}.draft"), hidden=f.get_tensor(f"{i}.hidden") if hidden else None)
        except Exception as exc:   # safetensors raises its own error types for damaged files
            raise DataError(f"{path}: cannot read this shard ({exc}); delete the data folder's index entries for "
                            "it or re-collect into a new --out folder") from None
    return [loaded[e["key"]] for e in entries]


def check_training_splits(data_dir) -> dict[str, int]:
    """Records per split from the index alone; a DataError naming the empty training split and the fix."""
    index = read_index(data_dir)
    counts = {s: sum(1 for r in index["records"] if r["split"] == s) for s in SPLITS}
    empty = [s for s in TRAINING_SPLITS if not counts[s]]
    if empty:
        seqs = sorted({seq for seq, split in index.get("splits", {}).items()})
        raise DataError(f"{Path(data_dir) / INDEX}: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} "
                        f"empty ({counts['train']} train, {counts['val']} val, {counts['test']} test records from "
                        f"{len(seqs)} sequences; splits are by sequence). Collect from more sequences into a new "
                        "--out folder (e.g. `coordinator make-demo DIR --sequences 10`, then `adapter collect "
                        "--split-by dataset`), or change --val-fraction.")
    return counts


class TrainValData:
    """The trainer's view of a data folder: train and val only. There is no way to ask it for test."""

    def __init__(self, data_dir):
        self.data_dir = Path(data_dir)
        self.index = read_index(self.data_dir)

    @property
    def config(self) -> dict:
        return self.index["config"]

    def split(self, name: str, *, hidden: bool = True) -> list[Record]:
        if name not in TRAINING_SPLITS:
            raise DataError(f"training reads only {' and '.join(TRAINING_SPLITS)}; {name!r} is not available here "
                            "(the test split is for `coordinator adapter eval`)")
        records = read_split(self.data_dir, name, hidden=hidden)
        if not records:
            raise DataError(f"{self.data_dir}: the {name} split is empty; collect more samples or sequences "
                            "(splits are by DSEC sequence)")
        return records

    def target_head_path(self) -> Path:
        return self.data_dir / TARGET_HEAD
