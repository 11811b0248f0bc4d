"""What --precision auto means on a CPU: bf16 only where the CPU computes it natively."""

import pytest
import torch

from ddpmkit.core.precision import resolve_precision


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected",
    [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")],
)
def test_auto_is_bf16_only_with_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    """An AVX-512 CPU without BF16 (oneDNN would emulate bf16 there, slower than fp32) gets fp32."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # AVX-512: oneDNN says yes
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"


def test_auto_is_fp32_where_onednn_is_limited_to_avx2(monkeypatch):
    """A CPU with the instructions but oneDNN limited below them (ONEDNN_MAX_CPU_ISA=AVX2, how bench/
    measures an AVX2-only machine) has no native bf16 for the convolutions: auto is fp32."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto", "cpu") == "fp32"


def test_the_isa_limit_reaches_auto_in_a_real_process():
    import os
    import subprocess
    import sys

    code = "from ddpmkit.core.precision import resolve_precision; print(resolve_precision('auto', 'cpu'))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fp32"
