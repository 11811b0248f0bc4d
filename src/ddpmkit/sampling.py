"""Compatibility: the names of the former `ddpmkit.sampling`, which now live in `ddpmkit.run`."""

from ddpmkit.run.load import load_denoiser
from ddpmkit.run.sampling import check_guidance, default_labels, generate

__all__ = ["check_guidance", "default_labels", "generate", "load_denoiser"]
