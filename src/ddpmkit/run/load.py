"""Opening a run directory, which may come from someone else: untrusted input, checked before use.

The one loader behind `ddpmkit sample`, `eval`, `animate`, `train --resume` and `serve`:
config.json is bounded JSON with typed fields within their limits (checkpoint.load_config); the
network the config describes is built on the meta device (shapes, no memory) and compared with the
weights file's header (run.weights) before anything is allocated; only then are the weights read,
and the network takes the loaded tensors themselves.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ddpmkit.core.denoiser import Denoiser
from ddpmkit.errors import DdpmkitError
from ddpmkit.run import build, checkpoint, weights
from ddpmkit.run.config import RunConfig


def load_denoiser(run_dir: Path, device="cpu", which: str = "ema") -> tuple[RunConfig, Denoiser]:
    """The run's config and its denoiser with the latest checkpoint's `which` weights (ema or model)."""
    config = checkpoint.load_config(run_dir)
    ckpt = latest_checkpoint(run_dir, config)
    net = load_net(config, ckpt / f"{which}.safetensors")
    return config, build.denoiser(config, net.to(device).eval())


def latest_checkpoint(run_dir: Path, config: RunConfig | None = None) -> Path:
    """The run's latest complete checkpoint, its state.json checked (format version, fields)."""
    ckpt = checkpoint.latest_checkpoint(run_dir)
    if ckpt is None:
        raise DdpmkitError(f"{run_dir} has no complete checkpoint yet; train it first")
    checkpoint.read_state(ckpt, config)  # format and fields; a format-1 linear run at T != 1000 refused
    return ckpt


def meta_net(config: RunConfig) -> nn.Module:
    """The network the config describes, on the meta device: every shape, no memory."""
    with torch.device("meta"):
        return build.net(config)


def check_weights(config: RunConfig, path: Path) -> None:
    """Refuse a weights file that is not exactly the network `config` describes; reads the header only."""
    weights.check_fits(meta_net(config), weights.read_header(path).tensors, path)


def load_net(config: RunConfig, path: Path) -> nn.Module:
    """The network of `config` holding the weights at `path` (on the CPU), checked before it exists."""
    return weights.load(meta_net(config), path)


def check_resume(run_dir: Path, config: RunConfig) -> Path | None:
    """Everything `train --resume` will read from the latest checkpoint, checked against `config`
    without building the network: state.json, the train_state archive, both weights files.
    Returns that checkpoint (None when the run has none yet)."""
    if checkpoint.latest_checkpoint(run_dir) is None:
        return None
    ckpt = latest_checkpoint(run_dir, config)
    net = meta_net(config)
    for name in ("model", "ema"):
        path = ckpt / f"{name}.safetensors"
        weights.check_fits(net, weights.read_header(path).tensors, path)
    checkpoint.check_archive(ckpt / "train_state.pt")
    return ckpt
