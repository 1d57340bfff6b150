"""Tiny offline checkpoints in the released layouts, for CPU tests of the real loading code path.

Writes, under one folder: a LLaMA-style tokenizer trained here on a small built-in corpus, a tiny CLIP
vision folder, an EventGPT folder in the released layout (config `EventChat_llama`, released tensor
names, CLIP tower in its own folder named by `mm_visual_tower`) and a Video-LLaVA folder in the `-hf`
layout (legacy tensor names `language_model.model.*`, `video_tower.vision_model.*`, ...).
Never downloads anything; random weights only.

Geometry: vision image_size 56, patch 14 → 4×4 patches + CLS = 17 tokens per image (the real 336/14
gives 577, too slow for CPU tests); language models hidden 64, 2 layers, 4 heads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from workers.inputs.samples import TOP10_QUESTIONS

from .prompts import EV_END_TOKEN, EV_START_TOKEN, EVENT_TOKEN, SYSTEM

TINY_IMAGE_SIZE = 56
TINY_PATCH = 14
TINY_TOKENS_PER_IMAGE = (TINY_IMAGE_SIZE // TINY_PATCH) ** 2 + 1  # 17
# Random init with the usual std 0.02 gives near-uniform logits and the same greedy token everywhere;
# a larger std makes greedy outputs depend on the input.
TINY_INIT_STD = 0.25

_QUESTIONS = list(TOP10_QUESTIONS)
_CORPUS = _QUESTIONS + [
    SYSTEM,
    f"USER: {EV_START_TOKEN}{EVENT_TOKEN}{EV_END_TOKEN} ASSISTANT:",
    "USER: <video> ASSISTANT:",
    "The scene shows a car driving on a road with other vehicles parked on the side.",
    "There are several vehicles, a truck and a bus, moving through the intersection.",
    "The road is wide and straight, with trees, buildings and a sidewalk on the left.",
    "A pedestrian is crossing the street while cars wait at the traffic light.",
    "In this image the key elements are the road, the cars, the sky and the houses.",
    "It is a city street at night; the lights of the vehicles are visible.",
    "The car in front is positioned in the center lane and a van is behind it.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 and words like left right front back near far.",
]


def _train_tokenizer(out_dir: Path):
    """A LLaMA-layout tokenizer: <unk>=0, <s>=1, </s>=2, 256 byte-fallback pieces, then trained BPE pieces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True), pre_tokenizers.Punctuation()]
    )
    corpus = [line.replace("\n", " ") for line in _CORPUS]  # '\n' is left to byte fallback, as in LLaMA
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=1, show_progress=False)
    trainer_tok.train_from_iterator(corpus * 4, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _text_config_kwargs(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=4096,
        initializer_range=TINY_INIT_STD,
        tie_word_embeddings=False,
    )


def _vision_config_kwargs() -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH,
        projection_dim=16,
        hidden_act="quick_gelu",
    )


def _save_tensors(sd: dict[str, torch.Tensor], file: Path) -> None:
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(file), metadata={"format": "pt"})


def _clip_preprocessor_json(size: int) -> dict:
    # Same (old) format as openai/clip-vit-large-patch14-336's preprocessor_config.json.
    return {
        "crop_size": size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": size,
    }


SHARED_ATTENTION_DAMPING = 0.01


def make_tiny(out_dir, *, share_weights: bool = False, seed: int = 0) -> dict:
    """Write the tiny tokenizer, CLIP, EventGPT and Video-LLaVA folders; return their paths."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, VideoLlavaConfig
    from transformers import VideoLlavaForConditionalGeneration
    from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

    from .eventgpt import EventGPTConfig, EventGPTForCausalLM

    out = Path(out_dir)
    paths = {name: out / name for name in ("tokenizer", "clip", "eventgpt", "videollava")}
    for p in paths.values():
        if p.exists():
            shutil.rmtree(p)
        p.mkdir(parents=True)

    tokenizer = _train_tokenizer(paths["tokenizer"])
    base_vocab = len(tokenizer)

    # --- target: Video-LLaVA, -hf layout; <image>/<video> right after the base vocabulary as in the real one
    tokenizer.add_tokens(["<image>", "<video>"], special_tokens=True)
    image_id, video_id = tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    assert (image_id, video_id) == (base_vocab, base_vocab + 1)
    tokenizer.save_pretrained(str(paths["videollava"]))
    vl_config = VideoLlavaConfig(
        vision_config=CLIPVisionConfig(**_vision_config_kwargs()).to_dict(),
        text_config=LlamaConfig(**_text_config_kwargs(base_vocab + 2)).to_dict(),
        image_token_index=image_id,
        video_token_index=video_id,
        image_seq_length=TINY_TOKENS_PER_IMAGE - 1,
        video_seq_length=8 * TINY_TOKENS_PER_IMAGE,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    target = VideoLlavaForConditionalGeneration(vl_config)
    if share_weights:
        # With the same language model but different prompts and visual inputs, two random LMs still
        # disagree everywhere. Damping what attention writes into the residual stream makes the next
        # token depend mostly on the current one, so a draft sharing these weights agrees with the
        # target once both continue from the same committed prefix: a high-acceptance pair for demos.
        with torch.no_grad():
            for name, param in target.named_parameters():
                if name.endswith("self_attn.o_proj.weight"):
                    param.mul_(SHARED_ATTENTION_DAMPING)
    vl_config.save_pretrained(str(paths["videollava"]))
    _save_tensors(_to_hf_legacy_names(target.state_dict()), paths["videollava"] / "model.safetensors")
    VideoLlavaImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    ).save_pretrained(str(paths["videollava"]))
    (paths["videollava"] / "processor_config.json").write_text(
        json.dumps(
            {
                "processor_class": "VideoLlavaProcessor",
                "patch_size": TINY_PATCH,
                "vision_feature_select_strategy": "default",
                "num_additional_image_tokens": 1,
            },
            indent=2,
        )
    )

    # --- CLIP vision folder, hub layout (`vision_model.*` names)
    clip_config = CLIPVisionConfig(**_vision_config_kwargs())
    torch.manual_seed(seed + 1)
    clip = CLIPVisionModel(clip_config)
    clip_config.save_pretrained(str(paths["clip"]))
    _save_tensors({f"vision_model.{k}": v for k, v in clip.state_dict().items()}, paths["clip"] / "model.safetensors")
    (paths["clip"] / "preprocessor_config.json").write_text(json.dumps(_clip_preprocessor_json(TINY_IMAGE_SIZE), indent=2))

    # --- draft: EventGPT, released layout; the CLIP tower lives in ../clip
    eg_config = EventGPTConfig(
        **_text_config_kwargs(base_vocab),
        mm_visual_tower="../clip",
        mm_hidden_size=clip_config.hidden_size,
        event_feature_adaptor=True,
        use_event_qformer=False,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
    )
    torch.manual_seed(seed + 2)
    eg_config.vision_config = {k: getattr(clip_config, k) for k in _vision_config_kwargs()}
    draft = EventGPTForCausalLM(eg_config)
    eg_sd = {k: v for k, v in draft.state_dict().items() if not k.startswith("model.visual_tower.")}
    if share_weights:
        for k, v in target.state_dict().items():
            if k.startswith("model.language_model."):
                name = "model." + k[len("model.language_model.") :]
            elif k == "lm_head.weight":
                name = k
            else:
                continue
            eg_sd[name] = v[:base_vocab].clone() if name in ("model.embed_tokens.weight", "lm_head.weight") else v
    eg_config.vision_config = None  # the released config.json has none; the loader reads it from the CLIP folder
    eg_config.save_pretrained(str(paths["eventgpt"]))
    _save_tensors(eg_sd, paths["eventgpt"] / "model.safetensors")
    tokenizer = _reload_base_tokenizer(paths["tokenizer"])
    tokenizer.save_pretrained(str(paths["eventgpt"]))
    return {name: str(p) for name, p in paths.items()}


def _reload_base_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _to_hf_legacy_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-5 module names → the names stored in LanguageBind/Video-LLaVA-7B-hf."""
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            name = "language_model.lm_head.weight"
        elif k.startswith("model.language_model."):
            name = "language_model.model." + k[len("model.language_model.") :]
        elif k.startswith(("model.video_tower.", "model.image_tower.")):
            tower, rest = k[len("model.") :].split(".", 1)
            name = f"{tower}.vision_model.{rest}"
        elif k.startswith("model.multi_modal_projector."):
            name = k[len("model.") :]
        else:
            raise ValueError(f"unexpected Video-LLaVA tensor name {k}")
        out[name] = v
    return out
