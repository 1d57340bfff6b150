"""Load a released-layout EventGPT checkpoint folder (plus its CLIP tower) and build its prefill inputs.

Owns: the EventGPT config check, where the CLIP ViT-L/14-336 tower's weights come from (the checkpoint or
a CLIP folder), the tokenizer with the event tokens the config asks for, the CLIP image processor, and
(event images, question) → forward kwargs. Shared checkpoint/precision helpers live in `checkpoint.py`.
Never downloads anything (no hub access) and never times anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import (
    EVENTGPT_SKIP_MODULES,
    IGNORABLE_SUFFIXES,
    CheckpointError,
    LoadedModel,
    check_keys,
    check_precision,
    checkpoint_keys,
    freeze,
    place,
    pretrained_kwargs,
    quiet_transformers,
    read_config_json,
    read_state_dict,
)
from .eventgpt import EventGPTConfig, EventGPTForCausalLM
from .prompts import EV_END_TOKEN, EV_PATCH_TOKEN, EV_START_TOKEN, eventgpt_prompt_ids, spliced_length

EVENTGPT_TOWER_PREFIX = "model.visual_tower.visual_tower.vision_model."


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

    raw = read_config_json(clip_dir)
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
    raw = read_config_json(path)
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
    check_keys(path, missing=must_have - stored, unexpected=extra, what="EventGPT")

    kwargs = pretrained_kwargs(precision, device, EVENTGPT_SKIP_MODULES)
    with quiet_transformers():  # its load report would list the tower keys that come from clip_dir below
        model, info = EventGPTForCausalLM.from_pretrained(str(path), config=config, output_loading_info=True, **kwargs)
    missing = set(info["missing_keys"]) - (tower_keys if tower_from_clip else set())
    check_keys(path, missing=missing, unexpected=set(info["unexpected_keys"]), what="EventGPT")

    if tower_from_clip:
        _load_clip_tower(model, clip_dir)
    tokenizer = _eventgpt_tokenizer(path, config)
    image_processor = _clip_image_processor(clip_dir, config.clip_vision_config().image_size)
    return LoadedModel(
        model=freeze(place(model, device)), tokenizer=tokenizer, kind="eventgpt", model_id=str(path), device=str(device),
        dtype=dtype, synthetic=False, image_processor=image_processor,
        weights=str(raw.get("eventspec_weights", "released")),
    )


def _load_clip_tower(model: EventGPTForCausalLM, clip_dir: Path) -> None:
    tower = model.model.visual_tower.visual_tower.vision_model
    sd = read_state_dict(clip_dir, "vision_model.")
    if not sd:  # a CLIPVisionModel saved without the `vision_model.` level
        own = {k.split(".")[0] for k in tower.state_dict()}
        sd = read_state_dict(clip_dir, "")
        sd = {k: v for k, v in sd.items() if k.split(".")[0] in own}
    sd = {k: v for k, v in sd.items() if not k.endswith(IGNORABLE_SUFFIXES)}
    expected = set(tower.state_dict())
    check_keys(clip_dir, missing=expected - set(sd), unexpected=set(sd) - expected, what="CLIP vision")
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
