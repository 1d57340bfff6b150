"""What a worker reports for the bench's floor: step bytes counted from a real (tiny) model, the bandwidth
probe on the CPU, and the 4-bit quantisation state counted with the weight."""
import torch

from tests.engine_support import tiny_llama
from workers.bandwidth import measure_read_bandwidth, measure_tensors
from workers.engine.fast import CudaGraphStepModel
from workers.step_bytes import describe_step_bytes, weight_bytes


def test_step_bytes_of_a_tiny_llama():
    model = tiny_llama(0)
    step = CudaGraphStepModel(model, max_cache_len=64, buckets=(1, 2, 4), use_graphs=False)
    info = describe_step_bytes(model, step)
    cfg = model.config
    q_o = 2 * 48 * 48                       # q_proj, o_proj
    k_v = 2 * 48 * (2 * 12)                 # 2 kv heads of head_dim 12
    mlp = 3 * 48 * 96
    norms = 2 * 48
    layer = q_o + k_v + mlp + norms
    expected_params = cfg.num_hidden_layers * layer + 48 + 96 * 48      # + final norm + lm_head
    assert info["step_parameters"] == expected_params
    assert info["weight_bytes"] == 4 * expected_params and info["quant_state_bytes"] == 0
    assert info["kv_bytes_per_position"] == 2 * 2 * 2 * 12 * 4       # K and V, 2 layers, 2 heads, 12 dims, fp32
    assert info["cache_slots"] >= 64


def test_tied_weights_count_once_and_quant_state_counts():
    model = tiny_llama(0)
    once, _, n = weight_bytes([model.lm_head, model.model.embed_tokens])
    model.lm_head.weight = model.model.embed_tokens.weight
    tied, _, n_tied = weight_bytes([model.lm_head, model.model.embed_tokens])
    assert tied == once // 2 and n_tied == n // 2

    class State:                        # the shape of a bitsandbytes QuantState with a nested state
        def __init__(self, absmax, state2=None):
            self.absmax, self.state2, self.code = absmax, state2, torch.zeros(16)

    packed = torch.nn.Parameter(torch.zeros(64 * 64 // 2, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = State(torch.zeros(64, dtype=torch.uint8), State(torch.zeros(1)))
    holder = torch.nn.Module()
    holder.weight = packed
    total, quant, _ = weight_bytes([holder])
    assert quant == 64 + 16 * 4 + 4 + 16 * 4 and total == 2048 + quant


def test_bandwidth_probe_on_the_cpu():
    for use_torch in (False, True):             # torch on a CPU device falls back to the numpy probe
        probe = measure_read_bandwidth("cpu", use_torch)
        assert probe["best_gbs"] == max(probe["read_gbs"], probe["copy_gbs"]) > 0
        assert probe["bytes"] >= 1 << 20 and "numpy" in probe["method"]


def test_torch_bandwidth_probe_runs_its_kernels():
    """The CUDA probe's own sum and copy, run on a CPU tensor (its `torch.sum(x, out=...)` once raised a
    TypeError on every GPU, which the probe swallowed: bench's measured-bandwidth column went empty)."""
    probe = measure_tensors(torch.device("cpu"), 4 << 20, repeats=2, groups=2, sync=lambda: None)
    assert probe["best_gbs"] == max(probe["read_gbs"], probe["copy_gbs"]) > 0 and "torch" in probe["method"]


def test_a_step_model_that_reports_its_own_bytes_wins():
    model = tiny_llama(0)

    class Own:
        def step_bytes(self):
            return {"weights": 123, "kv_per_position": 7}

    info = describe_step_bytes(model, Own())
    assert info["weight_bytes"] == 123 and info["kv_bytes_per_position"] == 7
    assert info["module_weight_bytes"] > 123 and info["counted_by"] == "Own"
