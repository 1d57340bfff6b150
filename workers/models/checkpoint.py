"""What both model loaders share: the `LoadedModel` record, precision and NF4 settings, and reading and
checking a checkpoint folder's config and weight files.

Owns: precision names → dtypes, the reference 4-bit config, from_pretrained placement kwargs, listing and
reading tensors from safetensors / pytorch .bin files, refusing missing or foreign tensors with their names,
and small accessors on a LoadedModel (tokenizer fingerprint, embeddings, output head). Knows nothing about
either architecture (`eventgpt_loading.py`, `videollava_loading.py` do). Never downloads, never times.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

PRECISIONS = ("nf4", "bf16", "fp16", "fp32")
DTYPES = {"nf4": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Kept out of 4-bit quantization: vision towers, projectors, adaptor and the output head. Full module
# paths: transformers matches these from the start of a module's name (or as its suffix), not anywhere.
EVENTGPT_SKIP_MODULES = ["model.visual_tower", "model.visual_projector", "model.feature_adaptor", "lm_head"]
VIDEOLLAVA_SKIP_MODULES = ["model.video_tower", "model.image_tower", "model.multi_modal_projector", "lm_head"]
# Non-persistent buffers that older transformers versions wrote into checkpoints; harmless if present.
IGNORABLE_SUFFIXES = (".position_ids", "rotary_emb.inv_freq")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used as is (missing/unexpected tensors, bad config)."""


WEIGHTS_FIELD = "eventspec_weights"    # written by make-tiny ("tiny-random" | "tiny-trained"); absent in releases


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    kind: str  # "eventgpt" | "videollava"
    model_id: str
    device: str
    dtype: torch.dtype
    synthetic: bool = False
    image_processor: Any = None
    weights: str = "released"   # which weights: "released" (a checkpoint folder), or the label make-tiny wrote

    @property
    def processor(self) -> Any:
        return self.image_processor


# ----------------------------------------------------------------------------- precision


def check_precision(precision: str, device: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "nf4" and not str(device).startswith("cuda"):
        raise ValueError(
            f"precision 'nf4' needs a CUDA device (bitsandbytes 4-bit); got device={device!r}. "
            "Use bf16 or fp32 on the CPU."
        )
    return DTYPES[precision]


def nf4_config(skip_modules: list[str]):
    """The reference 4-bit setting (DOMAIN.md), vision parts and lm_head kept in bf16."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=list(skip_modules),
    )


def pretrained_kwargs(precision: str, device: str, skip_modules: list[str]) -> dict:
    """from_pretrained kwargs; the weights go straight to `device` where accelerate allows it
    (a device_map needs accelerate; without it `place` moves the loaded model)."""
    from transformers.utils import is_accelerate_available

    kwargs: dict = {"dtype": DTYPES[precision]}
    if str(device) != "cpu" and (precision == "nf4" or is_accelerate_available()):
        kwargs["device_map"] = {"": str(device)}
    if precision == "nf4":
        kwargs["quantization_config"] = nf4_config(skip_modules)
    return kwargs


def place(model: nn.Module, device: str) -> nn.Module:
    if getattr(model, "hf_device_map", None) is None and getattr(model, "quantization_method", None) is None:
        model.to(device)
    return model


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# ----------------------------------------------------------------------------- config and weight files


def read_config_json(folder: Path) -> dict:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} not found: pass the checkpoint folder that holds config.json")
    return json.loads(cfg_file.read_text())


def _weight_files(folder: Path) -> list[Path]:
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return st
    return sorted(folder.glob("pytorch_model*.bin"))


def checkpoint_keys(folder: Path) -> set[str]:
    """Tensor names stored in a folder's weight files (safetensors, or pytorch .bin as a fallback)."""
    files = _weight_files(folder)
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors or pytorch_model*.bin weight files found")
    keys: set[str] = set()
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                keys.update(sf.keys())
        else:
            keys.update(torch.load(f, map_location="meta", weights_only=True, mmap=True).keys())
    return keys


def read_state_dict(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors whose name starts with `prefix`, with the prefix removed."""
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    if k.startswith(prefix):
                        out[k[len(prefix) :]] = sf.get_tensor(k)
        else:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            out.update({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)})
    return out


def _fmt_keys(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:20])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")


def check_keys(folder: Path, *, missing, unexpected, what: str) -> None:
    """Raise CheckpointError naming the missing and unexpected tensors (ignorable buffers excepted)."""
    unexpected = {k for k in unexpected if not k.endswith(IGNORABLE_SUFFIXES)}
    problems = []
    if missing:
        problems.append(f"missing tensors: {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_fmt_keys(unexpected)}")
    if problems:
        raise CheckpointError(
            f"{folder}: the {what} weight files do not match the model: " + "; ".join(problems)
            + ". Re-download or re-convert the checkpoint (and check it is the right model)."
        )


# ----------------------------------------------------------------------------- accessors


def tokenizer_fingerprint(tokenizer, limit: int = 32000) -> str:
    """sha256 over the token strings of ids < min(limit, base vocabulary size).

    Token strings rather than `decode` output: decoding one id strips LLaMA's leading '▁', which would
    make '▁the' and 'the' look the same. Added tokens (`<video>`, `<ev_start>`, ...) lie above the base
    vocabulary and are not part of the fingerprint.
    """
    n = min(int(limit), int(tokenizer.vocab_size))
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    h = hashlib.sha256()
    for i, piece in enumerate(pieces):
        h.update(f"{i}\t{piece}\n".encode("utf-8"))
    return h.hexdigest()


def embed_tokens(lm: LoadedModel) -> nn.Embedding:
    return lm.model.get_input_embeddings()


def lm_head_weight(lm: LoadedModel) -> torch.Tensor:
    return lm.model.get_output_embeddings().weight
