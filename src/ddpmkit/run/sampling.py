"""From a denoiser to images: labels, guidance checks, and batches drawn with any sampler."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch

from ddpmkit.core.denoiser import Denoiser
from ddpmkit.core.pixels import to_uint8
from ddpmkit.core.samplers import get_sampler
from ddpmkit.core.schedules import timesteps
from ddpmkit.errors import DdpmkitError
from ddpmkit.progress import maybe_tqdm
from ddpmkit.run import build
from ddpmkit.run.config import RunConfig, SampleConfig, check_sample, sampler_kwargs


def check_guidance(config: RunConfig, guidance: float) -> None:
    """Guidance other than 1 needs a conditional model trained with label dropout (and not distilled)."""
    if guidance == 1.0:
        return
    if config.distill is not None:
        raise DdpmkitError(
            f"this run is a distilled student (its teacher's guidance {config.distill.guidance:g} is folded in "
            "and its null class was not distilled); sample it with --guidance 1"
        )
    if not config.data.conditional:
        raise DdpmkitError("--guidance needs a class-conditional model; this run was trained --unconditional")
    if config.data.label_dropout <= 0:
        raise DdpmkitError(
            "--guidance needs a model trained with label dropout (the null class was "
            "never trained); retrain with --label-dropout 0.1"
        )


def default_labels(config: RunConfig, n: int, class_id: int | None) -> torch.Tensor | None:
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


def proportional_labels(n: int, class_counts) -> torch.Tensor:
    """n labels drawn in the proportions of class_counts, as y ~ p(y) of the data would fall, without chance.

    Smooth weighted round robin: each step adds every class's count to its credit, takes the class
    with the most credit (the lowest id on a tie) and charges it the total. Every prefix then holds
    each class within one image of its share, and equal counts give 0, 1, ..., K-1, 0, ... (arange(n) % K).
    """
    counts = [int(c) for c in class_counts]
    if not counts or min(counts) < 0 or sum(counts) == 0:
        raise DdpmkitError(f"class counts must be >= 0 with a positive total, got {counts}")
    credit, total, labels = [0] * len(counts), sum(counts), []
    for _ in range(n):
        credit = [c + k for c, k in zip(credit, counts)]
        best = max(range(len(counts)), key=lambda k: (credit[k], -k))
        credit[best] -= total
        labels.append(best)
    return torch.tensor(labels, dtype=torch.long)


def generate(
    denoiser: Denoiser,
    n: int,
    shape: tuple,
    *,
    labels=None,
    settings: SampleConfig | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device="cpu",
    callback: Callable | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """n images in [-1, 1] of `shape` (C, H, W). x_T comes from `seed` alone, whatever the batching.

    settings: the sampler, its steps and options (default: SampleConfig()'s)."""
    settings = settings or SampleConfig()
    check_sample(settings, denoiser.schedule.T)
    denoiser.precision, denoiser.guidance_interval = settings.precision, settings.guidance_interval
    if settings.compile and not isinstance(denoiser.net, torch._dynamo.eval_frame.OptimizedModule):
        # once (later calls reuse it); frozen: sampling a run's saved weights, which do not change
        denoiser.net = build.compiled(denoiser.net, device, frozen=True)
    sampler, options = get_sampler(settings.sampler), sampler_kwargs(settings)
    steps = timesteps(denoiser.schedule.T, settings.steps, settings.spacing, denoiser.schedule)
    x_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    out = []
    for b, start in enumerate(maybe_tqdm(range(0, n, batch_size), progress, "sampling")):
        sl = slice(start, min(n, start + batch_size))
        y = labels[sl].to(device) if labels is not None else None
        g = torch.Generator(device).manual_seed(seed * 1_000_003 + b + 1)
        x0 = sampler(
            denoiser,
            x_T[sl].to(device),
            steps,
            y=y,
            guidance=1.0 if settings.guidance is None else settings.guidance,  # None: not resolved for a run
            generator=g,
            callback=callback,
            **options,
        )
        out.append(x0.float().cpu())
    return torch.cat(out)


def npz_bytes(images: torch.Tensor, labels: torch.Tensor | None) -> bytes:
    """An .npz of `images` in [-1, 1] as uint8 [N, H, W] (grey) or [N, H, W, C], and `labels` (-1 = none)."""
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    label_array = labels.numpy() if labels is not None else np.full(len(images), -1)
    buf = io.BytesIO()
    np.savez(buf, images=pixels, labels=label_array.astype(np.int64))
    return buf.getvalue()
