"""A request's result record from the coordinator's state and the workers' DONE accounts.

Pure: the request state, the DONE messages' spans/stats and three stamps in, a plain dict out (wall,
TTFT, per-model prefill/decode, acceptance). Never imports torch, never talks to a socket.
"""
from __future__ import annotations

from .spec import RequestState


def measure_request(state: RequestState, dones: dict, start_ns: int, end_ns: int, ttft_ns, mode) -> dict:
    """The record's numbers for one finished (or failed) request; missing values are None."""
    spans = {role: done.spans for role, done in dones.items()}

    def total(role, *names):
        picked = [(e - s) for n, s, e, _ in spans.get(role, []) if n in names]
        return sum(picked) / 1e6 if picked else None

    def count(role, *names):
        return sum(1 for n, *_ in spans.get(role, []) if n in names)

    def end_of(role, name):
        ends = [e for n, s, e, _ in spans.get(role, []) if n == name]
        return max(ends) if ends else None

    out_ids = state.output
    rec = {
        "output_ids": out_ids,
        "text": dones["target"].stats.get("text") if "target" in dones else None,
        "committed_ids": list(state.committed),
        "wall_ms": (end_ns - start_ns) / 1e6,
        "ttft_ms": (ttft_ns - start_ns) / 1e6 if ttft_ns else None,
        "request_start_ns": start_ns,
        "request_end_ns": end_ns,
    }
    target_steps = count("target", "decode", "verify")
    target_decode_ms = total("target", "decode", "verify")
    rec["target"] = {
        "load_ms": total("target", "load_inputs"),
        "prefill_ms": total("target", "prefill"),
        "decode_ms": target_decode_ms,
        "hf_generate_ms": total("target", "hf_generate"),
        "tokens": len(out_ids),
        "forward_passes": target_steps,
        "ms_per_token": (target_decode_ms / max(1, len(state.committed) - 1)) if target_steps else None,
        "prompt_len": dones.get("target").stats.get("prompt_len") if "target" in dones else None,
        "memory": dones["target"].stats.get("memory") if "target" in dones else None,
    }
    if "draft" in dones:
        steps = count("draft", "draft_step")
        draft_decode_ms = total("draft", "draft_step")
        rec["draft"] = {
            "load_ms": total("draft", "load_inputs"),
            "prefill_ms": total("draft", "prefill"),
            "decode_ms": draft_decode_ms,
            "tokens": steps + 1 if total("draft", "prefill") is not None else 0,   # 0: it stood aside
            "ms_per_token": draft_decode_ms / steps if steps else None,
            "rebase_ms": total("draft", "rebase"),
            "prompt_len": dones["draft"].stats.get("prompt_len"),
            "memory": dones["draft"].stats.get("memory"),
        }
        draft_ready = end_of("draft", "prefill")
        target_ready = end_of("target", "prefill")
        rec["overlap_window_ms"] = (max(0, target_ready - draft_ready) / 1e6
                                    if draft_ready and target_ready else None)
    else:
        rec["draft"] = None
        rec["overlap_window_ms"] = None
    spec = mode in ("parallel", "speculative")
    rec.update({
        "free_draft_tokens": state.free_draft_tokens if spec else None,
        "drafted_tokens": state.drafted if spec else None,
        "accepted_tokens": state.accepted if spec else None,
        "acceptance_rate": (state.accepted / state.drafted if state.drafted else None) if spec else None,
        "verify_rounds": state.rounds if spec else None,
        "mean_acceptance_length": (1 + state.accepted / state.rounds if state.rounds else None) if spec else None,
        "verify_ms": (total("target", "verify") or 0.0) if spec else None,
        "verify_rounds_detail": state.per_round if spec else None,
        "draft_alpha_estimate": state.alpha_estimate if spec else None,
    })
    return rec


def draft_alone_timing(spans: list) -> dict:
    """The draft's uncontended step and prefill times from its DONE spans."""
    steps_ms = [(e - s) / 1e6 for n, s, e, _ in spans if n == "draft_step"]
    prefill_ms = [(e - s) / 1e6 for n, s, e, _ in spans if n == "prefill"]
    return {"draft_step_ms": steps_ms, "prefill_ms": prefill_ms[0] if prefill_ms else None}
