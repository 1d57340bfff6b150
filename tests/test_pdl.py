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
config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     initializer_range=0.2)
model = LlamaForCausalLM(config).eval().to(device="cuda", dtype=torch.bfloat16)
step = ExactStepModel(model, max_cache_len=96, buckets=(1, 2, 5, 9), use_graphs=True)
step.prefill({"input_ids": torch.tensor([[1, 5, 9, 22, 40, 7]], device="cuda")})
rows = [step.forward([20 + i]).logits for i in range(6)]                     # decode steps
rows.append(step.forward(list(range(10, 18))).logits)                        # a verification of 8
out = torch.cat(rows).float().cpu().numpy()
np.save(sys.argv[1], out)
print("pdl", pdl_on(torch.device("cuda")))
"""


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a GPU of compute capability 9.0 or newer")
def test_programmatic_dependent_launch_keeps_every_bit(tmp_path):
    outputs = {}
    for pdl in ("0", "1"):
        path = tmp_path / f"logits-{pdl}.npy"
        env = dict(os.environ, EVENTSPEC_PDL=pdl)
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(ROOT)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"pdl {pdl == '1'}" in done.stdout
        outputs[pdl] = np.load(path, allow_pickle=False)
    assert outputs["0"].shape == (14, 96)
    assert np.array_equal(outputs["0"], outputs["1"])
