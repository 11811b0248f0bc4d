"""The reference implementations as the benchmarks drive them: lucidrains' denoising-diffusion-pytorch
and Hugging Face diffusers, each used through its own classes, in fp32 as they ship.

They are optional (`pip install -e ".[bench]"`, see bench/README.md); `available()` says which are
importable and why not. Nothing in the ddpmkit package imports this file.

The torchvision stand-in. denoising_diffusion_pytorch imports `torchvision.transforms` and
`torchvision.utils` at module import time, for its image-folder Trainer only; diffusers imports
`torchvision.transforms` when it finds torchvision installed. The benchmarks use neither: only the
U-Nets, GaussianDiffusion and the schedulers. PyPI's torchvision wheels do not load beside every
torch build (e.g. torch 2.13+cpu), so before importing a reference this process puts an empty
`torchvision` module with empty `transforms` and `utils` submodules into sys.modules. Any use of
them raises AttributeError naming the stand-in. It is installed only inside the benchmark
processes, never in the ddpmkit package or its tests.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import sys
import types

import torch
from _measure import Workload

LUCIDRAINS_UNET = {"dim": 32, "dim_mults": (1, 2, 4), "channels": 1}
# diffusers' default down/up block types are 4 levels ("DownBlock2D" then three "AttnDownBlock2D");
# with three widths we keep its first three (attention at 14x14 and 7x7), layers_per_block=2,
# 32 GroupNorm groups, attention_head_dim=8 and the other defaults. 28x28 needs no padding:
# two halvings (28 -> 14 -> 7).
DIFFUSERS_UNET = {
    "sample_size": 28,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64, 128),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
}


def lucidrains_unet(channels: int = 1) -> dict:
    """LUCIDRAINS_UNET for images of `channels` channels (its size comes from GaussianDiffusion)."""
    return {**LUCIDRAINS_UNET, "channels": channels}


def diffusers_unet(channels: int = 1, size: int = 28) -> dict:
    """DIFFUSERS_UNET for images of `channels` x `size` x `size`."""
    return {**DIFFUSERS_UNET, "sample_size": size, "in_channels": channels, "out_channels": channels}


DISTRIBUTIONS = {"lucidrains": "denoising-diffusion-pytorch", "diffusers": "diffusers"}


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"{self.__name__}.{name}: this is the benchmark's torchvision stand-in "
            "(bench/_refs.py); the benchmarks do not use torchvision"
        )


def install_torchvision_stand_in() -> None:
    """Put an empty torchvision (with transforms and utils) into sys.modules, in this process only."""
    if isinstance(sys.modules.get("torchvision"), _StandIn):
        return
    root = _StandIn("torchvision")
    root.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    root.__path__ = []
    for name in ("transforms", "utils"):
        sub = _StandIn(f"torchvision.{name}")
        sub.__spec__ = importlib.machinery.ModuleSpec(f"torchvision.{name}", None)
        setattr(root, name, sub)
        sys.modules[f"torchvision.{name}"] = sub
    sys.modules["torchvision"] = root


def available(name: str) -> tuple[bool, str]:
    """(importable, reason if not) for "lucidrains" or "diffusers"."""
    install_torchvision_stand_in()
    try:
        module = importlib.import_module("denoising_diffusion_pytorch" if name == "lucidrains" else "diffusers")
        for cls in ("Unet", "GaussianDiffusion") if name == "lucidrains" else ("UNet2DModel", "DDIMScheduler"):
            getattr(module, cls)  # diffusers imports lazily: a broken dependency shows only here
    except Exception as e:  # ImportError, or a broken dependency raising something else at import
        return False, f"{DISTRIBUTIONS[name]} is not importable ({type(e).__name__}: {e}); see bench/README.md"
    return True, ""


def version(name: str) -> str:
    return importlib.metadata.version(DISTRIBUTIONS[name])


def count(model: torch.nn.Module) -> int:
    """Parameters (all of them: an EMA copy has requires_grad off)."""
    return sum(p.numel() for p in model.parameters())


def lucidrains_diffusion(sampling_steps: int, image_size: int = 28, **unet_kwargs):
    """lucidrains' Unet inside its GaussianDiffusion (defaults: T = 1000, pred_v, sigmoid schedule,
    DDIM with eta 0 when sampling_timesteps < T). It takes images in [0, 1] and normalises itself."""
    install_torchvision_stand_in()
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    unet = Unet(**{**LUCIDRAINS_UNET, **unet_kwargs})
    return GaussianDiffusion(unet, image_size=image_size, sampling_timesteps=sampling_steps)


def lucidrains_params(channels: int = 1, size: int = 28) -> int:
    install_torchvision_stand_in()
    from denoising_diffusion_pytorch import Unet

    return count(Unet(**lucidrains_unet(channels)))  # the size changes no parameter


def diffusers_params(channels: int = 1, size: int = 28) -> int:
    install_torchvision_stand_in()
    from diffusers import UNet2DModel

    return count(UNet2DModel(**diffusers_unet(channels, size)))


def lucidrains_workload(images01: torch.Tensor, sampling_steps: int) -> Workload:
    """Training: GaussianDiffusion's own loss on images in [0, 1], backward, AdamW. Sampling: its
    DDIM (`sample`). Runs on the device of `images01`, at its shape."""
    channels, size = images01.shape[1], images01.shape[-1]
    diffusion = lucidrains_diffusion(sampling_steps, size, channels=channels).to(images01.device)
    optimizer = torch.optim.AdamW(diffusion.parameters(), lr=1e-4)
    batch = len(images01)

    def train_step():
        loss = diffusion(images01)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward():
        with torch.inference_mode():
            diffusion.model(torch.randn_like(images01), torch.full((batch,), 500, device=images01.device))

    def sample():
        return diffusion.sample(batch_size=batch)

    info = {
        "library": "denoising-diffusion-pytorch",
        "version": version("lucidrains"),
        "unet": lucidrains_unet(channels),
        "diffusion": {
            "timesteps": diffusion.num_timesteps,
            "objective": diffusion.objective,
            "sampling_timesteps": diffusion.sampling_timesteps,
        },
        "precision": "fp32",
    }
    return Workload(count(diffusion.model), train_step, sample, forward, info)


def diffusers_workload(images: torch.Tensor, sampling_steps: int) -> Workload:
    """Training: the diffusers training-example loop (DDPMScheduler.add_noise, MSE on the noise,
    AdamW) on images in [-1, 1]. Sampling: DDIMScheduler (its defaults) over the UNet, eta 0. Runs on
    the device of `images`, at its shape."""
    install_torchvision_stand_in()
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    config = diffusers_unet(images.shape[1], images.shape[-1])
    unet = UNet2DModel(**config).to(images.device)
    train_scheduler, sample_scheduler = DDPMScheduler(), DDIMScheduler()
    T = train_scheduler.config.num_train_timesteps
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    batch = len(images)

    def train_step():
        noise = torch.randn_like(images)
        t = torch.randint(0, T, (batch,), device=images.device)
        noisy = train_scheduler.add_noise(images, noise, t)
        loss = torch.nn.functional.mse_loss(unet(noisy, t).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward():
        with torch.inference_mode():
            unet(torch.randn_like(images), torch.full((batch,), 500, device=images.device))

    @torch.inference_mode()
    def sample():
        sample_scheduler.set_timesteps(sampling_steps)
        x = torch.randn_like(images)
        for t in sample_scheduler.timesteps:
            x = sample_scheduler.step(unet(x, t).sample, t, x).prev_sample
        return x

    info = {
        "library": "diffusers",
        "version": version("diffusers"),
        "unet": config,
        "scheduler": {"train": "DDPMScheduler()", "sample": "DDIMScheduler()", "steps": sampling_steps},
        "precision": "fp32",
    }
    return Workload(count(unet), train_step, sample, forward, info)


# ---- training lucidrains' model for a wall-clock budget (bench/quality.py) ----------------------

# The defaults of lucidrains' own Trainer, which needs an image folder, torchvision and accelerate,
# so the benchmark reproduces its loop instead: Adam(lr 1e-4, betas (0.9, 0.99)), batch 16,
# gradient norm clipped to 1, EMA(beta 0.995, update every 10 steps), random horizontal flips,
# reshuffled every epoch. Its periodic sample grids and FID are left out.
LUCIDRAINS_TRAINER = {
    "batch_size": 16,
    "lr": 1e-4,
    "adam_betas": (0.9, 0.99),
    "max_grad_norm": 1.0,
    "ema_decay": 0.995,
    "ema_update_every": 10,
    "augment_horizontal_flip": True,
}


def train_lucidrains(images01: torch.Tensor, minutes: float, seed: int = 0, **trainer) -> tuple:
    """Train GaussianDiffusion on images in [0, 1] (of any channels and square size) for `minutes` of
    wall clock; `trainer` overrides LUCIDRAINS_TRAINER (e.g. lr).
    Returns (the EMA GaussianDiffusion, optimizer steps, images seen, seconds trained)."""
    import time

    from ema_pytorch import EMA

    cfg = {**LUCIDRAINS_TRAINER, **trainer}
    torch.manual_seed(seed)
    diffusion = lucidrains_diffusion(50, images01.shape[-1], channels=images01.shape[1])
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=cfg["lr"], betas=cfg["adam_betas"])
    ema = EMA(diffusion, beta=cfg["ema_decay"], update_every=cfg["ema_update_every"])
    g, batch, order, steps = torch.Generator().manual_seed(seed), cfg["batch_size"], torch.empty(0, dtype=torch.long), 0
    start = time.monotonic()
    while time.monotonic() - start < 60 * minutes:
        if len(order) < batch:
            order = torch.randperm(len(images01), generator=g)
        idx, order = order[:batch], order[batch:]
        x = images01[idx]
        if cfg["augment_horizontal_flip"]:
            flip = torch.rand(batch, generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        loss = diffusion(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), cfg["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
        steps += 1
    return ema.ema_model.eval(), steps, steps * batch, time.monotonic() - start


def sample_lucidrains(diffusion, n: int, batch_size: int = 250, seed: int = 0) -> torch.Tensor:
    """n samples in [0, 1] from GaussianDiffusion.sample (DDIM, sampling_timesteps steps, eta 0)."""
    torch.manual_seed(seed)
    out, left = [], n
    while left > 0:
        out.append(diffusion.sample(batch_size=min(batch_size, left)))
        left -= len(out[-1])
    return torch.cat(out)
