"""Compatibility: the former `ddpmkit.denoiser`, now `ddpmkit.core.denoiser`."""

from ddpmkit.core.denoiser import Denoiser, Prediction

__all__ = ["Denoiser", "Prediction"]
