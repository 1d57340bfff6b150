"""The bandwidth floor of a decode step: bytes a step must read ÷ the card's memory bandwidth.

A decode or verification step of a 7B model streams every weight once and reads the K/V of every live cache
position; that takes at least bytes ÷ bandwidth. The bandwidth is the card's datasheet figure (looked up
by the name torch reports, or --bandwidth-gbs) and the best the worker measured itself on its device
(workers.bandwidth). Pure: no torch, no clocks.
"""
from __future__ import annotations

import re

# datasheet memory bandwidth, GB/s (10^9 bytes per second), by the name torch.cuda.get_device_name() reports;
# first match wins, so the more specific patterns come first
DATASHEET_GBS = (
    (r"H200", 4800.0, "NVIDIA H200 (HBM3e), 4.8 TB/s"),
    (r"H100.*(PCIe)", 2000.0, "NVIDIA H100 PCIe, 2.0 TB/s"),
    (r"H100.*NVL", 3900.0, "NVIDIA H100 NVL, 3.9 TB/s"),
    (r"H100", 3350.0, "NVIDIA H100 SXM, 3.35 TB/s"),
    (r"A100.*80GB", 2039.0, "NVIDIA A100 80GB SXM, 2.04 TB/s"),
    (r"A100", 1555.0, "NVIDIA A100 40GB, 1.56 TB/s"),
    (r"RTX 4090", 1008.0, "NVIDIA GeForce RTX 4090, 1.0 TB/s"),
    (r"RTX 3090", 936.0, "NVIDIA GeForce RTX 3090, 0.94 TB/s"),
    (r"L40S", 864.0, "NVIDIA L40S, 0.86 TB/s"),
)


def datasheet_bandwidth(card_name: str | None) -> tuple[float | None, str]:
    """(GB/s, which datasheet entry) for a card name; (None, why) when the card is unknown."""
    if not card_name:
        return None, "no CUDA device named (CPU or fake worker)"
    for pattern, gbs, label in DATASHEET_GBS:
        if re.search(pattern, card_name, re.IGNORECASE):
            return gbs, label
    return None, f"{card_name!r} is not in the datasheet table: pass --bandwidth-gbs"


def step_bytes(step: dict, positions: float) -> float | None:
    """Bytes one step reads: the streamed weights plus the K/V of `positions` live cache positions."""
    if not step or step.get("weight_bytes") is None:
        return None
    return float(step["weight_bytes"]) + float(step.get("kv_bytes_per_position") or 0) * max(0.0, positions)


def floor_ms(nbytes: float | None, gbs: float | None) -> float | None:
    if nbytes is None or not gbs:
        return None
    return nbytes / (gbs * 1e9) * 1e3


def ratio(measured: float | None, floor: float | None) -> float | None:
    return measured / floor if measured is not None and floor else None
