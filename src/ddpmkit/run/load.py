"""Opening a run directory: its config and the latest checkpoint's weights as a Denoiser.

The one loader behind `ddpmkit sample`, `eval`, `animate` and `serve`.
"""

from __future__ import annotations

from pathlib import Path

from ddpmkit.core.denoiser import Denoiser
from ddpmkit.errors import DdpmkitError
from ddpmkit.run import build, checkpoint
from ddpmkit.run.config import RunConfig


def load_denoiser(run_dir: Path, device="cpu", which: str = "ema") -> tuple[RunConfig, Denoiser]:
    """The run's config and its denoiser with the latest checkpoint's `which` weights (ema or model)."""
    config = checkpoint.load_config(run_dir)
    ckpt = checkpoint.latest_checkpoint(run_dir)
    if ckpt is None:
        raise DdpmkitError(f"{run_dir} has no complete checkpoint yet; train it first")
    checkpoint.load_state(ckpt, config)  # checks the format version
    net = build.net(config)
    checkpoint.load_weights(net, ckpt / f"{which}.safetensors")
    return config, build.denoiser(config, net.to(device).eval())
