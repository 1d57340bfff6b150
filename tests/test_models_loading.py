"""Loading tiny checkpoints through the same code path as the released ones, and the KV-cache contract."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.models.loading import (
    CheckpointError,
    embed_tokens,
    eventgpt_prefill_inputs,
    lm_head_weight,
    load_eventgpt,
    load_videollava,
    tokenizer_fingerprint,
    videollava_prefill_inputs,
)
from workers.models.prompts import EVENT_PLACEHOLDER_ID, REFERENCE_QUESTION
from workers.models.tiny import TINY_TOKENS_PER_IMAGE, make_tiny

QUESTION = REFERENCE_QUESTION


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), share_weights=True, seed=0)


@pytest.fixture(scope="module")
def draft(tiny):
    return load_eventgpt(tiny["eventgpt"])


@pytest.fixture(scope="module")
def target(tiny):
    return load_videollava(tiny["videollava"])


def _event_images(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 64, 3), dtype=np.uint8) for _ in range(n)]


def _frames(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (8, 48, 64, 3), dtype=np.uint8)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_eventgpt_state_dict_uses_released_names(tiny, draft):
    names = set(draft.model.state_dict())
    for name in [
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.visual_projector.0.bias",
        "model.visual_projector.2.weight",
        "model.feature_adaptor.weight",
        "model.visual_tower.visual_tower.vision_model.embeddings.patch_embedding.weight",
        "model.visual_tower.visual_tower.vision_model.encoder.layers.1.mlp.fc2.weight",
    ]:
        assert name in names
    stored = load_file(f"{tiny['eventgpt']}/model.safetensors")
    tower = load_file(f"{tiny['clip']}/model.safetensors")
    state = draft.model.state_dict()
    assert set(stored) | {f"model.visual_tower.visual_tower.{k}" for k in tower} == names
    for k, v in stored.items():
        assert torch.equal(state[k], v), k
    for k, v in tower.items():  # the tower really came from the CLIP folder named by mm_visual_tower
        assert torch.equal(state[f"model.visual_tower.visual_tower.{k}"], v), k
    assert embed_tokens(draft) is draft.model.model.embed_tokens
    assert lm_head_weight(draft) is draft.model.lm_head.weight


def test_videollava_loads_hf_layout_without_missing_keys(tiny, target):
    stored = load_file(f"{tiny['videollava']}/model.safetensors")
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in stored  # the -hf names
    state = target.model.state_dict()
    assert torch.equal(state["model.language_model.layers.0.self_attn.q_proj.weight"],
                       stored["language_model.model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(lm_head_weight(target), stored["language_model.lm_head.weight"])
    assert len(state) == len(stored)


@pytest.mark.parametrize("key", ["model.layers.1.mlp.down_proj.weight", "model.feature_adaptor.bias"])
def test_eventgpt_missing_tensor_is_named(tiny, tmp_path, key):
    folder = _copy(tiny["eventgpt"], tmp_path / "eventgpt")
    sd = load_file(folder / "model.safetensors")
    del sd[key]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"missing tensors: .*{key}"):
        load_eventgpt(folder, clip_path=tiny["clip"])


def test_eventgpt_unexpected_tensor_is_named(tiny, tmp_path):
    folder = _copy(tiny["eventgpt"], tmp_path / "eventgpt")
    sd = load_file(folder / "model.safetensors")
    sd["model.mm_projector.weight"] = torch.zeros(2, 2)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensors: model.mm_projector.weight"):
        load_eventgpt(folder, clip_path=tiny["clip"])


def test_clip_folder_missing_tensor_is_named(tiny, tmp_path):
    clip = _copy(tiny["clip"], tmp_path / "clip")
    sd = load_file(clip / "model.safetensors")
    del sd["vision_model.post_layernorm.bias"]
    save_file(sd, clip / "model.safetensors")
    with pytest.raises(CheckpointError, match="post_layernorm.bias"):
        load_eventgpt(tiny["eventgpt"], clip_path=clip)


def test_videollava_missing_tensor_is_named(tiny, tmp_path):
    folder = _copy(tiny["videollava"], tmp_path / "videollava")
    sd = load_file(folder / "model.safetensors")
    del sd["language_model.model.layers.1.mlp.up_proj.weight"]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: .*layers\.1\.mlp\.up_proj\.weight"):
        load_videollava(folder)


def test_clip_path_override(tiny, tmp_path):
    folder = _copy(tiny["eventgpt"], tmp_path / "ckpt" / "eventgpt")  # its ../clip does not exist here
    with pytest.raises(CheckpointError, match="clip_path"):
        load_eventgpt(folder)
    clip = _copy(tiny["clip"], tmp_path / "elsewhere" / "my-clip")
    lm = load_eventgpt(folder, clip_path=clip)
    assert lm.model.config.clip_vision_config().image_size == 56


def test_use_event_qformer_refused(tiny, tmp_path):
    folder = _copy(tiny["eventgpt"], tmp_path / "eventgpt")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["use_event_qformer"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_event_qformer"):
        load_eventgpt(folder, clip_path=tiny["clip"])


def test_config_special_tokens_followed(tiny, tmp_path):
    folder = _copy(tiny["eventgpt"], tmp_path / "eventgpt")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["mm_use_im_start_end"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    # the tiny tokenizer fills the whole embedding table, so adding tokens must be refused, not silently overflow
    with pytest.raises(CheckpointError, match="vocab_size"):
        load_eventgpt(folder, clip_path=tiny["clip"])
    cfg["vocab_size"] += 2
    (folder / "config.json").write_text(json.dumps(cfg))
    sd = load_file(folder / "model.safetensors")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = torch.cat([sd[k], torch.zeros(2, sd[k].shape[1])])
    save_file(sd, folder / "model.safetensors")
    lm = load_eventgpt(folder, clip_path=tiny["clip"])
    ids = lm.tokenizer.encode("<ev_start><ev_end>", add_special_tokens=False)
    assert ids == lm.tokenizer.convert_tokens_to_ids(["<ev_start>", "<ev_end>"])
    kwargs, prompt_len = eventgpt_prefill_inputs(lm, _event_images(), QUESTION)
    assert prompt_len == kwargs["input_ids"].shape[1] - 1 + 5 + TINY_TOKENS_PER_IMAGE


def test_nf4_refused_on_cpu(tiny):
    with pytest.raises(ValueError, match="nf4.*CUDA"):
        load_eventgpt(tiny["eventgpt"], precision="nf4", device="cpu")


def test_tokenizer_fingerprint(draft, target):
    assert tokenizer_fingerprint(draft.tokenizer) == tokenizer_fingerprint(target.tokenizer)
    assert len(target.tokenizer) == len(draft.tokenizer) + 2  # <image>, <video> on top of the shared vocabulary
    assert tokenizer_fingerprint(draft.tokenizer, limit=100) != tokenizer_fingerprint(draft.tokenizer, limit=101)


def test_event_prefill_length_tiny_geometry(draft):
    kwargs, prompt_len = eventgpt_prefill_inputs(draft, _event_images(5), QUESTION)
    ids = kwargs["input_ids"]
    assert int((ids == EVENT_PLACEHOLDER_ID).sum()) == 1
    assert ids[0, 0].item() == draft.tokenizer.bos_token_id
    assert int((ids == draft.tokenizer.bos_token_id).sum()) == 1  # the second chunk's BOS was dropped
    assert kwargs["event_pixel_values"].shape == (5, 3, 56, 56)
    assert prompt_len == ids.shape[1] - 1 + 5 + TINY_TOKENS_PER_IMAGE
    assert draft.model.model.encode_events(kwargs["event_pixel_values"]).shape == (5 + TINY_TOKENS_PER_IMAGE, 64)


def _greedy_with_cache(model, kwargs, n_new):
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        out = model(**kwargs, past_key_values=cache, use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(n_new - 1):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, cache


def _full_forward_argmax(model, kwargs, tokens):
    full = dict(kwargs)
    full["input_ids"] = torch.cat([kwargs["input_ids"], torch.tensor([tokens])], dim=1)
    if "attention_mask" in full:
        full["attention_mask"] = torch.ones_like(full["input_ids"])
    with torch.no_grad():
        logits = model(**full, use_cache=False).logits[0]
    n = len(tokens)
    return logits[-n - 1 : -1].argmax(-1).tolist()


N_NEW = 8


def test_eventgpt_cached_decode_matches_full_forward(draft):
    kwargs, prompt_len = eventgpt_prefill_inputs(draft, _event_images(), QUESTION)
    tokens, cache = _greedy_with_cache(draft.model, kwargs, N_NEW)
    assert cache.get_seq_length() == prompt_len + N_NEW - 1
    assert _full_forward_argmax(draft.model, kwargs, tokens) == tokens
    assert len(set(tokens)) > 1, f"degenerate tiny draft: {tokens}"


def test_videollava_cached_decode_matches_full_forward(target):
    kwargs, prompt_len = videollava_prefill_inputs(target, _frames(), QUESTION)
    assert kwargs["pixel_values_videos"].shape == (1, 8, 3, 56, 56)
    assert kwargs["input_ids"][0, 0].item() == target.tokenizer.bos_token_id
    assert int((kwargs["input_ids"] == target.model.config.video_token_index).sum()) == 8 * TINY_TOKENS_PER_IMAGE
    tokens, cache = _greedy_with_cache(target.model, kwargs, N_NEW)
    assert cache.get_seq_length() == prompt_len + N_NEW - 1
    assert _full_forward_argmax(target.model, kwargs, tokens) == tokens
    assert len(set(tokens)) > 1, f"degenerate tiny target: {tokens}"


def test_tiny_outputs_depend_on_input(target):
    # the shared-weights target damps attention, so its first few tokens follow the prompt's last token
    a, _ = _greedy_with_cache(target.model, videollava_prefill_inputs(target, _frames(0), QUESTION)[0], 12)
    b, _ = _greedy_with_cache(
        target.model, videollava_prefill_inputs(target, _frames(1), "Describe the following scene.")[0], 12
    )
    assert a != b


def test_shared_weights_make_draft_agree_with_target(tiny, draft, target):
    v = len(draft.tokenizer)
    assert torch.equal(lm_head_weight(draft), lm_head_weight(target)[:v])
    assert torch.equal(embed_tokens(draft).weight, embed_tokens(target).weight[:v])
    ids = torch.tensor([draft.tokenizer.encode("What is the layout of the road in the scene?")])
    with torch.no_grad():
        d = draft.model(input_ids=ids).logits[0].argmax(-1)
        t = target.model(input_ids=ids).logits[0, :, :v].argmax(-1)
    assert torch.equal(d, t)  # same LLaMA weights: text-only logits agree exactly
