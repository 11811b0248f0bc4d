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
