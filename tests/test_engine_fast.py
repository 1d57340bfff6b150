"""CudaGraphStepModel (static KV cache, bucketed steps, CUDA graphs) against the eager HFStepModel reference.

CPU tests run the static-cache path eagerly (`use_graphs=False`): same greedy tokens, verify/crop/rebase
behaviour and logits as HFStepModel through TokenEngine, with step sizes padded to buckets and steps longer
than the largest bucket split into chunks; HFBackend rebuilds a static cache too small for a request at
prefill and answers as one sized for it from the start. GPU tests (skipped without CUDA) check graph replay
against the eager static path and time decode and verify steps of the 7B target (random weights); run them
with `-s` to see the timings.
"""
from __future__ import annotations

import os
import time
import weakref

import pytest
import torch

pytest.importorskip("transformers")
from transformers import CLIPVisionConfig, LlamaConfig  # noqa: E402
from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration  # noqa: E402

from tests.engine_support import (PROMPT, REF_LEN, VOCAB, check_cache, prompt_ids,  # noqa: E402
                                  speculative_greedy, tiny_llama)
from workers.engine.core import TokenEngine  # noqa: E402
from workers.engine.fast import CudaGraphStepModel, decoder_and_head, make_step_model  # noqa: E402
from workers.engine.hf import HFStepModel  # noqa: E402

HIDDEN = 48
MAX_CACHE = 128
ATOL = 1e-4


def greedy_by_recompute(model, prompt: list[int], n: int) -> list[int]:
    seq, tokens = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
            seq.append(tokens[-1])
    return tokens


def fast(model, **kw) -> CudaGraphStepModel:
    return CudaGraphStepModel(model, max_cache_len=kw.pop("max_cache_len", MAX_CACHE), use_graphs=False, **kw)


def assert_same_output(a, b) -> None:
    assert a.greedy == b.greedy
    assert a.logits.shape == b.logits.shape and b.logits.dtype == torch.float32
    torch.testing.assert_close(b.logits, a.logits, atol=ATOL, rtol=ATOL)
    if a.hidden is not None:
        torch.testing.assert_close(b.hidden, a.hidden, atol=ATOL, rtol=ATOL)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def reference(target):
    return greedy_by_recompute(target, PROMPT, REF_LEN)


# --- CPU: the static-cache path, eager -------------------------------------------------------------------


def test_decode_matches_hf_and_recompute(target, reference):
    ref = HFStepModel(target, want_hidden=True)
    model = fast(target, want_hidden=True)
    ref_engine, engine = TokenEngine(ref), TokenEngine(model)
    assert engine.start(prompt_ids()) == ref_engine.start(prompt_ids()) == reference[0]
    assert_same_output(ref_engine.last_output, engine.last_output)
    assert engine.last_output.hidden.shape == (1, HIDDEN)
    for i in range(1, 30):
        assert engine.step() == ref_engine.step() == reference[i], f"step {i}"
        assert_same_output(ref_engine.last_output, engine.last_output)
        check_cache(engine)
    model.sync()


@pytest.mark.parametrize("k", [0, 1, 3, 5, 16])
@pytest.mark.parametrize("case", ["right", "wrong", "prefix"])
def test_verify_crop_same_as_hf(target, reference, k, case):
    """k + 1 fed tokens pad to buckets 1, 2, 4, 8 and 32; the wrong drafts' K/V stay in the static buffers
    beyond kv_len after the crop and must not leak into later steps."""
    ref_engine, engine = TokenEngine(HFStepModel(target)), TokenEngine(fast(target))
    ref_engine.start(prompt_ids())
    engine.start(prompt_ids())
    for _ in range(3):
        assert engine.step() == ref_engine.step()
    for _round in range(2):
        m = len(engine.tokens)
        truth = reference[m: m + k]
        wrong = [(t + 1) % VOCAB for t in truth]
        drafts = {"right": truth, "wrong": wrong, "prefix": truth[: k // 2] + wrong[k // 2:]}[case]
        expect = {"right": k, "wrong": 0, "prefix": k // 2}[case]
        result = engine.verify(drafts)
        assert result == ref_engine.verify(drafts) == (expect, reference[m + expect])
        assert_same_output(ref_engine.last_output, engine.last_output)
        assert engine.tokens == ref_engine.tokens == reference[: m + expect + 1]
        check_cache(engine)
    for _ in range(4):
        assert engine.step() == ref_engine.step()
        assert_same_output(ref_engine.last_output, engine.last_output)
    assert engine.tokens == reference[: len(engine.tokens)]


def test_steps_longer_than_the_largest_bucket_are_chunked(target, reference):
    ref, model = HFStepModel(target, want_hidden=True), fast(target, buckets=(1, 2, 4), want_hidden=True)
    ref.prefill(prompt_ids())
    model.prefill(prompt_ids())
    fed = [reference[0]] + reference[1:11]                      # 11 tokens: chunks of 4, 4, 3
    out = model.forward(fed)
    assert_same_output(ref.forward(fed), out)
    assert out.greedy == reference[1:12] and out.hidden.shape == (11, HIDDEN)
    assert model.kv_len == len(PROMPT) + 11
    model.crop(len(PROMPT) + 5)
    ref.crop(len(PROMPT) + 5)
    assert_same_output(ref.forward(reference[5:8]), model.forward(reference[5:8]))


def test_stale_slots_beyond_kv_len_are_invisible(target, reference):
    """Whatever lies beyond kv_len (padding rows, rejected drafts) must not change any output."""
    model = fast(target)
    model.prefill(prompt_ids())
    model.forward(reference[:4])
    model.crop(len(PROMPT) + 2)
    clean = model.forward(reference[2:5])
    model.crop(len(PROMPT) + 2)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for buf in model.kv.keys + model.kv.values:
            junk = torch.randn(buf[:, :, model.kv_len:].shape, generator=g) * 50
            buf[:, :, model.kv_len:] = junk
    dirty = model.forward(reference[2:5])
    assert dirty.greedy == clean.greedy == reference[3:6]
    torch.testing.assert_close(dirty.logits, clean.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 5])
def test_speculative_loop_same_as_hf(target, reference, k):
    torch.manual_seed(7)
    close = tiny_llama(0)
    with torch.no_grad():
        for p in close.parameters():
            p.add_(torch.randn(p.shape) * 0.01)
    tokens, accepted = speculative_greedy(fast, target, close, REF_LEN, k)
    assert tokens == reference
    assert (tokens, accepted) == speculative_greedy(HFStepModel, target, close, REF_LEN, k)
    assert 0 in accepted and any(a > 0 for a in accepted), accepted   # both rebase paths ran


def test_second_prefill_and_padded_prompt(target):
    """A new request reuses the buffers; a prompt with masked (padding) positions hides them as HF does."""
    padded = {"input_ids": torch.tensor([[0, 0] + PROMPT]), "attention_mask": torch.tensor([[0, 0] + [1] * len(PROMPT)])}
    ref, model = HFStepModel(target), fast(target)
    for prompt in (prompt_ids(), padded, prompt_ids()):
        assert_same_output(ref.prefill(prompt), model.prefill(prompt))
        for fed in ([3], [7, 8, 9], [11]):
            assert_same_output(ref.forward(fed), model.forward(fed))
        assert model.kv_len == ref.kv_len


def test_errors_and_factory(target):
    model = fast(target, max_cache_len=10)
    with pytest.raises(RuntimeError):
        model.forward([1])                                      # before prefill
    model.prefill(prompt_ids())
    model.forward([1, 2, 3, 4])
    with pytest.raises(ValueError, match="max_cache_len"):
        model.forward([5])                                      # 11 > 10
    with pytest.raises(ValueError):
        model.crop(model.kv_len + 1)
    with pytest.raises(ValueError, match="max_cache_len"):
        fast(target, max_cache_len=4).prefill(prompt_ids())
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphStepModel(target, max_cache_len=10)            # graphs asked for on the CPU
    assert type(make_step_model(target, device="cpu", max_cache_len=10, cuda_graphs=True)) is HFStepModel


# --- Video-LLaVA: prefill through the multimodal wrapper, steps through its language model -----------------

VIDEO_ID, FRAMES, SIDE = 126, 2, 28          # 28 px / patch 14 → 2×2 patches + CLS = 5 tokens per frame


def tiny_videollava() -> VideoLlavaForConditionalGeneration:
    torch.manual_seed(3)
    text = LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=SIDE, patch_size=14, projection_dim=16)
    config = VideoLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                              image_token_index=125, video_token_index=VIDEO_ID)
    return VideoLlavaForConditionalGeneration(config).eval()


def test_videollava_matches_hf():
    model = tiny_videollava()
    d = decoder_and_head(model)
    assert d.embed_tokens is model.get_input_embeddings() and d.lm_head is model.lm_head and len(d.layers) == 2
    n_video = FRAMES * ((SIDE // 14) ** 2 + 1)
    ids = torch.tensor([[1, 17, 30] + [VIDEO_ID] * n_video + [40, 41, 42]])
    pixels = torch.randn(1, FRAMES, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    prompt = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}
    ref_engine = TokenEngine(HFStepModel(model, want_hidden=True))
    engine = TokenEngine(fast(model, want_hidden=True))
    assert engine.start(prompt) == ref_engine.start(prompt)
    assert engine.model.kv_len == ids.shape[1]
    for _ in range(12):
        assert engine.step() == ref_engine.step()
        assert_same_output(ref_engine.last_output, engine.last_output)
    oracle = TokenEngine(HFStepModel(model))
    oracle.start(prompt)
    while len(oracle.tokens) < len(engine.tokens) + 6:
        oracle.step()
    future = oracle.tokens[len(engine.tokens):]
    drafts = future[:3] + [(t + 1) % 100 for t in future[3:]]
    assert engine.verify(drafts) == ref_engine.verify(drafts) == (3, future[3])
    assert_same_output(ref_engine.last_output, engine.last_output)


def test_eventgpt_decoder_is_its_llama_model():
    from workers.models.synthetic import synthetic_model

    lm = synthetic_model("eventgpt", size="tiny-test", precision="fp32", device="cpu")
    d = decoder_and_head(lm.model)
    assert d.embed_tokens is lm.model.model.embed_tokens and d.norm is lm.model.model.norm
    assert d.lm_head is lm.model.lm_head
    ref, model = HFStepModel(lm.model), fast(lm.model)
    prompt = {"input_ids": torch.tensor([[1, 300, 301, 302, 303]])}
    assert_same_output(ref.prefill(prompt), model.prefill(prompt))
    for fed in ([5], [6, 7, 8]):
        assert_same_output(ref.forward(fed), model.forward(fed))


# --- HFBackend: the static cache grows at prefill for a request it cannot hold --------------------------


def eager_static_backend(max_cache_len: int):
    """The Video-LLaVA backend (synthetic tiny weights) with its CUDA branch's step model, a static cache of
    `max_cache_len` positions, run eagerly: on the CPU `HFBackend._make_step_model` builds the dynamic-cache
    HFStepModel, which never grows. Records a weak reference to every step model it builds."""
    from workers.backends.hf_backend import VERIFY_BUCKETS
    from workers.backends.videollava import VideoLlavaBackend

    class EagerStaticBackend(VideoLlavaBackend):
        def _make_step_model(self, max_cache_len: int | None = None):
            self.alive_at_rebuild = [ref() is not None for ref in self.built]
            model = CudaGraphStepModel(self.lm.model, max_cache_len=max_cache_len or int(self.options["max_cache_len"]),
                                       buckets=VERIFY_BUCKETS, use_graphs=False)
            self.built.append(weakref.ref(model))
            return model

    backend = EagerStaticBackend("target", {"synthetic_weights": "tiny-test", "device": "cpu", "precision": "fp32",
                                            "threads": 1, "max_cache_len": max_cache_len})
    backend.built = []
    backend.load()
    return backend


def test_backend_grows_a_static_cache_too_small_for_the_request():
    """A cache that holds the prompt but not prompt + answer + CACHE_MARGIN is rebuilt larger at prefill; the
    answer, decoded and verified in the grown cache, is the one a backend sized for the request from the start
    gives (and transformers' generate()), logits included: a lost or corrupted K/V position changes them."""
    from workers.backends.hf_backend import CACHE_MARGIN

    n = 40
    big, small = eager_static_backend(512), eager_static_backend(160)
    options = {"max_new_tokens": n}
    prepared = big.prepare({"sample_id": "s"}, "", options)
    prompt_len = prepared.info["prompt_len"]
    assert prompt_len < 160 < prompt_len + n + CACHE_MARGIN <= 512
    want = [big.prefill(prepared)[0]]
    want_logits = [big.engine.last_output.logits]
    while len(want) < n:
        want.append(big.engine.step())
        want_logits.append(big.engine.last_output.logits)
    assert big.step_model.max_cache_len == 512 and len(big.built) == 1
    assert len(set(want)) > n // 4, want                 # an answer, not one token repeated
    assert want == big.hf_generate(prepared, n, eos_id=-1)

    first, got_prompt_len = small.prefill(small.prepare({"sample_id": "s"}, "", options))
    assert small.step_model.max_cache_len >= prompt_len + n + CACHE_MARGIN > 160
    assert small.engine.model is small.step_model and len(small.built) == 2
    assert small.alive_at_rebuild == [False]             # the old cache is released before the new one is built
    engine = small.engine
    assert (got_prompt_len, first) == (prompt_len, want[0])
    got_logits = [engine.last_output.logits]
    while len(engine.tokens) < n - 17:
        engine.step()
        got_logits.append(engine.last_output.logits)
    m = len(engine.tokens)
    assert engine.verify(want[m: m + 16]) == (16, want[m + 16])   # 17 positions written in one step
    got_logits.append(engine.last_output.logits)
    while len(engine.tokens) < n:
        engine.step()
        got_logits.append(engine.last_output.logits)
    assert engine.tokens == want
    torch.testing.assert_close(torch.cat(got_logits), torch.cat(want_logits), atol=ATOL, rtol=ATOL)


# --- GPU: graph replay vs the eager static path, and timings ----------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def drive(model, prompt: dict, decode_steps: int, verify_sizes=(1, 3, 5, 9, 16, 31, 40)) -> list:
    """A fixed sequence of prefill, decode and verify calls; returns every StepOutput."""
    engine = TokenEngine(model)
    engine.start(prompt)
    outputs = [engine.last_output]
    for _ in range(decode_steps):
        engine.step()
        outputs.append(engine.last_output)
    for k in verify_sizes:
        drafts = [(t * 7 + 3) % 96 for t in engine.tokens[-k:]]   # mostly wrong: crops every time
        engine.verify(drafts)
        outputs.append(engine.last_output)
        engine.step()
        outputs.append(engine.last_output)
    return outputs


@cuda
@pytest.mark.parametrize("dtype,compile", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["fp32", "bf16", "fp32-compiled"])
def test_gpu_graphs_match_eager_tiny(dtype, compile):
    model = tiny_llama(0, dtype=dtype, device="cuda")
    prompt = {"input_ids": torch.tensor([PROMPT], device="cuda")}
    graphed = CudaGraphStepModel(model, max_cache_len=256, use_graphs=True, want_hidden=True, compile=compile)
    assert graphed.graph_buckets == [1, 2, 4, 8, 16, 32] and not graphed.eager_buckets
    eager = CudaGraphStepModel(model, max_cache_len=256, use_graphs=False, want_hidden=True)
    got, want = drive(graphed, prompt, 20), drive(eager, prompt, 20)
    for a, b in zip(want, got):
        assert a.greedy == b.greedy
        torch.testing.assert_close(b.logits, a.logits, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(b.hidden, a.hidden, atol=1e-3, rtol=1e-3)
    if dtype == torch.float32 and not compile:
        assert [t for o in drive(HFStepModel(model), prompt, 20) for t in o.greedy] == [t for o in got for t in o.greedy]


def ms_per_call(fn, repeats: int) -> float:
    """Median wall ms of `fn` (each call ends in a device sync: greedy ids go to the host)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - start) / 1e6)
    return sorted(times)[len(times) // 2]


def time_engine(model, prompt: dict, k: int = 16) -> dict:
    engine = TokenEngine(model)
    engine.start(prompt)
    for _ in range(3):
        engine.step()
    decode_ms = ms_per_call(engine.step, 40)
    base = model.kv_len

    def verify_k():
        model.forward([engine.tokens[-1]] + [5] * k)
        model.crop(base)
    verify_ms = ms_per_call(verify_k, 20)
    return {"decode_ms": decode_ms, f"verify{k}_ms": verify_ms}


@cuda
@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_gpu_7b_target_timing(precision):
    """Random-weight Video-LLaVA-7B with its real 2,076-token prompt: graphs vs eager static path, then wall
    ms of a decode step and of a 16-draft verification for HF eager and for the graphed step model.
    Goals (H100, reported in BENCHMARKS.md, not asserted): decode bf16 ≤ 6.5 ms, NF4 ≤ 4.5 ms; verify-16
    ≤ 1.3× decode in bf16.
    EVENTSPEC_COMPILE=1 times the torch.compile'd variant (minutes of compilation per precision)."""
    if os.environ.get("EVENTSPEC_SKIP_7B"):
        pytest.skip("EVENTSPEC_SKIP_7B is set")
    if precision == "nf4":
        pytest.importorskip("bitsandbytes")
    from workers.models.synthetic import synthetic_model, synthetic_prefill_inputs

    lm = synthetic_model("videollava", size="7b", precision=precision, device="cuda")
    prompt, prompt_len = synthetic_prefill_inputs(lm)
    max_cache_len = prompt_len + 512
    start = time.perf_counter_ns()
    compile = os.environ.get("EVENTSPEC_COMPILE") == "1"
    graphed = CudaGraphStepModel(lm.model, max_cache_len=max_cache_len, use_graphs=True, compile=compile)
    capture_s = (time.perf_counter_ns() - start) / 1e9
    eager = CudaGraphStepModel(lm.model, max_cache_len=max_cache_len, use_graphs=False)
    got, want = drive(graphed, prompt, 8), drive(eager, prompt, 8)
    # Capture may pick other cuBLAS kernels than eager runs, so bf16 logits differ by rounding, and random
    # 7B weights give near-tied logits: compare the outputs up to the first differing token only.
    agree = next((i for i, (a, b) in enumerate(zip(want, got)) if a.greedy != b.greedy), len(want))
    worst = max(float((a.logits - b.logits).abs().max()) for a, b in zip(want[:agree], got[:agree]))
    del eager

    hf = time_engine(HFStepModel(lm.model), prompt)
    fast_times = time_engine(graphed, prompt)
    torch.cuda.synchronize()
    print(f"\n[{precision}{' compiled' if compile else ''}] {torch.cuda.get_device_name()} prompt {prompt_len} capture {capture_s:.1f} s "
          f"graph buckets {graphed.graph_buckets} eager buckets {sorted(graphed.eager_buckets)}")
    print(f"[{precision}] HF eager: decode {hf['decode_ms']:.2f} ms, verify16 {hf['verify16_ms']:.2f} ms")
    print(f"[{precision}] graphs:   decode {fast_times['decode_ms']:.2f} ms, verify16 {fast_times['verify16_ms']:.2f} ms "
          f"({fast_times['verify16_ms'] / fast_times['decode_ms']:.2f}x decode); graphs vs eager: "
          f"{agree}/{len(want)} outputs agree, max |dlogit| there {worst:.3g}")
    assert agree >= 2 and worst < 0.5      # prefill and at least the first decode step
    assert not graphed.eager_buckets
    # The goals are benchmark figures, not pass/fail conditions (BENCHMARKS.md reports them); what must
    # hold is that the graphed path beats eager decoding.
    assert fast_times["decode_ms"] < hf["decode_ms"]
