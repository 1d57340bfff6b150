"""Programmatic dependent launch (`EVENTSPEC_PDL=1`) changes when the step's kernels start, never what they
compute: the exact step's logits with it on are bit for bit those with it off (GPU, compute capability 9+)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
import numpy as np
import torch
sys.path.insert(0, sys.argv[2])
from transformers import LlamaConfig, LlamaForCausalLM
from workers.engine.exact import ExactStepModel
from workers.engine.kernels import pdl_on

torch.manual_seed(11)
dq = sys.argv[3] == "nf4dq"        # double-quantized scales: every module's blocks whole groups of 256
config = LlamaConfig(vocab_size=96, hidden_size=256 if dq else 64, intermediate_size=512 if dq else 128,
                     num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     initializer_range=0.2)
model = LlamaForCausalLM(config).eval().to(device="cuda", dtype=torch.bfloat16)
if sys.argv[3] in ("nf4", "nf4dq"):   # NF4 projections (our quantizer standing in for bitsandbytes' Params4bit)
    from workers.engine import nf4

    class QuantState:
        quant_type, blocksize, nested = "nf4", 64, False

    class Params4bit(torch.nn.Parameter):
        pass

    code2 = torch.sort(torch.rand(256)).values.cuda()      # one second-level code for all, as bitsandbytes has
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            packed, absmax = nf4.quantize(mod.weight.data.float().cpu())
            param = Params4bit(packed.reshape(-1, 1).cuda(), requires_grad=False)
            param.quant_state = QuantState()
            param.quant_state.absmax, param.quant_state.code = absmax.cuda(), nf4.code_tensor("cuda")
            if dq:                  # bitsandbytes' double quantization: absmax = code2[q] * absmax2[i // 256] + offset
                blocks = absmax.numel()
                nested = QuantState()
                nested.code = code2
                nested.absmax = (absmax.reshape(-1, 256).amax(1) * 0.5).cuda()
                nested.blocksize = 256
                param.quant_state = QuantState()
                param.quant_state.nested, param.quant_state.state2 = True, nested
                param.quant_state.absmax = torch.randint(0, 256, (blocks,), dtype=torch.uint8).cuda()
                param.quant_state.offset = torch.tensor(float(absmax.mean())).cuda()
                param.quant_state.code = nf4.code_tensor("cuda")
            mod.weight = param
scales = sys.argv[4] if len(sys.argv) > 4 else "float32"
step = ExactStepModel(model, max_cache_len=96, buckets=(1, 2, 5, 9), use_graphs=True, nf4_scales=scales)
step.prefill({"input_ids": torch.tensor([[1, 5, 9, 22, 40, 7]], device="cuda")})
rows = [step.forward([20 + i]).logits for i in range(6)]                     # decode steps
rows.append(step.forward(list(range(10, 18))).logits)                        # a verification of 8
out = torch.cat(rows).float().cpu().numpy()
np.save(sys.argv[1], out)
print("pdl", pdl_on(torch.device("cuda")), "kernel", step.layers_w[0].qkv.kernel,
      "dq", all(w.dq is not None for layer in step.layers_w for w in (layer.qkv, layer.o, layer.gate_up, layer.down)))
"""


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a GPU of compute capability 9.0 or newer")
@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_programmatic_dependent_launch_keeps_every_bit(tmp_path, precision):
    """nf4: the NF4 CUDA kernel too, launched through `cuda_launch.launch` and reading its weights before it
    waits for the kernel ahead."""
    outputs = {}
    for pdl in ("0", "1"):
        path = tmp_path / f"logits-{pdl}.npy"
        env = dict(os.environ, EVENTSPEC_PDL=pdl)
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(ROOT), precision], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"pdl {pdl == '1'}" in done.stdout
        if precision == "nf4":
            assert "kernel nf4-cuda" in done.stdout
        outputs[pdl] = np.load(path, allow_pickle=False)
    assert outputs["0"].shape == (14, 96)
    assert np.array_equal(outputs["0"], outputs["1"])


def test_launch_structures_follow_cuda_h():
    """`cuda_launch`'s ctypes structures have cuda.h's layout (CUDA 12+, 64-bit): CUlaunchAttribute is 72
    bytes with its value at 8, CUlaunchConfig 56 bytes with the stream at 32, the attributes at 40 and their
    count at 48; the attribute asks for programmatic stream serialization with the value 1."""
    import ctypes
    from workers.engine.kernels import cuda_launch as c
    assert ctypes.sizeof(c.LaunchAttribute) == 72 and c.LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(c.LaunchConfig) == 56
    assert (c.LaunchConfig.stream.offset, c.LaunchConfig.attrs.offset, c.LaunchConfig.num_attrs.offset) == (32, 40, 48)
    config, attr = c.pdl_config((3, 2, 1), (256, 1, 1), 50_000, 0x1234)
    assert (config.grid_x, config.grid_y, config.block_x, config.shared_bytes, config.num_attrs) == (3, 2, 256, 50_000, 1)
    assert config.stream == 0x1234
    assert config.attrs.contents.id == 6
    assert ctypes.c_int.from_buffer(config.attrs.contents, 8).value == 1


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                    reason="the NF4 tensor-core kernel needs a CUDA GPU")
def test_double_quantized_scales_read_in_the_kernel_keep_every_bit(tmp_path):
    """The kernel reading bitsandbytes' double-quantized scale bytes (and computing each absmax as bitsandbytes
    does), asked for by `nf4_scales=bytes` or `EVENTSPEC_NF4_CUDA=dq=1`, gives the step the logits of the
    float32 scales expanded once, bit for bit."""
    outputs = {}
    for name, dq, scales in (("float32", "0", "float32"), ("option", "0", "bytes"), ("env", "1", "float32")):
        path = tmp_path / f"logits-{name}.npy"
        env = dict(os.environ, EVENTSPEC_NF4_CUDA=f"dq={dq}")
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(ROOT), "nf4dq", scales], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "kernel nf4-cuda" in done.stdout and f"dq {name != 'float32'}" in done.stdout, done.stdout
        outputs[name] = np.load(path, allow_pickle=False)
    assert outputs["float32"].shape == (14, 96) and np.isfinite(outputs["float32"]).all()
    assert np.array_equal(outputs["float32"], outputs["option"]) and np.array_equal(outputs["float32"], outputs["env"])
