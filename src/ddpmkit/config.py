"""Typed configuration: CLI flags -> RunConfig -> library objects. Defaults live only here.

A run directory stores its RunConfig as config.json, so `sample`, `eval` and `animate` need
nothing but the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Optional

from .errors import DdpmkitError


@dataclass
class ModelConfig:
    arch: str = "unet"  # "unet" (seed 002) or "convnext" (seed 001)
    # unet
    base_channels: int = 32
    channel_mults: tuple = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple = (7,)
    dropout: float = 0.0
    num_heads: int = 4
    attn_type: str = "full"
    time_embedding: str = "sinusoidal"
    downsample: str = "conv"
    upsample: str = "transposed"
    init_conv_kernel: int = 3
    final_res_block: bool = False
    # convnext
    channels: tuple = (16, 32, 64, 128)
    strides: tuple = (2, 2, 3)
    mult: int = 3
    # both
    self_condition: bool = False

    UNET_KEYS = ("base_channels", "channel_mults", "num_res_blocks", "attn_resolutions", "dropout",
                 "num_heads", "attn_type", "time_embedding", "downsample", "upsample",
                 "init_conv_kernel", "final_res_block")
    CONVNEXT_KEYS = ("channels", "strides", "mult")


@dataclass
class DiffusionConfig:
    timesteps: int = 1000  # T
    schedule: str = "cosine"
    objective: str = "v"  # what the network predicts: eps, x0 or v (v stays well-conditioned as alpha_bar -> 0)
    learn_sigma: bool = False  # Nichol & Dhariwal learned variances (L_hybrid)
    # Hang et al. 2023 loss weighting (bench/results/recipe-*: FD 0.7x at equal time); None = L_simple
    min_snr_gamma: Optional[float] = 5.0


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    image_size: Optional[int] = None  # None = the dataset's own size
    conditional: bool = True
    label_dropout: float = 0.1  # p(y -> null) in training, for classifier-free guidance
    stream: bool = False  # folder datasets: decode in DataLoader workers instead of loading into memory
    workers: Optional[int] = None  # DataLoader worker processes when streaming; None = min(4, CPUs)


@dataclass
class TrainConfig:
    steps: Optional[int] = None  # the run's total number of optimizer steps
    epochs: Optional[float] = None
    minutes: Optional[float] = None  # wall-clock budget of this invocation
    batch_size: int = 64
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 200  # linear LR warm-up steps
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where the hardware has it), fp32, bf16, fp16
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 1000
    keep: int = 2  # checkpoints kept on disk
    on_nan: str = "stop"  # stop or skip
    compile: bool = False
    grad_checkpointing: bool = False


@dataclass
class SampleConfig:
    """The run's default sampling settings (a preset may change them; flags override)."""

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    spacing: str = "uniform"
    guidance: float = 1.0
    precision: str = "auto"  # the network's precision while sampling (auto: bf16 where native)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    # filled in from the dataset when the run starts
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    class_names: tuple = ()
    preset: Optional[str] = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @staticmethod
    def from_json(text: str) -> "RunConfig":
        return from_dict(RunConfig, json.loads(text))


SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig,
            "train": TrainConfig, "sample": SampleConfig}


def from_dict(cls, data: dict):
    """Build a dataclass from a dict, recursively, refusing unknown keys."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise DdpmkitError(f"unknown {cls.__name__} keys in config: {', '.join(sorted(unknown))}")
    values = {}
    for name, value in data.items():
        if name in SECTIONS and cls is RunConfig:
            value = from_dict(SECTIONS[name], value)
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def model_kwargs(config: RunConfig) -> dict:
    """Constructor keywords for the chosen architecture."""
    m = config.model
    keys = ModelConfig.UNET_KEYS if m.arch == "unet" else ModelConfig.CONVNEXT_KEYS
    kwargs = {k: getattr(m, k) for k in keys}
    kwargs.update(in_channels=config.in_channels, image_size=config.image_size,
                  num_classes=config.num_classes if config.data.conditional else 0,
                  learn_sigma=config.diffusion.learn_sigma, self_condition=m.self_condition)
    if m.arch == "unet":  # Fourier step embeddings see t / T
        kwargs["timesteps"] = config.diffusion.timesteps
    return kwargs


# ---- presets: named overrides of the defaults (flags given with a preset override it) -------

PRESETS: dict[str, dict] = {
    # The seed notebook (001): MNIST, T = 500, cosine, its ConvNeXt U-Net (m = 3), batch 128,
    # Adam lr 1e-3, 20 epochs, no EMA/clipping/warm-up/label dropout; 35 sampling steps, eta 0.1.
    "seed-notebook": {
        "model": {"arch": "convnext", "channels": (16, 32, 64, 128), "strides": (2, 2, 3), "mult": 3},
        "diffusion": {"timesteps": 500, "schedule": "cosine", "objective": "eps", "min_snr_gamma": None},
        "data": {"dataset": "mnist", "label_dropout": 0.0},
        "train": {"batch_size": 128, "optimizer": "adam", "lr": 1e-3, "epochs": 20, "warmup": 0,
                  "grad_clip": 0.0, "ema_decay": 0.0, "weight_decay": 0.0},
        "sample": {"sampler": "ddim", "steps": 35, "eta": 0.1},
    },
    # Seed 003's U-Net layout (lucidrains' denoising-diffusion-pytorch) at 28x28, through the
    # DDPM U-Net's options: 7x7 first conv, two residual blocks per level, linear attention as a
    # pre-norm residual block at every level (full attention in the mid block), space-to-depth
    # downsampling, nearest upsampling, and a final residual block on [x, first features].
    "seed-003": {
        "model": {"arch": "unet", "num_res_blocks": 2, "attn_resolutions": (28, 14, 7), "attn_type": "linear",
                  "downsample": "space_to_depth", "upsample": "nearest", "init_conv_kernel": 7,
                  "final_res_block": True},
    },
    # Ho et al. 2020's CIFAR-10 model: base 128, mults (1, 2, 2, 2), two residual blocks per level,
    # single-head attention at 16x16, dropout 0.1, nearest+conv upsampling; T = 1000, linear betas;
    # Adam 2e-4, batch 128, 5000 warm-up steps, clip 1, EMA 0.9999, 800k steps. Our stride-2
    # downsampling convs are 4x4 (theirs 3x3), so 36.78M parameters instead of 35.75M.
    "cifar10-ddpm": {
        "model": {"arch": "unet", "base_channels": 128, "channel_mults": (1, 2, 2, 2), "num_res_blocks": 2,
                  "attn_resolutions": (16,), "num_heads": 1, "dropout": 0.1, "upsample": "nearest"},
        "diffusion": {"timesteps": 1000, "schedule": "linear", "objective": "eps", "min_snr_gamma": None},
        "data": {"dataset": "cifar10"},
        "train": {"batch_size": 128, "optimizer": "adam", "lr": 2e-4, "warmup": 5000, "grad_clip": 1.0,
                  "ema_decay": 0.9999, "steps": 800_000, "log_every": 100, "sample_every": 10_000,
                  "checkpoint_every": 10_000},
        "sample": {"sampler": "ddim", "steps": 100},
    },
    # Nichol & Dhariwal 2021's ImageNet-64 size: base 128, mults (1, 2, 3, 4), three residual blocks
    # per level, 4-head attention at 32, 16 and 8, learned variances (L_hybrid), cosine, T = 4000;
    # Adam 1e-4, EMA 0.9999. batch_size is per process (see docs/imagenet64.md).
    "imagenet64": {
        "model": {"arch": "unet", "base_channels": 128, "channel_mults": (1, 2, 3, 4), "num_res_blocks": 3,
                  "attn_resolutions": (32, 16, 8), "num_heads": 4, "dropout": 0.0, "upsample": "nearest"},
        "diffusion": {"timesteps": 4000, "schedule": "cosine", "objective": "eps", "learn_sigma": True,
                      "min_snr_gamma": None},
        "data": {"dataset": "folder", "image_size": 64},
        "train": {"batch_size": 128, "optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.0, "warmup": 1000,
                  "grad_clip": 1.0, "ema_decay": 0.9999, "log_every": 100, "sample_every": 10_000,
                  "checkpoint_every": 10_000},
        "sample": {"sampler": "ddpm", "steps": 100},
    },
    # One GPU, 28x28 data (Fashion-MNIST by default): a wider, deeper U-Net than the CPU default
    # (base 64, two residual blocks per level, attention at 14x14 and 7x7) and batch 256, so that
    # a step gives the GPU enough work; bf16 autocast ("auto"). See bench/results/ for its speed.
    # L_simple, as it was measured in docs/gpu.md (min-SNR is untested on the GPU).
    "fashion-gpu": {
        "model": {"arch": "unet", "base_channels": 64, "channel_mults": (1, 2, 2), "num_res_blocks": 2,
                  "attn_resolutions": (14, 7)},
        "diffusion": {"min_snr_gamma": None},
        "data": {"dataset": "fashion-mnist"},
        "train": {"batch_size": 256, "lr": 1e-3, "warmup": 500, "ema_decay": 0.9995, "log_every": 100,
                  "sample_every": 5000, "checkpoint_every": 5000},
    },
}


def apply_overrides(config: RunConfig, overrides: dict) -> RunConfig:
    """A copy of `config` with {section: {field: value}} overrides applied (unknown keys refused)."""
    data = dataclasses.asdict(config)
    for section, values in overrides.items():
        if isinstance(values, dict):
            data[section].update(values)
        else:
            data[section] = values
    return from_dict(RunConfig, data)


def validate(config: RunConfig) -> None:
    """Refuse settings that cannot work, with one sentence naming the flag."""
    m, d, data, t, s = config.model, config.diffusion, config.data, config.train, config.sample
    checks = [
        (m.arch in ("unet", "convnext"), f"--arch must be unet or convnext, got {m.arch!r}"),
        (d.timesteps >= 1, f"--timesteps must be >= 1, got {d.timesteps}"),
        (d.schedule in ("linear", "cosine"), f"--schedule must be linear or cosine, got {d.schedule!r}"),
        (d.objective in ("eps", "x0", "v"), f"--objective must be eps, x0 or v, got {d.objective!r}"),
        (d.min_snr_gamma is None or d.min_snr_gamma > 0, "--min-snr-gamma must be > 0"),
        (0.0 <= data.label_dropout < 1.0, f"--label-dropout must be in [0, 1), got {data.label_dropout}"),
        (t.steps is None or t.steps >= 1, f"--steps must be >= 1, got {t.steps}"),
        (t.epochs is None or 0 < t.epochs < math.inf, f"--epochs must be a finite number > 0, got {t.epochs}"),
        (t.minutes is None or t.minutes > 0, f"--minutes must be > 0, got {t.minutes}"),
        (t.batch_size >= 1, f"--batch-size must be >= 1, got {t.batch_size}"),
        (t.grad_accum >= 1, f"--grad-accum must be >= 1, got {t.grad_accum}"),
        (0 < t.lr < math.inf, f"--lr must be a finite number > 0, got {t.lr}"),
        (0 <= t.weight_decay < math.inf, f"--weight-decay must be a finite number >= 0, got {t.weight_decay}"),
        (t.grad_clip >= 0, f"--grad-clip must be >= 0 (0 = off), got {t.grad_clip}"),
        (t.warmup >= 0, f"--warmup must be >= 0, got {t.warmup}"),
        (0.0 <= t.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {t.ema_decay}"),
        (t.precision in ("auto", "fp32", "bf16", "fp16"),
         f"--precision must be auto, fp32, bf16 or fp16, got {t.precision!r}"),
        (t.on_nan in ("stop", "skip"), f"--on-nan must be stop or skip, got {t.on_nan!r}"),
        (t.keep >= 1, f"--keep must be >= 1, got {t.keep}"),
        (data.workers is None or data.workers >= 0, f"--workers must be >= 0, got {data.workers}"),
        (min(t.log_every, t.sample_every, t.checkpoint_every) >= 1, "--log-every, --sample-every and "
         "--checkpoint-every must be >= 1"),
        (s.steps <= d.timesteps, f"--sample-steps {s.steps} exceeds the {d.timesteps} diffusion steps"),
        (0.0 <= s.eta <= 1.0, f"--eta must be in [0, 1], got {s.eta}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DdpmkitError(message)
    from .sampling import check_settings  # the grids' sampler, steps and spacing: refused now, not after training
    check_settings(s, d.timesteps)
