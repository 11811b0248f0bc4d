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
    return "bf16" if device.type == "cpu" and native_cpu_bf16() else "fp32"


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX). oneDNN also runs bf16 on AVX-512
    CPUs without it (`torch.ops.mkldnn._is_mkldnn_bf16_supported()` says yes there), by emulation that
    is slower than fp32, so that is not enough for "auto"; but it is needed: with oneDNN limited to
    AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, as bench/ does to measure an AVX2-only CPU) there is no native bf16."""
    onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # False too where ONEDNN_MAX_CPU_ISA limits it
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if avx512_bf16 is None or amx is None:  # an older torch: oneDNN's check, the best there is
        return onednn
    return onednn and bool(avx512_bf16() or amx())


def autocast(device, precision: str):
    """torch.autocast in bf16/fp16 (weights stay fp32), or nothing for fp32."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
