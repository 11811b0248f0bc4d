"""Data scaling (DDPM section 3.3): 8-bit pixels 0..255 <-> the model's range [-1, 1].

The only two conversions between stored pixels and what the networks see; the likelihood's
discretized decoder relies on the same 256-level grid.
"""

from __future__ import annotations

import torch


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float in [-1, 1]: ``x = p / 127.5 - 1``."""
    return images.float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] -> uint8 pixels, rounded and clamped; inverts :func:`to_model_range` exactly."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
