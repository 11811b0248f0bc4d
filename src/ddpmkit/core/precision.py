"""Mixed precision: what "auto" means on this hardware, and the autocast context for a precision."""

from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device) -> str:
    """ "auto" is bf16 where the hardware computes it natively (AVX-512 BF16/AMX CPUs, Ampere+ GPUs)."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def autocast(device, precision: str):
    """torch.autocast in bf16/fp16 (weights stay fp32), or nothing for fp32."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
