"""Load a `-hf` layout Video-LLaVA checkpoint folder with transformers' own classes and build its prefill inputs.

Owns: the Video-LLaVA config and tokenizer checks, its image processor, the `<video>` expansion
(frames × tokens per frame) and (frames, question) → forward kwargs. Shared checkpoint/precision helpers
live in `checkpoint.py`. Never downloads anything (no hub access) and never times anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import (
    VIDEOLLAVA_SKIP_MODULES,
    CheckpointError,
    LoadedModel,
    check_keys,
    check_precision,
    checkpoint_keys,
    freeze,
    place,
    pretrained_kwargs,
    read_config_json,
)
from .prompts import VIDEO_TOKEN, videollava_prompt


def load_videollava(path, *, precision: str = "fp32", device: str = "cpu") -> LoadedModel:
    """Load a `-hf` layout Video-LLaVA folder (LanguageBind/Video-LLaVA-7B-hf) with transformers' own classes."""
    from transformers import AutoTokenizer, VideoLlavaConfig, VideoLlavaForConditionalGeneration
    from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

    path = Path(path).expanduser()
    dtype = check_precision(precision, device)
    raw = read_config_json(path)
    if raw.get("model_type") != "video_llava":
        raise CheckpointError(f"{path}/config.json has model_type {raw.get('model_type')!r}, expected 'video_llava'")
    checkpoint_keys(path)  # fails early, naming the folder, when there are no weight files
    config = VideoLlavaConfig.from_pretrained(str(path))
    kwargs = pretrained_kwargs(precision, device, VIDEOLLAVA_SKIP_MODULES)
    model, info = VideoLlavaForConditionalGeneration.from_pretrained(
        str(path), config=config, output_loading_info=True, **kwargs
    )
    check_keys(path, missing=set(info["missing_keys"]), unexpected=set(info["unexpected_keys"]), what="Video-LLaVA")

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
        model=freeze(place(model, device)), tokenizer=tokenizer, kind="videollava", model_id=str(path), device=str(device),
        dtype=dtype, synthetic=False, image_processor=image_processor,
        weights=str(raw.get("eventspec_weights", "released")),
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
