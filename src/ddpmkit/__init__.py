"""ddpmkit: denoising diffusion models you can read, train, sample and evaluate."""

__version__ = "0.1.0"
