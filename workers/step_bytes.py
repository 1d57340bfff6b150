"""What one decode step of a loaded model must read: the bytes of the weights it streams and the K/V bytes
per cache position, for the bench's bandwidth floor (coordinator.floor turns them into milliseconds).

Counted from the tensors actually in memory: the decoder layers, the final norm and the output head (each
tensor once, so tied weights count once); the input embedding is left out (a step gathers one row of it) and
so are the vision tower and projectors (prefill only). A bitsandbytes 4-bit weight counts its packed bytes
plus its quantisation state (absmax, nested absmax and codebooks). A step model that keeps its weights in
its own form (ExactStepModel: NF4 absmax expanded to float32) reports what its kernels read, and that
wins. Imports torch: worker processes only.
"""
from __future__ import annotations


def _quant_state_bytes(param) -> int:
    """Bytes of a bitsandbytes Params4bit quantisation state (absmax, its own nested state, codebooks)."""
    state = getattr(param, "quant_state", None)
    total, seen = 0, set()
    while state is not None and id(state) not in seen:
        seen.add(id(state))
        for name in ("absmax", "code", "offset"):
            tensor = getattr(state, name, None)
            if hasattr(tensor, "element_size") and hasattr(tensor, "numel"):
                total += int(tensor.numel()) * int(tensor.element_size())
        state = getattr(state, "state2", None)
    return total


def weight_bytes(modules) -> tuple[int, int, int]:
    """(bytes, of which quantisation state, parameter count) of the parameters of `modules`, each tensor once."""
    seen, total, quant, count = set(), 0, 0, 0
    for module in modules:
        for param in module.parameters():
            key = (param.data_ptr(), param.numel()) if param.device.type != "meta" else id(param)
            if key in seen:
                continue
            seen.add(key)
            total += int(param.numel()) * int(param.element_size())
            extra = _quant_state_bytes(param)
            quant += extra
            total += extra
            count += int(param.numel())
    return total, quant, count


def describe_step_bytes(model, step_model=None) -> dict:
    """READY's `step_bytes`: weights read per step and the K/V geometry (bytes per cache position)."""
    from workers.engine.fast import decoder_and_head

    decoder = decoder_and_head(model)
    modules = list(decoder.layers) + [decoder.norm, decoder.lm_head]
    total, quant, count = weight_bytes(modules)
    config = decoder.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_dtype_bytes = int(decoder.embed_tokens.weight.element_size())   # activations, so K/V, have this dtype
    slots = None
    kv = getattr(step_model, "kv", None)
    keys = getattr(kv, "keys", None)
    if keys:
        slots = int(keys[0].shape[2])
    out = {"weight_bytes": total, "quant_state_bytes": quant, "step_parameters": count,
           "layers": len(decoder.layers), "kv_heads": kv_heads, "head_dim": head_dim,
           "kv_dtype_bytes": kv_dtype_bytes,
           "kv_bytes_per_position": 2 * len(decoder.layers) * kv_heads * head_dim * kv_dtype_bytes,
           "cache_slots": slots, "counted_by": "module parameters"}
    own = getattr(step_model, "step_bytes", None)
    if callable(own):      # a step model that holds its weights in its own form (ExactStepModel) knows best
        mine = own()
        out.update(module_weight_bytes=total, weight_bytes=int(mine["weights"]),
                   kv_bytes_per_position=int(mine["kv_per_position"]), counted_by=type(step_model).__name__)
        if mine.get("weights_as_stored") is not None:     # NF4: bitsandbytes' scales as stored, not as read
            out["weight_bytes_as_stored"] = int(mine["weights_as_stored"])
        if mine.get("kernel"):
            out["matmul_kernel"] = mine["kernel"]       # dense-mma, nf4-cuda or nf4-rows
    return out
