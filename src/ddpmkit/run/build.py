"""From a RunConfig to the objects it describes: schedule, network, denoiser, loss and optimizer.

The one place that reads a config to make library objects (k-diffusion's `make_model` and
`make_denoiser_wrapper`; EDM builds its net, loss and optimizer outside the training loop too).
"""

from __future__ import annotations

import torch
from torch import nn

from ddpmkit.core.denoiser import Denoiser
from ddpmkit.core.losses import HybridLoss, SimpleLoss
from ddpmkit.core.schedules import Schedule, build_schedule
from ddpmkit.models import build_model
from ddpmkit.run.config import OPTIMIZERS, RunConfig, resolve

# the ModelConfig fields each architecture's constructor takes
ARCH_KEYS = {
    "unet": (
        "base_channels",
        "channel_mults",
        "num_res_blocks",
        "attn_resolutions",
        "dropout",
        "num_heads",
        "attn_type",
        "time_embedding",
        "downsample",
        "upsample",
        "init_conv_kernel",
        "final_res_block",
        "emb_injection",
    ),
    "convnext": ("channels", "strides", "mult"),
}


def schedule(config: RunConfig) -> Schedule:
    return build_schedule(config.diffusion.schedule, config.diffusion.timesteps)


def num_classes(config: RunConfig) -> int:
    """The classes the network is conditioned on: 0 for an unconditional run."""
    return config.num_classes if config.data.conditional else 0


def model_kwargs(config: RunConfig) -> dict:
    """Constructor keywords of the chosen architecture (derived defaults resolved for the image size)."""
    config = resolve(config)
    m = config.model
    kwargs = {k: getattr(m, k) for k in ARCH_KEYS[m.arch]}
    kwargs.update(
        in_channels=config.in_channels,
        image_size=config.image_size,
        num_classes=num_classes(config),
        learn_sigma=config.diffusion.learn_sigma,
        self_condition=m.self_condition,
    )
    if m.arch == "unet":  # Fourier step embeddings see t / T
        kwargs["timesteps"] = config.diffusion.timesteps
    return kwargs


def net(config: RunConfig) -> nn.Module:
    """The network, freshly initialised (from the global torch RNG)."""
    return build_model(config.model.arch, **model_kwargs(config))


def denoiser(
    config: RunConfig, network: nn.Module, sched: Schedule | None = None, precision: str | None = None
) -> Denoiser:
    """The network seen as a Denoiser; `precision` defaults to the run's sampling precision."""
    return Denoiser(
        network,
        sched or schedule(config),
        config.diffusion.objective,
        num_classes=num_classes(config),
        null_class_trained=config.data.label_dropout > 0,
        learn_sigma=config.diffusion.learn_sigma,
        self_condition=config.model.self_condition,
        precision=precision or config.sample.precision,
    )


def loss(config: RunConfig) -> SimpleLoss:
    """L_simple (min-SNR weighted unless gamma is off), or L_hybrid with learned variances."""
    kind = HybridLoss if config.diffusion.learn_sigma else SimpleLoss
    d = config.diffusion
    return kind(min_snr_gamma=d.min_snr_gamma, label_dropout=config.data.label_dropout, t_sampling=d.t_sampling)


def compiled(module: nn.Module, device, graphs: bool = True, frozen: bool = False) -> nn.Module:
    """torch.compile(module). On a GPU with CUDA graphs (inductor's cudagraphs, what mode
    "reduce-overhead" turns on), as the small models here are bound by kernel launches there: one graph
    replays a whole step's kernels; graphs=False (e.g. under DistributedDataParallel, whose gradient
    hooks a graph would not replay) compiles only. frozen: for inference with fixed weights (sampling a
    saved run), inductor treats the weights as constants and prepacks the convolutions' (never for a
    network that is still training: a frozen graph would keep its old weights)."""
    options = {"freezing": frozen}
    if graphs and torch.device(device).type == "cuda":
        options["triton.cudagraphs"] = True
    return torch.compile(module, options=options)


def optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """AdamW or Adam over the model's parameters; one fused kernel where this torch has it."""
    t = resolve(config).train
    kind, kwargs = OPTIMIZERS[t.optimizer], {"lr": t.lr, "weight_decay": t.weight_decay}
    try:  # fused: CPU and CUDA since torch 2.4 (bench/variants.py: 5% over foreach on a 2-core CPU)
        return kind(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):  # older torch, or a device without the fused kernel
        return kind(model.parameters(), foreach=True, **kwargs)
