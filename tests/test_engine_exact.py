"""The exact step: row-invariant kernels and ExactStepModel, on the CPU under Triton's interpreter.

What must hold bit for bit: a row's output of every kernel is the same whatever number of rows ran beside
it (1 … 33), and the step model's logits of a position are the same computed by a decode step, by a
verification of k drafts or by a rebase. What holds to rounding: the kernels against plain torch, the NF4
path against the bitsandbytes-format reference dequantization, the step model against transformers.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported anywhere in this process

pytest.importorskip("triton")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from workers.engine import nf4  # noqa: E402
from workers.engine.core import TokenEngine  # noqa: E402
from workers.engine.hf import HFStepModel  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("the kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from workers.engine.exact import ExactStepModel  # noqa: E402
from workers.engine.kernels.attention import attention  # noqa: E402
from workers.engine.kernels.elementwise import rmsnorm  # noqa: E402
from workers.engine.kernels.linear import (Weight, gate_up_silu, linear, linear_residual_norm,  # noqa: E402
                                           qkv_rope_store)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROWS = (1, 2, 3, 5, 9, 17, 33)
PROMPT = [1, 5, 9, 22, 40, 7, 61, 3]


def _rows_invariant(fn, x):
    full = fn(x)
    for m in ROWS:
        if m <= x.shape[0]:
            part = fn(x[:m].contiguous())
            assert torch.equal(part, full[:m]), f"rows 0..{m - 1} differ when computed with {x.shape[0]} rows"
    return full


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(96, 320), (200, 64)])
def test_dense_linear_is_row_invariant_and_right(dtype, shape):
    n, k = shape
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    x = torch.randn(33, k, generator=gen).to(DEVICE, dtype)
    weight = Weight(n, k, dense=w)
    y = _rows_invariant(lambda t: linear(t, weight), x)
    ref = x.double() @ w.double().T
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert ((y.double() - ref).abs() / (ref.abs() + 1)).max() < tol


def _nf4_reference(weight: Weight, packed, absmax, dtype) -> torch.Tensor:
    """The float32 weights an NF4 kernel multiplies by: code[q] · absmax, with the code rounded to the
    input's 16-bit dtype first on the tensor-core kernel (an MMA operand)."""
    code = nf4.code_tensor("cpu")
    if weight.tensor_cores:
        code = code.to(dtype).float()
    flat = packed.reshape(-1).cpu()
    q = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1).long()
    return (code[q].reshape(-1, 64) * absmax.cpu().float()[:, None]).reshape(weight.n, weight.k)


def test_nf4_linear_matches_reference_dequantization():
    n, k = 128, 256
    gen = torch.Generator().manual_seed(3)
    dense = torch.randn(n, k, generator=gen)
    packed, absmax = nf4.quantize(dense)
    assert packed.dtype == torch.uint8 and packed.numel() == n * k // 2 and absmax.numel() == n * k // 64
    # quantization error is what 16 levels allow, not more
    w_dq = nf4.dequantize(packed, absmax, n, k, torch.float32)
    assert ((w_dq - dense).abs() <= absmax.repeat_interleave(64).reshape(n, k) * 0.2).all()
    weight = Weight(n, k, packed=packed.to(DEVICE), absmax=absmax.to(DEVICE), code=nf4.code_tensor(DEVICE))
    # the rows kernel uses code[q] · absmax in float32, the tensor-core kernel the code rounded to bf16
    w_ref = _nf4_reference(weight, packed, absmax, torch.bfloat16)
    x = torch.randn(17, k, generator=gen).to(DEVICE, torch.bfloat16)
    y = _rows_invariant(lambda t: linear(t, weight), x)
    ref = x.double() @ w_ref.to(DEVICE).double().T
    assert ((y.double() - ref).abs() / (ref.abs() + 1)).max() < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(96, 1024), (40, 320)])
def test_nf4_one_row_kernel_splits_and_dtypes(dtype, shape):
    """The NF4 one-row kernels (kernels/nf4_rows.py) over split K (4 splits; a last split of one 64-block),
    a partial tile of weight rows, and x read as 32-bit column pairs (16-bit) or column by column (fp32)."""
    n, k = shape
    gen = torch.Generator().manual_seed(n * k)
    packed, absmax = nf4.quantize(torch.randn(n, k, generator=gen))
    weight = Weight(n, k, packed=packed.to(DEVICE), absmax=absmax.to(DEVICE), code=nf4.code_tensor(DEVICE),
                    nf4_kernel="rows")
    assert weight.splits > 1 and not weight.tensor_cores
    x = torch.randn(9, k, generator=gen).to(DEVICE, dtype)
    y = _rows_invariant(lambda t: linear(t, weight), x)
    ref = x.double() @ nf4.dequantize(packed, absmax, n, k, torch.float32).to(DEVICE).double().T
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((y.double() - ref).abs() / (ref.abs() + 1)).max() < tol


def test_unpack_bnb_expands_double_quantized_absmax():
    class State:
        pass
    n, k = 4, 512                       # 32 blocks of 64
    packed, absmax = nf4.quantize(torch.randn(n, k))
    nested = State()
    nested.code = torch.linspace(-1, 1, 256)
    nested.blocksize = 8
    nested.absmax = torch.rand(4) + 0.5
    state = State()
    state.quant_type, state.blocksize, state.nested, state.state2 = "nf4", 64, True, nested
    state.absmax = torch.randint(0, 256, (32,), dtype=torch.uint8)
    state.offset = 0.25
    state.code = nf4.code_tensor("cpu")
    param = State()
    param.quant_state, param.data = state, packed.reshape(-1, 1)
    got_packed, got_absmax, code = nf4.unpack_bnb(param)
    expected = nested.code[state.absmax.long()] * nested.absmax.repeat_interleave(8) + 0.25
    assert torch.equal(got_packed, packed) and torch.equal(got_absmax, expected) and torch.equal(code, state.code)
    kept = nf4.nested_absmax(param)            # what the NF4 CUDA kernel reads instead (nf4_cuda.Config.dq)
    assert kept.q.dtype == torch.uint8 and kept.group == 8 and torch.equal(kept.expand(), expected)
    state.nested = False
    assert nf4.nested_absmax(param) is None
    state.nested = True
    state.blocksize = 128
    with pytest.raises(ValueError, match="block size 64"):
        nf4.unpack_bnb(param)


def _split_partials(weight: Weight, ref: torch.Tensor, splits: int) -> Weight:
    """Turn an NF4 weight into one on the split-partials path (what nf4_cuda.py feeds the finish kernels),
    with the partials of each row computed here in float64 over `splits` slices of K, then rounded."""
    weight.tensor_cores, weight.splits = True, splits
    bounds = torch.linspace(0, weight.k // 64, splits + 1).round().long() * 64

    def partials(x, out=None):
        xd = x.double().cpu()
        parts = torch.stack([xd[:, a:b] @ ref[:, a:b].T for a, b in zip(bounds[:-1], bounds[1:])]).float()
        if out is None:
            return parts.to(x.device)
        out.copy_(parts)
        return out

    weight.partials = partials
    return weight


@pytest.mark.parametrize("quantized", [False, "dense-split", True, "partials"])
def test_fused_layer_kernels_are_row_invariant_and_right(quantized, monkeypatch):
    """Dense (fused dual kernel, and split K with the dual epilogue kernel), NF4 on this device's kernel, and
    NF4 as split partials (the CUDA kernel's output form, here made in float64 so the CPU checks the finish
    kernels' epilogues and their row invariance)."""
    from workers.engine.kernels import linear as linear_module
    gen = torch.Generator().manual_seed(5)
    dtype = torch.bfloat16
    monkeypatch.setattr(linear_module, "DENSE_DUAL", "split" if quantized == "dense-split" else "fused")

    def weight(n, k):
        w = torch.randn(n, k, generator=gen) / k ** 0.5
        if quantized in (False, "dense-split"):
            w = w.to(dtype)
            made = Weight(n, k, dense=w.to(DEVICE))
            if quantized == "dense-split":
                made.splits, made.k_split = 2, k // 2
                assert made.split_dual
            return made, w.double()
        packed, absmax = nf4.quantize(w)
        ref = nf4.dequantize(packed, absmax, n, k, torch.float32).double()
        made = Weight(n, k, packed=packed.to(DEVICE), absmax=absmax.to(DEVICE), code=nf4.code_tensor(DEVICE))
        if quantized == "partials":
            made = _split_partials(made, ref, splits=min(3, k // 64))
        return made, ref

    def close(got, ref, tol=3e-2):
        assert ((got.double().cpu() - ref).abs() / (ref.abs() + 1)).max() < tol

    k, inter = (256 if quantized == "dense-split" else 128), 192
    x = torch.randn(33, k, generator=gen).to(DEVICE, dtype)
    xd = x.double().cpu()
    # o/down: + residual, then the next layer's RMSNorm
    w_o, ref_o = weight(k, k)
    residual = torch.randn(33, k, generator=gen).to(DEVICE, dtype)
    norm_w = torch.rand(k, generator=gen).to(DEVICE, dtype)
    hidden, normed = _rows_invariant(lambda t: torch.cat(linear_residual_norm(
        t, w_o, residual[: t.shape[0]].contiguous(), norm_w, 1e-5), dim=1), x).split(k, dim=1)
    ref_hidden = xd @ ref_o.T + residual.double().cpu()
    close(hidden, ref_hidden)
    close(normed, ref_hidden * torch.rsqrt(ref_hidden.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w.double().cpu())
    # gate/up stacked: silu(gate) · up
    w_gu, ref_gu = weight(2 * inter, k)
    got = _rows_invariant(lambda t: gate_up_silu(t, w_gu), x)
    ref = xd @ ref_gu.T
    close(got, torch.nn.functional.silu(ref[:, :inter]) * ref[:, inter:])
    # qkv stacked: RoPE on q and k, k and v written into the cache at start + row
    heads, kv_heads, d, slots, start = 2, 1, 64, 80, 20
    w_qkv, ref_qkv = weight((heads + 2 * kv_heads) * d, k)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).to(DEVICE)
    keys = torch.zeros(kv_heads, slots, d, dtype=dtype, device=DEVICE)
    values = torch.zeros_like(keys)
    where = torch.tensor([start], device=DEVICE)
    q = _rows_invariant(lambda t: qkv_rope_store(t, w_qkv, keys, values, where, inv_freq, 1.0, heads), x[:9])
    plain = xd[:9] @ ref_qkv.T
    angle = (start + torch.arange(9)).double()[:, None] * inv_freq.double().cpu()[None]
    cos, sin = torch.cat([angle.cos()] * 2, 1), torch.cat([angle.sin()] * 2, 1)

    def rotate(v):
        return v * cos + torch.cat([-v[:, d // 2:], v[:, : d // 2]], 1) * sin

    close(q[:, :d], rotate(plain[:, :d]))
    close(q[:, d:], rotate(plain[:, d: 2 * d]))
    close(keys[0, start: start + 9], rotate(plain[:, 2 * d: 3 * d]))
    close(values[0, start: start + 9], plain[:, 3 * d:])
    assert not keys[0, :start].any() and not keys[0, start + 9:].any()


def _attention_inputs(start: int, heads=4, kv_heads=2, d=32, slots=600, dtype=torch.bfloat16):
    """A cache of `slots` positions (the first 3 prompt padding), 33 query rows, row 0 at `start`."""
    gen = torch.Generator().manual_seed(7)
    keys = torch.randn(kv_heads, slots, d, generator=gen).to(DEVICE, dtype)
    values = torch.randn(kv_heads, slots, d, generator=gen).to(DEVICE, dtype)
    valid = torch.ones(slots, dtype=torch.uint8, device=DEVICE)
    valid[:3] = 0                        # left padding of the prompt
    q = torch.randn(33, heads * d, generator=gen).to(DEVICE, dtype)
    return q, keys, values, valid, torch.tensor([start], device=DEVICE)


ATTENTION_SHAPES = ["", "merge=combine", "split=64", "split=64,merge=combine,block_m=16,block_n=32,stages=1",
                    "block_n=128,warps=8,stages=3"]


@pytest.mark.parametrize("config", ATTENTION_SHAPES)
def test_attention_is_row_invariant_and_right(config):
    """The step's launch shape and others (`attention.Config`: 64-slot chunks merge 10 chunks, 16-row tiles
    give 33 rows three of them), merged by ticket in one launch and by a second launch."""
    from workers.engine.kernels.attention import parse_config
    heads, kv_heads, d, slots, start = 4, 2, 32, 600, 530
    q, keys, values, valid, where = _attention_inputs(start, heads, kv_heads, d, slots)
    out = _rows_invariant(lambda t: attention(t, keys, values, valid, where, parse_config(config)), q)
    qf = q.double().view(33, heads, d)
    kf = keys.double().repeat_interleave(heads // kv_heads, 0)
    vf = values.double().repeat_interleave(heads // kv_heads, 0)
    scores = torch.einsum("mhd,hsd->hms", qf, kf) / d ** 0.5
    pos = start + torch.arange(33, device=DEVICE)
    see = (torch.arange(slots, device=DEVICE)[None] <= pos[:, None]) & valid.bool()[None]
    ref = torch.einsum("hms,hsd->mhd", scores.masked_fill(~see[None], float("-inf")).softmax(-1), vf)
    assert (out.double() - ref.reshape(33, -1)).abs().max() < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 9, 33])
def test_ticket_merge_matches_combine_bit_for_bit(rows, dtype):
    """Row 0 at 300 with 64-slot chunks: both row tiles reach 6 of the 10 chunks. The ticket's merge (the last
    partial program) and the combine launch share one merge, so the bits must be the same; float32 output
    shows every bit of the merge, which bf16 rounding hides."""
    from workers.engine.kernels.attention import parse_config
    q, keys, values, valid, where = _attention_inputs(300, dtype=dtype)
    q = q[:rows].contiguous()
    ticket = attention(q, keys, values, valid, where, parse_config("split=64"))
    combine = attention(q, keys, values, valid, where, parse_config("split=64,merge=combine"))
    assert torch.equal(ticket, combine)


def test_ticket_merge_leaves_its_tickets_at_zero():
    """A launch must hand the next one (next layer, graph replay) zeroed tickets, and run again the same."""
    from workers.engine.kernels import attention as attention_module
    config = attention_module.parse_config("merge=ticket")
    q, keys, values, valid, where = _attention_inputs(530)
    first = attention(q, keys, values, valid, where, config)
    tickets = attention_module.ticket_buffer(q.device, 1)
    assert tickets.numel() >= 4 * 2 and not tickets.any()      # 4 heads × 2 row tiles
    assert torch.equal(attention(q, keys, values, valid, where, config), first)


def test_attention_config_is_checked():
    from workers.engine.kernels.attention import parse_config
    assert parse_config(" split=64, merge=combine ").split == 64
    for bad, why in (("merge=tree", "merge must be"), ("split=96", "block_n"), ("block_m=8", "block_m"),
                     ("warps=3", "warps"), ("slots=4", "expected key=value"), ("split=x", "whole number")):
        with pytest.raises(ValueError, match=why):
            parse_config(bad)


def test_rmsnorm():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, 80, generator=gen).to(DEVICE)
    w = torch.rand(80, generator=gen).to(DEVICE)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(rmsnorm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(rmsnorm(x[:1].contiguous(), w, 1e-5), rmsnorm(x, w, 1e-5)[:1])


# --- the step model --------------------------------------------------------------------------------------


def tiny(dtype) -> LlamaForCausalLM:
    torch.manual_seed(11)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2)
    return LlamaForCausalLM(config).eval().to(device=DEVICE, dtype=dtype)


def exact(model) -> ExactStepModel:
    return ExactStepModel(model, max_cache_len=64, buckets=(1, 2, 3, 5, 9), use_graphs=DEVICE == "cuda")


def prompt():
    return {"input_ids": torch.tensor([PROMPT], device=DEVICE)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_and_verification_logits_are_bit_identical(dtype):
    model = exact(tiny(dtype))
    decode = TokenEngine(model)
    decode.start(prompt())
    decoded_logits = []
    for _ in range(12):
        decode.step()
        decoded_logits.append(decode.last_output.logits[0])
    tokens = list(decode.tokens)
    # the same positions, verified in windows of every bucket size: every row's logits bit for bit
    for k in (1, 2, 4, 8):
        verify = TokenEngine(model)
        verify.start(prompt())
        pos = 0
        while pos + k < len(tokens):
            accepted, _ = verify.verify(tokens[pos + 1: pos + 1 + k])
            assert accepted == k, f"k={k}: the engine's own greedy tokens were rejected at {pos}"
            for row in range(k + 1):
                if pos + row < len(decoded_logits):
                    assert torch.equal(verify.last_output.logits[row], decoded_logits[pos + row]), (k, pos, row)
            pos += k + 1
    # a rebase that feeds several committed tokens at once lands on the same next token and logits
    rebased = TokenEngine(model)
    rebased.start(prompt())
    rebased.rebase(tokens[:7])
    assert rebased.tokens[:8] == tokens[:8]
    assert torch.equal(rebased.last_output.logits[-1], decoded_logits[6])


def test_exact_step_follows_transformers():
    model = tiny(torch.float32)
    reference = TokenEngine(HFStepModel(model))
    reference.start(prompt())
    step = exact(model)
    # bytes a step reads: K and V of 2 layers × 2 KV heads × 16 dims in float32 per position; every
    # projection and the head once
    sizes = step.step_bytes()
    assert sizes["kv_per_position"] == 2 * 2 * 2 * 16 * 4
    assert sizes["weights"] == 4 * sum(m.weight.numel() for n, m in model.named_modules()
                                       if isinstance(m, torch.nn.Linear))
    ours = TokenEngine(step)
    ours.start(prompt())
    for _ in range(10):
        assert ours.step() == reference.step()
        torch.testing.assert_close(ours.last_output.logits, reference.last_output.logits, rtol=1e-4, atol=1e-4)


def _fed_without_prefill(step, ids):
    """An engine over `step` that fed `ids` through the step kernels (no transformers prefill)."""
    engine = TokenEngine(step)
    step._prefilled, step.kv_len = True, 0
    with torch.inference_mode():
        step._valid.fill_(True)
        step._valid_u8.fill_(1)
    engine.seq.prompt_len, engine.seq.tokens = 0, [ids[0]]
    engine.rebase(ids)
    return engine


def test_nf4_step_follows_the_dense_step_on_the_dequantized_weights():
    """A LLaMA whose projections are NF4 (our quantizer standing in for bitsandbytes' Params4bit): the
    exact step reads the packed bytes and looks the values up in registers, so it follows the dense step
    over the dequantized weights (to rounding: it keeps code · absmax in float32 and sums K in another
    order), and its own decode equals its verification bit for bit."""
    quantized, dense = tiny(torch.float32), tiny(torch.float32)

    class QuantState:
        quant_type, blocksize, nested = "nf4", 64, False

    class Params4bit(torch.nn.Parameter):
        pass

    for (name, mod), dense_mod in zip(quantized.named_modules(), dense.modules()):
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            packed, absmax = nf4.quantize(mod.weight.data.float().cpu())
            dense_mod.weight.data = nf4.dequantize(packed, absmax, *mod.weight.shape, torch.float32).to(DEVICE)
            param = Params4bit(packed.reshape(-1, 1).to(DEVICE), requires_grad=False)
            param.quant_state = QuantState()
            param.quant_state.absmax, param.quant_state.code = absmax.to(DEVICE), nf4.code_tensor(DEVICE)
            mod.weight = param
    step_q, step_d = exact(quantized), exact(dense)
    assert step_q.layers_w[0].qkv.nf4 and not step_q.head.nf4 and not step_d.layers_w[0].qkv.nf4
    # the modules' parameters became views of the stacked bytes: no weight is held twice
    k_proj = quantized.model.layers[0].self_attn.k_proj.weight
    assert k_proj.data_ptr() > step_q.layers_w[0].qkv.packed.data_ptr()
    engine_q, engine_d = _fed_without_prefill(step_q, PROMPT), _fed_without_prefill(step_d, PROMPT)
    torch.testing.assert_close(engine_q.last_output.logits, engine_d.last_output.logits, rtol=1e-4, atol=1e-4)
    for _ in range(6):
        assert engine_q.step() == engine_d.step()
        torch.testing.assert_close(engine_q.last_output.logits, engine_d.last_output.logits, rtol=1e-4, atol=1e-4)
    again = _fed_without_prefill(step_q, engine_q.tokens[:-1])
    assert again.tokens == engine_q.tokens
    assert torch.equal(again.last_output.logits[-1], engine_q.last_output.logits[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes NF4 needs CUDA")
def test_nf4_kernel_dequantizes_bitsandbytes_weights_exactly():
    bnb = pytest.importorskip("bitsandbytes")
    n, k = 256, 1024
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(n, k, dtype=torch.bfloat16), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4").to("cuda")
    packed, absmax, code = nf4.unpack_bnb(layer.weight)
    eye = torch.eye(k, dtype=torch.bfloat16, device="cuda")
    theirs = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    # the rows kernel: code · absmax in float32, rounded once, as bitsandbytes does
    rows = Weight(n, k, packed=packed, absmax=absmax, code=code, nf4_kernel="rows")
    ours = torch.cat([linear(eye[i: i + 32].contiguous(), rows) for i in range(0, k, 32)]).T
    assert torch.equal(ours, theirs.to(torch.bfloat16))
    # the tensor-core kernel: the code rounded to bf16 first (an MMA operand), then · absmax in float32
    cores = Weight(n, k, packed=packed, absmax=absmax, code=code)
    if cores.tensor_cores:
        ours = torch.cat([linear(eye[i: i + 32].contiguous(), cores) for i in range(0, k, 32)]).T
        q = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1).long()
        expected = (code.to(torch.bfloat16).float()[q].reshape(-1, 64) * absmax[:, None]).reshape(n, k)
        assert torch.equal(ours, expected.to(torch.bfloat16))
        assert ((ours.float() - theirs.float()).abs() <= theirs.float().abs() * 2 ** -7 + 1e-30).all()


def test_dense_splits_fill_an_h200_evenly():
    """132 SMs, 2 programs each: o, down and the head keep 4, 4, 1 splits; qkv (192 tiles of 64 rows) and
    gate/up (344) split so the last round of programs idles few SMs."""
    from workers.engine.kernels.linear import balanced_splits
    assert [balanced_splits(tiles, k_blocks, 132) for tiles, k_blocks in
            ((64, 32), (64, 86), (500, 32), (192, 32), (344, 32))] == [4, 4, 1, 4, 3]
    assert balanced_splits(10, 1, 132) == 1                     # never more splits than K blocks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes NF4 needs CUDA")
@pytest.mark.parametrize("kind", ["eventgpt", "videollava"])
def test_prefill_reads_tile_major_nf4_bytes_as_bitsandbytes_did(kind):
    """The exact step lays the NF4 bytes out tile-major; transformers' forward (prefill) then dequantizes
    them itself and must give bitsandbytes' logits bit for bit. A second step model over the same modules
    (a grown KV cache) reuses the tile-major weights and decodes the same tokens."""
    pytest.importorskip("bitsandbytes")
    from workers.engine.kernels import nf4_cuda
    from workers.models.synthetic import synthetic_model, synthetic_prefill_inputs
    lm = synthetic_model(kind, size="tiny-test", precision="nf4", device="cuda", seed=3)
    prompt, prompt_len = synthetic_prefill_inputs(lm)
    with torch.inference_mode():
        before = lm.model(**prompt).logits.clone()
    step = ExactStepModel(lm.model, max_cache_len=prompt_len + 40, buckets=(1, 2, 5))
    qkv = step.layers_w[0].qkv
    if not qkv.tensor_cores:
        pytest.skip(f"NF4 CUDA kernel unavailable: {qkv.nf4_kernel_note}")
    assert qkv.tile_major == bool(nf4_cuda.CONFIG.layout)
    with torch.inference_mode():
        after = lm.model(**prompt).logits
    assert torch.equal(after, before)
    engine = TokenEngine(step)
    engine.start(prompt)
    tokens = [engine.step() for _ in range(8)]
    again = ExactStepModel(lm.model, max_cache_len=prompt_len + 80, buckets=(1, 2, 5))
    assert again.layers_w[0].qkv is qkv
    engine2 = TokenEngine(again)
    engine2.start(prompt)
    assert [engine2.step() for _ in range(8)] == tokens


def test_tile_major_modules_compute_their_own_rows_and_are_stacked_once():
    """Once a stacked NF4 weight is tile-major, each module's forward (transformers' prefill) multiplies by
    its own rows dequantized from the stacked bytes, and stacking the same modules again (a step model
    rebuilt for a larger cache) returns the same weight instead of reading the bytes as bitsandbytes' rows."""
    from workers.engine.exact import _read_tile_major, _stack
    from workers.engine.kernels import nf4_cuda

    class QuantState:
        quant_type, blocksize, nested = "nf4", 64, False

    class Params4bit(torch.nn.Parameter):
        pass

    k, sizes = 128, (32, 24, 24)                          # q, k, v: the second module starts mid-tile
    gen = torch.Generator().manual_seed(2)
    dense = [torch.randn(n, k, generator=gen) for n in sizes]
    modules, parts = [], []
    for w in dense:
        packed, absmax = (t.to(DEVICE) for t in nf4.quantize(w))
        mod = torch.nn.Linear(k, w.shape[0], bias=False, device=DEVICE)
        param = Params4bit(packed.reshape(-1, 1), requires_grad=False)
        param.quant_state = QuantState()
        param.quant_state.absmax, param.quant_state.code = absmax, nf4.code_tensor(DEVICE)
        mod.weight = param
        modules.append(mod)
        parts.append((packed, absmax))
    n = sum(sizes)
    packed = torch.cat([p for p, _ in parts])
    weight = Weight(n, k, packed=packed, absmax=torch.cat([a for _, a in parts]), code=nf4.code_tensor(DEVICE),
                    nf4_kernel="rows")
    weight.absmax = nf4_cuda.tile_absmax(weight.absmax, n, k)     # what the tensor-core path keeps
    weight.packed, weight.tile_major = nf4_cuda.tile_packed(packed, n, k), True
    _read_tile_major(modules, weight)
    x = torch.randn(3, k, generator=gen).to(DEVICE, torch.bfloat16)
    for mod, (p, a) in zip(modules, parts):
        rows = nf4.dequantize(p, a, mod.out_features, k, torch.bfloat16)
        assert torch.equal(mod(x), torch.nn.functional.linear(x, rows))
    assert _stack(modules) is weight
    with pytest.raises(ValueError, match="stacked differently"):
        _stack(modules[:2])


def test_nf4_scales_option_is_checked_before_anything_is_built():
    """`nf4_scales` (`--draft-option nf4_scales=bytes`) takes float32 or bytes; anything else is refused by the
    step model and by the backend, with the option's name, before a weight is touched."""
    from workers.backends.videollava import VideoLlavaBackend
    with pytest.raises(ValueError, match="nf4_scales must be one of float32, bytes; got 'float16'"):
        ExactStepModel(object(), nf4_scales="float16", max_cache_len=8)
    backend = VideoLlavaBackend("draft", {"nf4_scales": "half"})
    with pytest.raises(ValueError, match="--draft-option nf4_scales=half: expected one of float32, bytes"):
        backend._nf4_scales()
    assert VideoLlavaBackend("target", {"nf4_scales": "bytes"})._nf4_scales() == "bytes"
    assert VideoLlavaBackend("target", {})._nf4_scales() == "float32"
