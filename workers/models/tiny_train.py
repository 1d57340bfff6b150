"""Train the tiny EventGPT / Video-LLaVA pair on make-demo's synthetic scenes, deterministically, on the CPU.
Longer than most modules because the scene generator, both caption styles and the two training stages must agree with each other and change together.

The world: one coloured shape, small or large, moves through one of three rows over a dark background
(workers/inputs/demo.py). Both models answer every question with a caption of the scene, in their own style
(`demo.describe`):

    Video-LLaVA (8 video frames):  "The scene shows a large red shape at the top moving over a dark background."
    EventGPT (5 event images):     "The scene shows a big shape at the top passing on a dark background."

Events carry no colour, and the two styles differ in a few words, as two separately trained models would; so
the draft agrees with the target often but not always, and a draft-to-target adapter has something to learn
(the word choices; not the colour, which the draft cannot see).

Training, as for the 7B models: one base language model learns the captions of both styles as plain text
(Vicuna's part: both 7B models start from it); each vision path (CLIP tower, projector) first learns to see
what its captions name through a linear probe on the mean of its visual tokens (the pretrained CLIP's part:
from scratch, the caption loss alone leaves a tiny model on the language prior for a long time); then each
multimodal model learns, with all its weights, to caption its own input in its own style. Scenes come from seeds disjoint from
make-demo's (so every demo clip is held out). Fixed seeds, one thread, deterministic algorithms: the same
machine gives the same weights bit for bit.

`train_pair()` returns the three state dicts (EventGPT, its CLIP tower, Video-LLaVA); `coordinator make-tiny
--trained --retrain` runs it and `write_release()` stores the result where `make-tiny --trained` finds it.
`greedy_captions` / `caption_agreement` measure how well each trained model reads its input. About 340 lines:
the data, the three training stages and their evaluation are one recipe.
Never used at inference time; never reads or writes anything outside the folders it is given.
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from workers.inputs.demo import _COLOURS, simulate_clips
from workers.inputs.events import Events
from workers.inputs.render import render_event_images
from workers.inputs.samples import TOP10_QUESTIONS
from workers.inputs.video import sample_frame_indices

from .prompts import EVENT_PLACEHOLDER_ID, eventgpt_prompt_ids

SCENE_SEED = 1_000_003          # make-demo uses small seeds (0, 3, 5, ...): these scenes are never demo clips
RELEASE_DIR = Path(__file__).with_name("tiny_trained")
IGNORE = -100
_COLOUR_NAMES = list(_COLOURS)
# what each model's vision path is first taught to see (events carry no colour): colour, size, row
_SEES = {"eventgpt": (1, 2), "videollava": (0, 1, 2)}
_CLASSES = (len(_COLOURS), 2, 3)


def training_settings(quick: bool = False) -> dict:
    """Every knob of the run (written into the release manifest)."""
    if quick:    # tests: the code path and determinism, not the quality
        return {"scenes": 24, "base_steps": 3, "vision_steps": 3, "steps": 3, "batch": 8, "lr": 3e-3, "base_lr": 3e-3,
                "vision_lr": 3e-3, "seed": 0}
    return {"scenes": 1000, "base_steps": 100, "vision_steps": 300, "steps": 400, "batch": 24, "lr": 3e-3,
            "base_lr": 3e-3, "vision_lr": 3e-3, "seed": 0}


# ---------------------------------------------------------------------------------------------- data
def make_scenes(n: int, seed: int, processors: dict) -> dict:
    """n one-clip scenes as model inputs: event pixels [n,5,3,S,S], video pixels [n,8,3,S,S], captions."""
    rng = np.random.default_rng([SCENE_SEED, seed])
    events_px, video_px, captions, labels = [], [], {"video": [], "events": []}, []
    for _ in range(n):
        clip = simulate_clips(rng, 1)["clips"][0]
        ev = clip["events"]
        images = render_event_images(Events(ev["x"], ev["y"], ev["t"], ev["p"].astype(np.uint8)), 5)
        events_px.append(processors["events"](images=images, return_tensors="pt")["pixel_values"])
        frames = clip["frames"][sample_frame_indices(len(clip["frames"]), 8)]
        out = processors["video"](images=list(frames), return_tensors="pt")
        video_px.append(out["pixel_values"] if "pixel_values" in out else out["pixel_values_images"])
        for style in captions:
            captions[style].append(clip["captions"][style])
        labels.append(scene_labels(clip["objects"]))
    return {"events": torch.stack(events_px), "video": torch.stack(video_px), "captions": captions,
            "labels": torch.tensor(np.array(labels), dtype=torch.long)}


def scene_labels(objects: list[dict]) -> np.ndarray:
    """[colour, size, row] of the scene's shape."""
    o = objects[0]
    return np.array([_COLOUR_NAMES.index(o["colour"]), o["size"] == "large", o["row"]], np.int64)


def _answer_ids(tokenizer, caption: str) -> list[int]:
    return list(tokenizer.encode(caption, add_special_tokens=False)) + [tokenizer.eos_token_id]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    n = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (n - len(r)) for r in rows], dtype=torch.long)


# ---------------------------------------------------------------------------------------------- losses
def _base_lm_loss(lm, tokenizer, captions: list[str]) -> torch.Tensor:
    rows = [[tokenizer.bos_token_id] + _answer_ids(tokenizer, c) for c in captions]
    ids = _pad(rows, 0)
    mask = _pad([[1] * len(r) for r in rows], 0)
    labels = ids.masked_fill(mask == 0, IGNORE)
    return lm(input_ids=ids, attention_mask=mask, labels=labels).loss


def _event_embeds(model, pixels: torch.Tensor) -> torch.Tensor:
    """[B, t, 3, S, S] -> [B, t + N, H]: EventGPTModel.encode_events, batched."""
    m = model.model
    b, t = pixels.shape[:2]
    feats = m.visual_projector(m.visual_tower(pixels.flatten(0, 1)))
    feats = m.feature_adaptor(feats).view(b, t, -1, feats.shape[-1])
    return torch.cat([feats.mean(dim=2), feats.mean(dim=1)], dim=1)


def _video_embeds(model, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 8, 3, S, S] -> [B, 8 * N, H]: the projected video features the language model reads."""
    feats = model.model.get_video_features(pixel_values_videos=pixels).pooler_output
    return feats.reshape(pixels.shape[0], -1, feats.shape[-1])


def _aux_loss(head, feats: torch.Tensor, labels: torch.Tensor, fields, pooled: bool) -> torch.Tensor:
    """Cross-entropy of a linear probe for each field the model can see, on the mean of the visual tokens
    (pooled: what a language model attending evenly reads) or on all of them (event images split into
    chunks of equal event count look alike on average: only where their marks are tells scenes apart)."""
    logits = head(feats.mean(dim=1) if pooled else feats.flatten(1))
    loss, at = 0.0, 0
    for f in fields:
        n = _CLASSES[f]
        loss = loss + F.cross_entropy(logits[:, at: at + n], labels[:, f])
        at += n
    return loss


def _eventgpt_loss(model, tokenizer, pixels: torch.Tensor, questions: list[str], captions: list[str]):
    """Teacher-forced caption loss; the event splice of EventGPTForCausalLM.forward, batched."""
    m = model.model
    b = pixels.shape[0]
    event_embeds = _event_embeds(model, pixels)
    embeds, labels = [], []
    for i in range(b):
        ids = eventgpt_prompt_ids(tokenizer, questions[i])
        at = ids.index(EVENT_PLACEHOLDER_ID)
        answer = _answer_ids(tokenizer, captions[i])
        before = m.embed_tokens(torch.tensor(ids[:at]))
        after = m.embed_tokens(torch.tensor(ids[at + 1:] + answer))
        embeds.append(torch.cat([before, event_embeds[i], after]))
        n_prompt = at + event_embeds.shape[1] + len(ids) - at - 1
        labels.append([IGNORE] * n_prompt + answer)
    n = max(e.shape[0] for e in embeds)
    mask = torch.zeros(b, n, dtype=torch.long)
    padded = torch.zeros(b, n, embeds[0].shape[-1])
    for i, e in enumerate(embeds):
        padded[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = 1
    return model(inputs_embeds=padded, attention_mask=mask, labels=_pad(labels, IGNORE)).loss


def _videollava_loss(model, tokenizer, pixels: torch.Tensor, questions: list[str], captions: list[str]):
    from .loading import videollava_prompt_ids

    rows, labels = [], []
    for q, c in zip(questions, captions):
        prompt = videollava_prompt_ids(tokenizer, model.config, q, pixels.shape[1])[0].tolist()
        answer = _answer_ids(tokenizer, c)
        rows.append(prompt + answer)
        labels.append([IGNORE] * len(prompt) + answer)
    ids = _pad(rows, 0)
    mask = _pad([[1] * len(r) for r in rows], 0)
    return model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, labels=_pad(labels, IGNORE)).loss


# ---------------------------------------------------------------------------------------------- loop
def _lr(step: int, total: int, lr: float) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _fit(params, loss_fn, steps: int, lr: float, n_items: int, batch: int, seed: int, label: str, log) -> list:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order_gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    for step in range(steps):
        if len(order) < batch:
            order += torch.randperm(n_items, generator=order_gen).tolist()
        idx, order = order[:batch], order[batch:]
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        loss = loss_fn(idx, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"{label} step {step + 1}/{steps} loss {losses[-1]:.4f}")
    return losses


def train_pair(models: dict, tokenizers: dict, processors: dict, settings: dict, log=None) -> dict:
    """Train models["base"] (LlamaForCausalLM), then models["eventgpt"] and models["videollava"] in place.

    tokenizers: {"eventgpt": the base tokenizer, "videollava": the same with <image>/<video> added}.
    Returns the loss curves and timings. The caller builds the models (tiny.py) so that their shapes are
    exactly those written to disk.
    """
    torch.manual_seed(settings["seed"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        t0 = time.monotonic_ns()
        data = make_scenes(settings["scenes"], settings["seed"], processors)
        t_data = time.monotonic_ns()
        q_rng = np.random.default_rng([SCENE_SEED, settings["seed"], 1])
        n = settings["scenes"]
        batch = settings["batch"]
        total_steps = settings["base_steps"] + settings["steps"]
        questions = [[str(q) for q in q_rng.choice(TOP10_QUESTIONS, batch)] for _ in range(total_steps)]

        base = models["base"].train()
        both = data["captions"]["video"] + data["captions"]["events"]
        base_losses = _fit(list(base.parameters()),
                           lambda idx, step: _base_lm_loss(base, tokenizers["eventgpt"], [both[i] for i in idx]),
                           settings["base_steps"], settings["base_lr"], len(both), batch, settings["seed"],
                           "base LM", log)
        _copy_base(base, models["eventgpt"], models["videollava"])
        curves = {"base": base_losses}
        # the vision paths first learn to see (a linear probe over the visual tokens, dropped afterwards): the
        # caption loss alone leaves a tiny model on the language prior for a long time
        # event images (chunks of equal event count) look alike on average: their probe first reads every token
        # (where the marks are), then the mean; the video frames' probe reads the mean from the start
        for name, embed_fn, stages in (("eventgpt", _event_embeds, (False, True)), ("videollava", _video_embeds, (True,))):
            model = models[name].train()
            px = data["events" if name == "eventgpt" else "video"]
            for pooled in stages:
                with torch.no_grad():
                    sample = embed_fn(model, px[:1])
                head = torch.nn.Linear(sample.shape[-1] if pooled else sample.numel(),
                                       sum(_CLASSES[f] for f in _SEES[name]))
                steps = settings["vision_steps"] // (2 if len(stages) > 1 and not pooled else 1)
                curves[f"{name}_vision{'_pooled' if pooled else ''}"] = _fit(
                    list(model.parameters()) + list(head.parameters()),
                    lambda idx, step, model=model, head=head, px=px, embed_fn=embed_fn, name=name, pooled=pooled: _aux_loss(
                        head, embed_fn(model, px[idx]), data["labels"][idx], _SEES[name], pooled),
                    steps, settings["vision_lr"], n, batch, settings["seed"] + 2, f"{name} vision", log)
        for name, loss in (("eventgpt", _eventgpt_loss), ("videollava", _videollava_loss)):
            model = models[name].train()
            key = "events" if name == "eventgpt" else "video"
            caps = data["captions"][key]
            px = data[key]
            curves[name] = _fit(
                [p for p in model.parameters() if p.requires_grad],
                lambda idx, step, model=model, loss=loss, caps=caps, px=px, tok=tokenizers[name]: loss(
                    model, tok, px[idx], questions[settings["base_steps"] + step][: len(idx)],
                    [caps[i] for i in idx]),
                settings["steps"], settings["lr"], n, batch, settings["seed"] + 1, name, log)
            model.eval()
        t_end = time.monotonic_ns()
        return {"curves": curves, "data_s": (t_data - t0) / 1e9, "train_s": (t_end - t_data) / 1e9}
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)


def _copy_base(base, eventgpt, videollava) -> None:
    """Both multimodal models start from the base language model (rows beyond its vocabulary stay random)."""
    sd = base.state_dict()
    with torch.no_grad():
        eg = eventgpt.state_dict()
        for k, v in sd.items():
            name = k      # LlamaForCausalLM and EventGPT share these names
            eg[name].copy_(v)
        vl = videollava.state_dict()
        for k, v in sd.items():
            name = "lm_head.weight" if k == "lm_head.weight" else "model.language_model." + k[len("model."):]
            vl[name][: v.shape[0]].copy_(v)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stderr_log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


__all__ = ["RELEASE_DIR", "SCENE_SEED", "make_scenes", "sha256_file", "train_pair", "training_settings"]



def greedy_captions(models_dir, dataset_dir, *, split: str | None = None, max_new_tokens: int = 24) -> list[dict]:
    """Each model's own greedy answer on the demo clips of `dataset_dir` next to the scene's captions in both
    styles (make-demo's index): how well each tiny model reads its input."""
    import json

    from workers.engine.core import TokenEngine
    from workers.engine.hf import HFStepModel
    from workers.inputs import discover_samples, load_sample_inputs

    from .loading import eventgpt_prefill_inputs, load_eventgpt, load_videollava, videollava_prefill_inputs

    models_dir = Path(models_dir)
    draft = load_eventgpt(models_dir / "eventgpt")
    target = load_videollava(models_dir / "videollava")
    index = {e["id"]: e for e in json.loads((Path(dataset_dir) / "EventGPT_Instruction_Subset.json").read_text())}
    out = []
    for sample in discover_samples(dataset_dir, split=split)[0]:
        row = {"sample_id": sample["sample_id"], "question": sample["question"],
               "reference": index[sample["sample_id"]].get("captions", {})}
        for name, lm, role, build in (("events", draft, "draft", eventgpt_prefill_inputs),
                                      ("video", target, "target", videollava_prefill_inputs)):
            inputs = load_sample_inputs(sample, role)
            prompt, _ = build(lm, inputs["event_images" if role == "draft" else "video_frames"], sample["question"])
            engine = TokenEngine(HFStepModel(lm.model))
            ids = [engine.start(prompt)]
            while len(ids) < max_new_tokens and ids[-1] != lm.tokenizer.eos_token_id:
                ids.append(engine.step())
            row[name] = lm.tokenizer.decode(ids, skip_special_tokens=True).strip()
        out.append(row)
    return out


def caption_agreement(rows: list[dict]) -> dict:
    """Share of answers equal to the reference caption of their style, and per word position."""
    result = {}
    for style in ("video", "events"):
        pairs = [(r[style].split(), r["reference"].get(style, "").split()) for r in rows]
        words = sum(len(ref) for _, ref in pairs)
        result[style] = {"exact": sum(a == ref for a, ref in pairs) / max(1, len(pairs)),
                         "words": sum(x == y for a, ref in pairs for x, y in zip(a, ref)) / max(1, words)}
    return result
