"""Tiny offline checkpoints in the released layouts: random ones for the loading tests, trained ones for the demo.
Longer than most modules because both checkpoints, the tokenizer and the CLIP stand-in are written in the released layouts from one set of geometry choices.

Writes, under one folder: a LLaMA-style tokenizer trained here on a small built-in corpus, a CLIP vision
folder, an EventGPT folder in the released layout (config `EventChat_llama`, released tensor names, CLIP
tower in its own folder named by `mm_visual_tower`) and a Video-LLaVA folder in the `-hf` layout (legacy
tensor names `language_model.model.*`, `video_tower.vision_model.*`, ...). Never downloads anything.

- random (default): untrained weights, for tests of the loading code path; the answers are noise.
- trained (`trained=True`): the pair trained on make-demo scenes (tiny_train.py), loaded from the weights
  shipped in `tiny_trained/` (or trained again here with `retrain=True`, deterministic, minutes on the CPU).

Each model's config.json gets `eventspec_weights` ("tiny-random" or "tiny-trained"); the workers report it
so that results say which weights ran.

About 390 lines: building, writing and releasing the two kinds of tiny checkpoints share every helper here.

Geometry: vision image_size 56, patch 14 → 4×4 patches + CLS = 17 tokens per image (the real 336/14 gives
577, too slow for CPU tests); random language models hidden 64, trained ones hidden 128, 2 layers.
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
_CAPTION_WORDS = [   # every word of both caption styles (workers/inputs/demo.py), so each is one token
    "The scene shows a large red shape at the top moving over a dark background.",
    "The scene shows a small green shape in the middle moving over a dark background.",
    "The scene shows a large blue shape at the bottom moving over a dark background.",
    "The scene shows a small yellow shape at the top moving over a dark background.",
    "The scene shows a large white shape in the middle moving over a dark background.",
    "The scene shows a big shape at the top passing on a dark background.",
    "The scene shows a little shape at the bottom passing on a dark background.",
]
_CORPUS = _QUESTIONS + _CAPTION_WORDS * 3 + [
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


# (language model, vision tower) sizes of the two kinds of tiny checkpoints
_GEOMETRY = {
    "random": ({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "initializer_range": TINY_INIT_STD},
               {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}),
    "trained": ({"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "initializer_range": 0.02},
                {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}),
}


def _text_config_kwargs(vocab_size: int, kind: str = "random") -> dict:
    return dict(
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        **_GEOMETRY[kind][0],
    )


def _vision_config_kwargs(kind: str = "random") -> dict:
    return dict(
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH,
        projection_dim=16,
        hidden_act="quick_gelu",
        **_GEOMETRY[kind][1],
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
WEIGHTS_FIELD = "eventspec_weights"      # config.json field naming which weights these are
RELEASE_FILES = ("eventgpt.safetensors", "clip.safetensors", "videollava.safetensors")


def build_tiny(kind: str, base_vocab: int, *, seed: int = 0) -> dict:
    """The three tiny models of one kind ("random" | "trained"), randomly initialised from `seed`:
    videollava (VideoLlavaForConditionalGeneration), clip (CLIPVisionModel), eventgpt (EventGPTForCausalLM,
    its tower set to the same shapes as clip) and their configs."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, VideoLlavaConfig
    from transformers import VideoLlavaForConditionalGeneration

    from .eventgpt import EventGPTConfig, EventGPTForCausalLM

    # <image>/<video> right after the base vocabulary, as in the real one
    vl_config = VideoLlavaConfig(
        vision_config=CLIPVisionConfig(**_vision_config_kwargs(kind)).to_dict(),
        text_config=LlamaConfig(**_text_config_kwargs(base_vocab + 2, kind)).to_dict(),
        image_token_index=base_vocab,
        video_token_index=base_vocab + 1,
        image_seq_length=TINY_TOKENS_PER_IMAGE - 1,
        video_seq_length=8 * TINY_TOKENS_PER_IMAGE,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    target = VideoLlavaForConditionalGeneration(vl_config)
    clip_config = CLIPVisionConfig(**_vision_config_kwargs(kind))
    torch.manual_seed(seed + 1)
    clip = CLIPVisionModel(clip_config)
    eg_config = EventGPTConfig(
        **_text_config_kwargs(base_vocab, kind),
        mm_visual_tower="../clip",
        mm_hidden_size=clip_config.hidden_size,
        event_feature_adaptor=True,
        use_event_qformer=False,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
    )
    eg_config.vision_config = {k: getattr(clip_config, k) for k in _vision_config_kwargs(kind)}
    torch.manual_seed(seed + 2)
    draft = EventGPTForCausalLM(eg_config)
    # the draft's tower is the CLIP folder's tower (written there, not in the EventGPT folder)
    draft.model.visual_tower.visual_tower.vision_model.load_state_dict(clip.state_dict())
    return {"videollava": target, "clip": clip, "eventgpt": draft, "clip_config": clip_config}


def make_tiny(out_dir, *, trained: bool = False, retrain: bool = False, share_weights: bool = False,
              seed: int = 0, release_dir=None, settings: dict | None = None, log=None) -> dict:
    """Write the tiny tokenizer, CLIP, EventGPT and Video-LLaVA folders; return their paths.

    trained: the pair trained on make-demo scenes, from the shipped weights (`retrain`: train it here, with
    `settings` (tiny_train.training_settings) and store the result in `release_dir` when given).
    share_weights (random only): the draft's language model copies the target's, with attention damped; a
    random pair whose greedy tokens often agree, for tests. The text is still noise.
    """
    from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

    if share_weights and trained:
        raise ValueError("share_weights applies to random checkpoints only")
    kind = "trained" if trained else "random"
    out = Path(out_dir)
    paths = {name: out / name for name in ("tokenizer", "clip", "eventgpt", "videollava")}
    for p in paths.values():
        if p.exists():
            shutil.rmtree(p)
        p.mkdir(parents=True)

    tokenizer = _train_tokenizer(paths["tokenizer"])
    base_vocab = len(tokenizer)
    vl_tokenizer = _reload_base_tokenizer(paths["tokenizer"])
    vl_tokenizer.add_tokens(["<image>", "<video>"], special_tokens=True)
    assert vl_tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [base_vocab, base_vocab + 1]
    models = build_tiny(kind, base_vocab, seed=seed)
    target, clip, draft, clip_config = models["videollava"], models["clip"], models["eventgpt"], models["clip_config"]
    report = None
    if trained and retrain:
        report = _retrain(models, {"eventgpt": tokenizer, "videollava": vl_tokenizer}, base_vocab, seed, settings, log)
        if release_dir is not None:
            report["manifest"] = write_release(models, tokenizer, release_dir, report)
    elif trained:
        _load_release(models, tokenizer)
    elif share_weights:
        # With the same language model but different prompts and visual inputs, two random LMs still
        # disagree almost everywhere. Damping what attention writes into the residual stream makes the next
        # token depend mostly on the current one, so the two agree more often than independent random ones.
        with torch.no_grad():
            for name, param in target.named_parameters():
                if name.endswith("self_attn.o_proj.weight"):
                    param.mul_(SHARED_ATTENTION_DAMPING)
    label = "tiny-trained" if trained else "tiny-random"

    # --- target: Video-LLaVA, -hf layout
    vl_tokenizer.save_pretrained(str(paths["videollava"]))
    target.config.save_pretrained(str(paths["videollava"]))
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
    clip_config.save_pretrained(str(paths["clip"]))
    _save_tensors({f"vision_model.{k}": v for k, v in clip.state_dict().items()}, paths["clip"] / "model.safetensors")
    (paths["clip"] / "preprocessor_config.json").write_text(json.dumps(_clip_preprocessor_json(TINY_IMAGE_SIZE), indent=2))

    # --- draft: EventGPT, released layout; the CLIP tower lives in ../clip
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
    eg_config = draft.config
    eg_config.vision_config = None  # the released config.json has none; the loader reads it from the CLIP folder
    eg_config.save_pretrained(str(paths["eventgpt"]))
    _save_tensors(eg_sd, paths["eventgpt"] / "model.safetensors")
    _reload_base_tokenizer(paths["tokenizer"]).save_pretrained(str(paths["eventgpt"]))
    for name in ("eventgpt", "videollava"):
        _label_config(paths[name] / "config.json", label)
    result = {name: str(p) for name, p in paths.items()}
    if report is not None:
        result["report"] = report
    return result


def _label_config(path: Path, label: str) -> None:
    config = json.loads(path.read_text())
    config[WEIGHTS_FIELD] = label
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _processors():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

    size = {"shortest_edge": TINY_IMAGE_SIZE}
    crop = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    prep = _clip_preprocessor_json(TINY_IMAGE_SIZE)
    return {"events": CLIPImageProcessorPil(size=size, crop_size=crop, image_mean=prep["image_mean"],
                                            image_std=prep["image_std"], resample=prep["resample"]),
            "video": VideoLlavaImageProcessor(size=size, crop_size=crop)}


def _release_state(models: dict) -> dict:
    return {"eventgpt.safetensors": {k: v for k, v in models["eventgpt"].state_dict().items()
                                     if not k.startswith("model.visual_tower.")},
            "clip.safetensors": models["clip"].state_dict(),
            "videollava.safetensors": models["videollava"].state_dict()}


def _retrain(models: dict, tokenizers: dict, base_vocab: int, seed: int, settings: dict | None, log) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from .tiny_train import train_pair, training_settings

    settings = settings or training_settings()
    torch.manual_seed(seed + 3)
    models["base"] = LlamaForCausalLM(LlamaConfig(**_text_config_kwargs(base_vocab, "trained")))
    report = train_pair(models, tokenizers, _processors(), settings, log=log)
    # the draft's tower was trained inside EventGPT; the CLIP folder holds that tower
    models["clip"].load_state_dict(models["eventgpt"].model.visual_tower.visual_tower.vision_model.state_dict())
    report["settings"] = settings
    return report


def write_release(models: dict, tokenizer, release_dir, report: dict) -> dict:
    """Store trained weights (module names) in `release_dir`, the copy `make_tiny(trained=True)` loads, with a
    manifest: tokenizer fingerprint, file hashes, training settings and time."""
    from .loading import tokenizer_fingerprint
    from .tiny_train import sha256_file

    release_dir = Path(release_dir)
    release_dir.mkdir(parents=True, exist_ok=True)
    for name, sd in _release_state(models).items():
        _save_tensors(sd, release_dir / name)
    manifest = {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "files": {name: sha256_file(release_dir / name) for name in RELEASE_FILES},
                "settings": report.get("settings"), "data_s": round(report.get("data_s", 0), 1),
                "train_s": round(report.get("train_s", 0), 1),
                "final_loss": {k: round(v[-1], 4) for k, v in report.get("curves", {}).items()},
                "command": "coordinator make-tiny DIR --trained --retrain --release DIR"}
    (release_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _load_release(models: dict, tokenizer) -> None:
    from safetensors.torch import load_file

    from .loading import CheckpointError, tokenizer_fingerprint
    from .tiny_train import RELEASE_DIR

    manifest_path = RELEASE_DIR / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: the shipped tiny weights are missing; train them with "
                              "`coordinator make-tiny DIR --trained --retrain`")
    manifest = json.loads(manifest_path.read_text())
    if manifest["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise CheckpointError(f"{RELEASE_DIR}: the shipped weights were trained with another tiny tokenizer than the "
                              "one this code builds; train them again with `coordinator make-tiny DIR --trained "
                              "--retrain`")
    stored = {}
    for name in RELEASE_FILES:
        stored[name] = load_file(str(RELEASE_DIR / name))
    # the file names are the release's: vision tower state from the CLIP file
    models["eventgpt"].load_state_dict(stored["eventgpt.safetensors"], strict=False)
    models["clip"].load_state_dict(stored["clip.safetensors"], strict=True)
    models["videollava"].load_state_dict(stored["videollava.safetensors"], strict=True)
    models["eventgpt"].model.visual_tower.visual_tower.vision_model.load_state_dict(stored["clip.safetensors"])
    missing = set(models["eventgpt"].state_dict()) - set(stored["eventgpt.safetensors"])
    if any(not k.startswith("model.visual_tower.") for k in missing):
        raise CheckpointError(f"{RELEASE_DIR / 'eventgpt.safetensors'}: tensors missing: {sorted(missing)[:5]}")


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
