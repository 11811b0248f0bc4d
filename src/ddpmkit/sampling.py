"""From a run directory to images: load the EMA denoiser, draw batches with any sampler."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from . import checkpoint, viz
from .config import RunConfig, SampleConfig
from .denoiser import Denoiser
from .errors import DdpmkitError
from .precision import PRECISIONS
from .samplers import get_sampler
from .schedules import Schedule, build_schedule, timesteps


def denoiser_for(config: RunConfig, net: nn.Module, schedule: Optional[Schedule] = None,
                 precision: Optional[str] = None) -> Denoiser:
    schedule = schedule or build_schedule(config.diffusion.schedule, config.diffusion.timesteps)
    return Denoiser(net, schedule, config.diffusion.objective,
                    num_classes=config.num_classes if config.data.conditional else 0,
                    learn_sigma=config.diffusion.learn_sigma, self_condition=config.model.self_condition,
                    precision=precision or config.sample.precision)


def load_denoiser(run_dir: Path, device="cpu", which: str = "ema") -> tuple[RunConfig, Denoiser]:
    """The run's config and its denoiser with the latest checkpoint's `which` weights (ema or model)."""
    from .train import build_net
    config = checkpoint.load_config(run_dir)
    ckpt = checkpoint.latest_checkpoint(run_dir)
    if ckpt is None:
        raise DdpmkitError(f"{run_dir} has no complete checkpoint yet; train it first")
    checkpoint.load_state(ckpt)  # checks the format version
    net = build_net(config)
    checkpoint.load_weights(net, ckpt / f"{which}.safetensors")
    return config, denoiser_for(config, net.to(device).eval())


def check_guidance(config: RunConfig, guidance: float) -> None:
    """Guidance other than 1 needs a conditional model trained with label dropout."""
    if guidance == 1.0:
        return
    if not config.data.conditional:
        raise DdpmkitError("--guidance needs a class-conditional model; this run was trained --unconditional")
    if config.data.label_dropout <= 0:
        raise DdpmkitError("--guidance needs a model trained with label dropout (the null class was "
                           "never trained); retrain with --label-dropout 0.1")


def default_labels(config: RunConfig, n: int, class_id: Optional[int]) -> Optional[torch.Tensor]:
    """A given class for all n, or the classes in turn (one row each); None when unconditional."""
    if not config.data.conditional:
        if class_id is not None:
            raise DdpmkitError("--class needs a class-conditional model; this run was trained --unconditional")
        return None
    if class_id is not None:
        if not 0 <= class_id < config.num_classes:
            raise DdpmkitError(f"class {class_id} is out of range: this model has classes 0..{config.num_classes - 1}")
        return torch.full((n,), class_id, dtype=torch.long)
    per_row = math.ceil(n / config.num_classes)
    return torch.arange(n) // per_row


def generate(denoiser: Denoiser, n: int, shape: tuple, *, labels=None, settings: SampleConfig = SampleConfig(),
             seed: int = 0, batch_size: int = 256, device="cpu", callback: Optional[Callable] = None,
             progress: bool = False) -> torch.Tensor:
    """n images in [-1, 1] of `shape` (C, H, W). x_T comes from `seed` alone, whatever the batching."""
    check_settings(settings, denoiser.schedule.T)
    denoiser.precision = settings.precision
    sampler = get_sampler(settings.sampler)
    steps = timesteps(denoiser.schedule.T, settings.steps, settings.spacing)
    x_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    extra = {"eta": settings.eta} if settings.sampler == "ddim" else {}
    out = []
    for b, start in enumerate(viz.maybe_tqdm(range(0, n, batch_size), progress, "sampling")):
        sl = slice(start, min(n, start + batch_size))
        y = labels[sl].to(device) if labels is not None else None
        g = torch.Generator(device).manual_seed(seed * 1_000_003 + b + 1)
        x0 = sampler(denoiser, x_T[sl].to(device), steps, y=y, guidance=settings.guidance, generator=g,
                     callback=callback, **extra)
        out.append(x0.float().cpu())
    return torch.cat(out)


def check_settings(s: SampleConfig, T: int) -> None:
    get_sampler(s.sampler)
    timesteps(T, s.steps, s.spacing)
    if not 0.0 <= s.eta <= 1.0:
        raise DdpmkitError(f"--eta must be in [0, 1], got {s.eta}")
    if s.precision not in PRECISIONS:
        raise DdpmkitError(f"--precision must be one of {', '.join(PRECISIONS)}, got {s.precision!r}")
    if not math.isfinite(s.guidance) or s.guidance < 0:
        raise DdpmkitError(f"--guidance must be a finite number >= 0, got {s.guidance}")


def grid_for_run(config: RunConfig, denoiser: Denoiser, path: Path, n: int = 100, device="cpu") -> None:
    """The periodic training grid: one row per class with the run's sampling settings, seed 0."""
    denoiser.eval()
    n = max(n // max(config.num_classes, 1), 1) * max(config.num_classes, 1) if config.data.conditional else 64
    labels = default_labels(config, n, None)
    settings = config.sample if config.sample.guidance == 1.0 or config.data.label_dropout > 0 else SampleConfig(
        **{**config.sample.__dict__, "guidance": 1.0})
    images = generate(denoiser, n, (config.in_channels, config.image_size, config.image_size),
                      labels=labels, settings=settings, device=device)
    viz.save_grid(images, path, labels=labels, class_names=config.class_names)
