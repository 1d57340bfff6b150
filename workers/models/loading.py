"""Load EventGPT and Video-LLaVA checkpoints from local folders and build their prefill inputs.

Owns: reading a checkpoint folder (config, weights, tokenizer, image processor), refusing incomplete or
foreign weight files with the offending key names, precision/quantization settings, and turning
(images, question) into forward kwargs. Never downloads anything (no hub access) and never times anything.

Calling contract (both models):
    kwargs, prompt_len = eventgpt_prefill_inputs(lm, images, q)   # or videollava_prefill_inputs
    out = lm.model(**kwargs, past_key_values=cache, use_cache=True)            # prefill
    out = lm.model(input_ids=next_ids, past_key_values=cache, use_cache=True)   # each decode step
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .eventgpt import EventGPTConfig, EventGPTForCausalLM
from .prompts import (
    EV_END_TOKEN,
    EV_PATCH_TOKEN,
    EV_START_TOKEN,
    VIDEO_TOKEN,
    eventgpt_prompt_ids,
    spliced_length,
    videollava_prompt,
)

PRECISIONS = ("nf4", "bf16", "fp16", "fp32")
_DTYPES = {"nf4": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

EVENTGPT_TOWER_PREFIX = "model.visual_tower.visual_tower.vision_model."
# Kept out of 4-bit quantization: vision towers, projectors, adaptor and the output head. Full module
# paths: transformers matches these from the start of a module's name (or as its suffix), not anywhere.
EVENTGPT_SKIP_MODULES = ["model.visual_tower", "model.visual_projector", "model.feature_adaptor", "lm_head"]
VIDEOLLAVA_SKIP_MODULES = ["model.video_tower", "model.image_tower", "model.multi_modal_projector", "lm_head"]
WEIGHTS_FIELD = "eventspec_weights"    # written by make-tiny ("tiny-random" | "tiny-trained"); absent in releases
# Non-persistent buffers that older transformers versions wrote into checkpoints; harmless if present.
_IGNORABLE_SUFFIXES = (".position_ids", "rotary_emb.inv_freq")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used as is (missing/unexpected tensors, bad config)."""


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
    return _DTYPES[precision]


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


def _pretrained_kwargs(precision: str, device: str, skip_modules: list[str]) -> dict:
    """from_pretrained kwargs; the weights go straight to `device` where accelerate allows it
    (a device_map needs accelerate; without it `_place` moves the loaded model)."""
    from transformers.utils import is_accelerate_available

    kwargs: dict = {"dtype": _DTYPES[precision]}
    if str(device) != "cpu" and (precision == "nf4" or is_accelerate_available()):
        kwargs["device_map"] = {"": str(device)}
    if precision == "nf4":
        kwargs["quantization_config"] = nf4_config(skip_modules)
    return kwargs


def _place(model: nn.Module, device: str) -> nn.Module:
    if getattr(model, "hf_device_map", None) is None and getattr(model, "quantization_method", None) is None:
        model.to(device)
    return model


# ----------------------------------------------------------------------------- weight files


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


def _read_state_dict(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
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


def _check_keys(folder: Path, *, missing, unexpected, what: str) -> None:
    unexpected = {k for k in unexpected if not k.endswith(_IGNORABLE_SUFFIXES)}
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


def _read_config_json(folder: Path) -> dict:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} not found: pass the checkpoint folder that holds config.json")
    return json.loads(cfg_file.read_text())


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- EventGPT


def _resolve_clip_dir(ckpt: Path, config: EventGPTConfig, clip_path) -> Path | None:
    if clip_path is not None:
        p = Path(clip_path).expanduser()
        if not p.is_dir():
            raise CheckpointError(f"clip_path {clip_path} is not a folder: point it at the CLIP ViT-L/14-336 folder")
        return p
    name = config.mm_visual_tower
    if not name:
        return None
    for candidate in (ckpt / name, Path(name).expanduser()):
        if candidate.is_dir():
            return candidate
    return None


def _clip_image_processor(clip_dir: Path | None, image_size: int):
    # The PIL backend gives the same numbers on every machine (the default backend needs torchvision).
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if clip_dir is not None and (clip_dir / "preprocessor_config.json").is_file():
        return CLIPImageProcessorPil.from_pretrained(str(clip_dir))
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def _vision_config_dict(clip_dir: Path) -> dict:
    from transformers import CLIPVisionConfig

    raw = _read_config_json(clip_dir)
    vision = raw.get("vision_config", raw)  # a full CLIP folder nests the tower's config
    fields = CLIPVisionConfig().to_dict()
    return {k: v for k, v in vision.items() if k in fields and k not in ("model_type", "transformers_version")}


def _eventgpt_tokenizer(path: Path, config: EventGPTConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    wanted = []
    if config.mm_use_im_patch_token:
        wanted.append(EV_PATCH_TOKEN)
    if config.mm_use_im_start_end:
        wanted += [EV_START_TOKEN, EV_END_TOKEN]
    missing = [t for t in wanted if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {len(tokenizer)} tokens (with {wanted or 'no'} added per the config) but the "
            f"model's vocab_size is {config.vocab_size}: the tokenizer files do not belong to this checkpoint"
        )
    return tokenizer


def load_eventgpt(path, *, clip_path=None, precision: str = "fp32", device: str = "cpu") -> LoadedModel:
    """Load a released-layout EventGPT folder; the CLIP tower comes from the checkpoint's own weights or,
    when they are absent (or `clip_path` is given), from the CLIP folder named by `mm_visual_tower`."""
    path = Path(path).expanduser()
    dtype = check_precision(precision, device)
    raw = _read_config_json(path)
    if raw.get("model_type") != "EventChat_llama":
        raise CheckpointError(f"{path}/config.json has model_type {raw.get('model_type')!r}, expected 'EventChat_llama'")
    config = EventGPTConfig.from_pretrained(str(path))  # refuses use_event_qformer

    stored = checkpoint_keys(path)
    tower_in_ckpt = any(k.startswith(EVENTGPT_TOWER_PREFIX) for k in stored)
    clip_dir = _resolve_clip_dir(path, config, clip_path)
    tower_from_clip = clip_path is not None or not tower_in_ckpt
    if tower_from_clip and clip_dir is None:
        raise CheckpointError(
            f"{path}: the CLIP tower weights are not in the checkpoint and mm_visual_tower="
            f"{config.mm_visual_tower!r} is not a local folder (no hub access here): pass clip_path=<folder with "
            "the CLIP ViT-L/14-336 weights, config.json and preprocessor_config.json>"
        )
    if clip_dir is not None:
        config.vision_config = _vision_config_dict(clip_dir)

    with torch.device("meta"):
        expected = set(EventGPTForCausalLM(config).state_dict())
    tower_keys = {k for k in expected if k.startswith(EVENTGPT_TOWER_PREFIX)}
    must_have = expected - tower_keys if tower_from_clip else expected
    extra = stored - expected
    if tower_from_clip:
        extra -= {k for k in stored if k.startswith(EVENTGPT_TOWER_PREFIX)}  # overridden by clip_path
    _check_keys(path, missing=must_have - stored, unexpected=extra, what="EventGPT")

    kwargs = _pretrained_kwargs(precision, device, EVENTGPT_SKIP_MODULES)
    with _quiet_transformers():  # its load report would list the tower keys that come from clip_dir below
        model, info = EventGPTForCausalLM.from_pretrained(str(path), config=config, output_loading_info=True, **kwargs)
    missing = set(info["missing_keys"]) - (tower_keys if tower_from_clip else set())
    _check_keys(path, missing=missing, unexpected=set(info["unexpected_keys"]), what="EventGPT")

    if tower_from_clip:
        _load_clip_tower(model, clip_dir)
    tokenizer = _eventgpt_tokenizer(path, config)
    image_processor = _clip_image_processor(clip_dir, config.clip_vision_config().image_size)
    return LoadedModel(
        model=_freeze(_place(model, device)), tokenizer=tokenizer, kind="eventgpt", model_id=str(path), device=str(device),
        dtype=dtype, synthetic=False, image_processor=image_processor, weights=str(raw.get(WEIGHTS_FIELD, "released")),
    )


def _load_clip_tower(model: EventGPTForCausalLM, clip_dir: Path) -> None:
    tower = model.model.visual_tower.visual_tower.vision_model
    sd = _read_state_dict(clip_dir, "vision_model.")
    if not sd:  # a CLIPVisionModel saved without the `vision_model.` level
        own = {k.split(".")[0] for k in tower.state_dict()}
        sd = _read_state_dict(clip_dir, "")
        sd = {k: v for k, v in sd.items() if k.split(".")[0] in own}
    sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORABLE_SUFFIXES)}
    expected = set(tower.state_dict())
    _check_keys(clip_dir, missing=expected - set(sd), unexpected=set(sd) - expected, what="CLIP vision")
    ref = next(tower.parameters())
    tower.load_state_dict({k: v.to(device=ref.device, dtype=ref.dtype) for k, v in sd.items()}, strict=True)


def eventgpt_prefill_inputs(lm: LoadedModel, event_images: list[np.ndarray], question: str) -> tuple[dict, int]:
    """Forward kwargs for the EventGPT prefill and the prompt length it leaves in the KV cache.

    The kwargs hold the prompt ids with one -200 placeholder and the processed event images; the model
    runs the CLIP tower and the splice inside its forward, so they count as prefill work.
    """
    if not event_images:
        raise ValueError("eventgpt_prefill_inputs needs at least one event image")
    pixels = lm.image_processor(images=[np.asarray(im) for im in event_images], return_tensors="pt")["pixel_values"]
    ids = eventgpt_prompt_ids(lm.tokenizer, question)
    vision = lm.model.config.clip_vision_config()
    n_event = len(event_images) + (vision.image_size // vision.patch_size) ** 2 + 1
    kwargs = {
        "input_ids": torch.tensor([ids], dtype=torch.long, device=lm.device),
        # under nf4 the vision parts stay unquantized in the compute dtype (lm.dtype)
        "event_pixel_values": pixels.to(device=lm.device, dtype=lm.dtype),
    }
    return kwargs, spliced_length(ids, n_event)


# ----------------------------------------------------------------------------- Video-LLaVA


def load_videollava(path, *, precision: str = "fp32", device: str = "cpu") -> LoadedModel:
    """Load a `-hf` layout Video-LLaVA folder (LanguageBind/Video-LLaVA-7B-hf) with transformers' own classes."""
    from transformers import AutoTokenizer, VideoLlavaConfig, VideoLlavaForConditionalGeneration
    from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

    path = Path(path).expanduser()
    dtype = check_precision(precision, device)
    raw = _read_config_json(path)
    if raw.get("model_type") != "video_llava":
        raise CheckpointError(f"{path}/config.json has model_type {raw.get('model_type')!r}, expected 'video_llava'")
    checkpoint_keys(path)  # fails early, naming the folder, when there are no weight files
    config = VideoLlavaConfig.from_pretrained(str(path))
    kwargs = _pretrained_kwargs(precision, device, VIDEOLLAVA_SKIP_MODULES)
    model, info = VideoLlavaForConditionalGeneration.from_pretrained(
        str(path), config=config, output_loading_info=True, **kwargs
    )
    _check_keys(path, missing=set(info["missing_keys"]), unexpected=set(info["unexpected_keys"]), what="Video-LLaVA")

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    video_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    if video_id != config.video_token_index:
        raise CheckpointError(
            f"{path}: tokenizer maps {VIDEO_TOKEN} to {video_id} but config.video_token_index is "
            f"{config.video_token_index}: the tokenizer files do not belong to this checkpoint"
        )
    if (path / "preprocessor_config.json").is_file():
        image_processor = VideoLlavaImageProcessor.from_pretrained(str(path))
    else:
        size = config.vision_config.image_size
        image_processor = VideoLlavaImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    return LoadedModel(
        model=_freeze(_place(model, device)), tokenizer=tokenizer, kind="videollava", model_id=str(path), device=str(device),
        dtype=dtype, synthetic=False, image_processor=image_processor, weights=str(raw.get(WEIGHTS_FIELD, "released")),
    )


def video_tokens_per_frame(config) -> int:
    """Video-LLaVA keeps every patch token plus CLS for video frames: 16×16+1 = 257 at 224 px."""
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2 + 1


def videollava_prompt_ids(tokenizer, config, question: str, n_frames: int) -> torch.Tensor:
    """The prompt with `<video>` expanded to n_frames × tokens-per-frame ids, as VideoLlavaProcessor does."""
    n_video = n_frames * video_tokens_per_frame(config)
    text = videollava_prompt(question).replace(VIDEO_TOKEN, VIDEO_TOKEN * n_video)
    ids = torch.tensor([tokenizer.encode(text)], dtype=torch.long)
    got = int((ids == config.video_token_index).sum())
    if got != n_video:
        raise ValueError(f"the tokenizer produced {got} {VIDEO_TOKEN} ids, expected {n_video}")
    return ids


def videollava_prefill_inputs(lm: LoadedModel, frames: np.ndarray, question: str) -> tuple[dict, int]:
    """frames: [n, H, W, 3] uint8 (n = 8 for the released model) → forward kwargs and prompt length."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [n, H, W, 3] uint8, got shape {frames.shape}")
    processed = lm.image_processor(images=list(frames), return_tensors="pt")
    # transformers < 5.23 names the output pixel_values_images, later versions pixel_values
    pixels = processed["pixel_values"] if "pixel_values" in processed else processed["pixel_values_images"]
    ids = videollava_prompt_ids(lm.tokenizer, lm.model.config, question, len(frames)).to(lm.device)
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": pixels.unsqueeze(0).to(device=lm.device, dtype=lm.dtype),
    }
    return kwargs, ids.shape[1]


# ----------------------------------------------------------------------------- shared helpers


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


__all__ = [
    "CheckpointError",
    "LoadedModel",
    "PRECISIONS",
    "check_precision",
    "checkpoint_keys",
    "embed_tokens",
    "eventgpt_prefill_inputs",
    "lm_head_weight",
    "load_eventgpt",
    "load_videollava",
    "nf4_config",
    "tokenizer_fingerprint",
    "videollava_prefill_inputs",
    "videollava_prompt_ids",
    "video_tokens_per_frame",
]
