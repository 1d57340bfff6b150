"""Real-geometry arithmetic (event positions, prompt lengths) and the synthetic models' code path."""

import pytest
import torch
from transformers import DynamicCache

from workers.models.eventgpt import EventGPTConfig, EventGPTForCausalLM
from workers.models.loading import EVENTGPT_SKIP_MODULES, VIDEOLLAVA_SKIP_MODULES, LoadedModel
from workers.models.prompts import REFERENCE_QUESTION, eventgpt_prompt_ids, spliced_length
from workers.models.synthetic import StandInTokenizer, synthetic_model, synthetic_prefill_inputs


def _real_eventgpt_on_meta():
    # The released geometry (LLaMA-7B + CLIP ViT-L/14-336) on the meta device: shapes flow, nothing is computed.
    with torch.device("meta"):
        return EventGPTForCausalLM(EventGPTConfig(event_feature_adaptor=True))


@pytest.mark.parametrize("n_images", [5, 1])
def test_real_geometry_event_positions(n_images):
    model = _real_eventgpt_on_meta()
    vision = model.config.clip_vision_config()
    assert (vision.image_size, vision.patch_size, vision.hidden_size) == (336, 14, 1024)
    embeds = model.model.encode_events(torch.empty(n_images, 3, 336, 336, device="meta"))
    assert tuple(embeds.shape) == (n_images + 577, 4096)


def test_real_prompt_lengths_with_standin_tokenizer():
    # StandInTokenizer reproduces the Vicuna SentencePiece piece counts of the template (see synthetic.py).
    ids = eventgpt_prompt_ids(StandInTokenizer(), REFERENCE_QUESTION)
    assert len(ids) - 1 == 59  # text tokens, the placeholder excluded
    assert spliced_length(ids, 5 + 577) == 641
    assert spliced_length(ids, 1 + 577) == 637


def test_standin_tokenizer_is_not_a_constant_counter():
    tok = StandInTokenizer()
    short = eventgpt_prompt_ids(tok, "Describe the following scene.")
    long = eventgpt_prompt_ids(tok, "What types of vehicles are present in the scene and how are they positioned?")
    assert len(long) - len(short) == 15 - 5
    assert short != long[: len(short)]


@pytest.mark.parametrize("kind", ["eventgpt", "videollava"])
def test_synthetic_tiny_prefill_then_decode(kind):
    lm = synthetic_model(kind, size="tiny-test", precision="fp32", device="cpu", seed=0)
    assert lm.synthetic and lm.model_id.startswith("synthetic:")
    kwargs, prompt_len = synthetic_prefill_inputs(lm)
    cache = DynamicCache()
    with torch.no_grad():
        out = lm.model(**kwargs, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == prompt_len
        nxt = out.logits[:, -1:].argmax(-1)
        out = lm.model(input_ids=nxt, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == prompt_len + 1
    assert torch.isfinite(out.logits).all()
    if kind == "eventgpt":
        assert prompt_len == 59 + 5 + 17
    else:  # 20 text tokens + 8 frames × 17 tokens in the tiny geometry
        assert prompt_len == 20 + 8 * 17
    rope = next(m for m in lm.model.modules() if "RotaryEmbedding" in type(m).__name__)
    assert rope.inv_freq.dtype == torch.float32 and rope.inv_freq[0].item() == 1.0  # buffers rebuilt after to_empty


def test_synthetic_weights_are_seeded():
    a = synthetic_model("eventgpt", size="tiny-test", precision="fp32", seed=3)
    b = synthetic_model("eventgpt", size="tiny-test", precision="fp32", seed=3)
    c = synthetic_model("eventgpt", size="tiny-test", precision="fp32", seed=4)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.model.state_dict()[w], b.model.state_dict()[w])
    assert not torch.equal(a.model.state_dict()[w], c.model.state_dict()[w])
    assert a.model.state_dict()[w].std() > 0


def test_synthetic_nf4_refused_on_cpu():
    with pytest.raises(ValueError, match="nf4"):
        synthetic_model("videollava", size="tiny-test", precision="nf4", device="cpu")


def test_nf4_skip_modules_cover_every_vision_linear():
    # transformers matches llm_int8_skip_modules from the start of a module name; check ours do cover
    # every Linear outside the language model (and nothing inside it) for both real architectures.
    from transformers import VideoLlavaForConditionalGeneration
    from transformers.quantizers.quantizers_utils import should_convert_module

    from workers.models.synthetic import _videollava_config

    with torch.device("meta"):
        eg = EventGPTForCausalLM(EventGPTConfig(event_feature_adaptor=True, num_hidden_layers=1))
        vl = VideoLlavaForConditionalGeneration(_videollava_config("tiny-test"))
    for model, skip, lm_prefix in ((eg, EVENTGPT_SKIP_MODULES, "model.layers."),
                                   (vl, VIDEOLLAVA_SKIP_MODULES, "model.language_model.layers.")):
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        converted = {n for n in linears if should_convert_module(n, skip)}
        assert converted == {n for n in linears if n.startswith(lm_prefix)}


def test_real_video_prompt_length_with_standin_tokenizer():
    from transformers import VideoLlavaConfig

    from workers.models.loading import video_tokens_per_frame, videollava_prompt_ids

    config = VideoLlavaConfig()  # the released geometry: CLIP-L/14 towers at 224 px, <video> = 32001
    assert video_tokens_per_frame(config) == 257
    tok = StandInTokenizer(added_tokens={"<image>": 32000, "<video>": 32001})
    ids = videollava_prompt_ids(tok, config, REFERENCE_QUESTION, 8)
    assert int((ids == 32001).sum()) == 8 * 257
    assert ids.shape[1] == 2076 and ids[0, 0].item() == 1


def _layerwise(kind: str, seed: int, calls: list):
    """`_materialize` on the NF4 path with a stand-in quantizer (bitsandbytes needs CUDA): it checks that the
    previous linear's unquantized weight is gone before the next one arrives, and returns a copy."""
    import copy
    import weakref

    from transformers import VideoLlavaForConditionalGeneration

    from workers.models.synthetic import _eventgpt_config, _materialize, _videollava_config

    def quantize(linear):
        assert all(ref() is None for ref in calls), "an earlier linear's unquantized weight is still alive"
        assert linear.weight.device.type == "cpu" and linear.weight.dtype == torch.bfloat16
        assert linear.weight.float().std() > 0
        calls.append(weakref.ref(linear.weight))
        return copy.deepcopy(linear)

    if kind == "eventgpt":
        cls, config, skip = EventGPTForCausalLM, _eventgpt_config("tiny-test"), EVENTGPT_SKIP_MODULES
    else:
        cls, config, skip = VideoLlavaForConditionalGeneration, _videollava_config("tiny-test"), VIDEOLLAVA_SKIP_MODULES
    return _materialize(cls, config, torch.bfloat16, "cpu", seed, quantize_linear=quantize, skip_modules=skip)


@pytest.mark.parametrize("kind", ["eventgpt", "videollava"])
def test_nf4_path_quantizes_one_linear_at_a_time(kind):
    calls = []
    model = _layerwise(kind, 0, calls)
    prefix = "model.layers." if kind == "eventgpt" else "model.language_model.layers."
    lm_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)]
    assert len(calls) == len(lm_linears) == 2 * 7  # 2 layers × q, k, v, o, gate, up, down
    assert not any(isinstance(m, torch.nn.Identity) for m in model.modules())  # every placeholder replaced
    assert all(p.device.type == "cpu" for p in model.parameters())

    whole = synthetic_model(kind, size="tiny-test", precision="bf16", seed=0).model
    ours, ref = model.state_dict(), whole.state_dict()
    assert ours.keys() == ref.keys()
    for key in ref:  # same initialiser per tensor; the generator is drawn in another order, so not same values
        assert ours[key].shape == ref[key].shape and ours[key].dtype == ref[key].dtype, key
        if key in {f"{n}.weight" for n in lm_linears}:
            assert abs(ours[key].float().std() / ref[key].float().std() - 1) < 0.2, key
        elif "norm" in key or "inv_freq" in key:
            assert torch.equal(ours[key], ref[key]), key

    lm = LoadedModel(model=model.eval(), tokenizer=synthetic_model(kind, size="tiny-test").tokenizer, kind=kind,
                     model_id="layerwise", device="cpu", dtype=torch.bfloat16, synthetic=True)
    kwargs, prompt_len = synthetic_prefill_inputs(lm)
    cache = DynamicCache()
    with torch.no_grad():
        out = model(**kwargs, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == prompt_len and torch.isfinite(out.logits).all()


def test_nf4_path_weights_are_seeded():
    w = "model.layers.1.mlp.down_proj.weight"
    a, b, c = (_layerwise("eventgpt", seed, []).state_dict()[w] for seed in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bitsandbytes NF4)")
def test_gpu_nf4_7b_loading_peak_is_the_model_plus_one_linear():
    """The real NF4 path: Video-LLaVA-7B's loading peak stays within 0.5 GiB of what the loaded model holds
    (its largest bf16 linear is 11008 × 4096 × 2 B = 86 MiB); building it whole in bf16 first would peak
    about 10 GB higher."""
    import os

    if os.environ.get("EVENTSPEC_SKIP_7B"):
        pytest.skip("EVENTSPEC_SKIP_7B is set")
    bnb = pytest.importorskip("bitsandbytes")
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    lm = synthetic_model("videollava", size="7b", precision="nf4", device="cuda", seed=0)
    held_gib = (torch.cuda.memory_allocated() - before) / 2**30
    peak_gib = (torch.cuda.max_memory_allocated() - before) / 2**30
    print(f"\nnf4 Video-LLaVA-7B: held {held_gib:.2f} GiB, loading peak {peak_gib:.2f} GiB")
    quantized = [m for m in lm.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 32 * 7
    assert not any(isinstance(m, torch.nn.Identity) for m in lm.model.modules())
    assert peak_gib - held_gib < 0.5
    kwargs, prompt_len = synthetic_prefill_inputs(lm)
    with torch.no_grad():
        out = lm.model(**kwargs, past_key_values=DynamicCache(), use_cache=True)
    assert torch.isfinite(out.logits).all()
