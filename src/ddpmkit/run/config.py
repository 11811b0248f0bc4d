"""Typed configuration: CLI flags -> RunConfig -> library objects. Defaults live only here.

A run directory stores its RunConfig as config.json, so `sample`, `eval` and `animate` need
nothing but the run directory. Names (architectures, schedules, samplers...) are checked against
the registries of the layers below; `run.build` turns a valid config into objects.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields

import torch

from ddpmkit.core.diffusion import OBJECTIVES
from ddpmkit.core.losses import T_SAMPLING
from ddpmkit.core.precision import PRECISIONS
from ddpmkit.core.samplers import SAMPLERS, sampler_options
from ddpmkit.core.schedules import SCHEDULES, timesteps
from ddpmkit.data import DATASETS, DatasetInfo
from ddpmkit.errors import DdpmkitError, either
from ddpmkit.models import ARCHITECTURES

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
LR_SCHEDULES = ("constant", "cosine", "linear")
ON_NAN = ("stop", "skip")
DDPM_VARIANCES = ("beta_tilde", "beta")


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


@dataclass
class DiffusionConfig:
    timesteps: int = 1000  # T
    schedule: str = "cosine"
    objective: str = "v"  # what the network predicts: eps, x0 or v (v stays well-conditioned as alpha_bar -> 0)
    learn_sigma: bool = False  # Nichol & Dhariwal learned variances (L_hybrid)
    # Hang et al. 2023 loss weighting (bench/results/recipe-*: FD 0.7x at equal time); None = L_simple
    min_snr_gamma: float | None = 5.0
    t_sampling: str = "uniform"  # how training draws t: uniform (DDPM) or lognormal (EDM's ln sigma ~ N(-1.2, 1.2^2))


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    image_size: int | None = None  # None = the dataset's own size
    conditional: bool = True
    label_dropout: float = 0.1  # p(y -> null) in training, for classifier-free guidance
    stream: bool = False  # folder datasets: decode in DataLoader workers instead of loading into memory
    workers: int | None = None  # DataLoader worker processes when streaming; None = min(4, CPUs)


@dataclass
class TrainConfig:
    steps: int | None = None  # the run's total number of optimizer steps
    epochs: float | None = None
    minutes: float | None = None  # wall-clock budget of this invocation
    batch_size: int = 64
    grad_accum: int = 1
    optimizer: str = "adamw"  # a name in OPTIMIZERS
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 200  # linear LR warm-up steps
    lr_schedule: str = "constant"  # after the warm-up: constant, or cosine / linear decay to 0 at the budget's end
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_power: float | None = None  # Karras et al. 2024 power-function EMA (gamma); None = ema_decay with warm-up
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
    spacing: str = "uniform"
    guidance: float = 1.0
    # each sampler's own options (a field per keyword option of a sampler in core.samplers.SAMPLERS)
    eta: float = 0.0  # ddim: 0 deterministic .. 1 DDPM-like noise
    variance: str = "beta_tilde"  # ddpm: the reverse variance, beta_tilde (posterior) or beta (upper bound)
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
    preset: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @staticmethod
    def from_json(text: str) -> RunConfig:
        return from_dict(RunConfig, json.loads(text))


SECTIONS = {
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
}


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


def apply_overrides(config: RunConfig, overrides: dict) -> RunConfig:
    """A copy of `config` with {section: {field: value}} overrides applied (unknown keys refused)."""
    data = dataclasses.asdict(config)
    for section, values in overrides.items():
        if isinstance(values, dict):
            data[section].update(values)
        else:
            data[section] = values
    return from_dict(RunConfig, data)


def with_dataset(config: RunConfig, info: DatasetInfo, labelled: bool = True) -> RunConfig:
    """The config with the image shape and classes of the dataset it trains on (`labelled`: every
    image has a class); a conditional config needs labels."""
    if config.data.conditional and (info.num_classes == 0 or not labelled):
        raise DdpmkitError(f"dataset {info.name} has no class labels; train it with --unconditional")
    return dataclasses.replace(
        config,
        in_channels=info.channels,
        image_size=info.image_size,
        num_classes=info.num_classes,
        class_names=tuple(info.class_names),
    )


# ---- validation: one sentence naming the flag -------------------------------------------------


def _one_of(value, choices, flag: str) -> tuple[bool, str]:
    return value in choices, f"{flag} must be {either(choices)}, got {value!r}"


def validate(config: RunConfig) -> None:
    """Refuse settings that cannot work, with one sentence naming the flag."""
    m, d, data, t = config.model, config.diffusion, config.data, config.train
    checks = [
        _one_of(m.arch, ARCHITECTURES, "--arch"),
        (d.timesteps >= 1, f"--timesteps must be >= 1, got {d.timesteps}"),
        _one_of(d.schedule, SCHEDULES, "--schedule"),
        _one_of(d.objective, OBJECTIVES, "--objective"),
        (d.min_snr_gamma is None or d.min_snr_gamma > 0, "--min-snr-gamma must be > 0"),
        _one_of(d.t_sampling, T_SAMPLING, "--t-sampling"),
        _one_of(data.dataset, DATASETS, "--dataset"),
        (0.0 <= data.label_dropout < 1.0, f"--label-dropout must be in [0, 1), got {data.label_dropout}"),
        (t.steps is None or t.steps >= 1, f"--steps must be >= 1, got {t.steps}"),
        (t.epochs is None or 0 < t.epochs < math.inf, f"--epochs must be a finite number > 0, got {t.epochs}"),
        (t.minutes is None or t.minutes > 0, f"--minutes must be > 0, got {t.minutes}"),
        (t.batch_size >= 1, f"--batch-size must be >= 1, got {t.batch_size}"),
        (t.grad_accum >= 1, f"--grad-accum must be >= 1, got {t.grad_accum}"),
        _one_of(t.optimizer, OPTIMIZERS, "--optimizer"),
        (0 < t.lr < math.inf, f"--lr must be a finite number > 0, got {t.lr}"),
        (0 <= t.weight_decay < math.inf, f"--weight-decay must be a finite number >= 0, got {t.weight_decay}"),
        (t.grad_clip >= 0, f"--grad-clip must be >= 0 (0 = off), got {t.grad_clip}"),
        (t.warmup >= 0, f"--warmup must be >= 0, got {t.warmup}"),
        (0.0 <= t.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {t.ema_decay}"),
        (t.ema_power is None or 0 < t.ema_power < math.inf, f"--ema-power must be a number > 0, got {t.ema_power}"),
        _one_of(t.lr_schedule, LR_SCHEDULES, "--lr-schedule"),
        _one_of(t.precision, PRECISIONS, "--precision"),
        _one_of(t.on_nan, ON_NAN, "--on-nan"),
        (t.keep >= 1, f"--keep must be >= 1, got {t.keep}"),
        (data.workers is None or data.workers >= 0, f"--workers must be >= 0, got {data.workers}"),
        (
            min(t.log_every, t.sample_every, t.checkpoint_every) >= 1,
            "--log-every, --sample-every and --checkpoint-every must be >= 1",
        ),
        (
            config.sample.steps <= d.timesteps,
            f"--sample-steps {config.sample.steps} exceeds the {d.timesteps} diffusion steps",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise DdpmkitError(message)
    check_sample(config.sample, d.timesteps)  # the grids' settings: refused now, not after training


def check_sample(s: SampleConfig, T: int) -> None:
    """Refuse sampling settings that cannot work with a model of T steps (flags of `ddpmkit sample`)."""
    checks = [
        _one_of(s.sampler, SAMPLERS, "--sampler"),
        (0.0 <= s.eta <= 1.0, f"--eta must be in [0, 1], got {s.eta}"),
        _one_of(s.variance, DDPM_VARIANCES, "--variance"),
        _one_of(s.precision, PRECISIONS, "--precision"),
        (math.isfinite(s.guidance) and s.guidance >= 0, f"--guidance must be a finite number >= 0, got {s.guidance}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DdpmkitError(message)
    timesteps(T, s.steps, s.spacing)  # the step count and the spacing's name


def sampler_kwargs(s: SampleConfig) -> dict:
    """The settings that the chosen sampler takes as its own keyword options (e.g. eta for ddim)."""
    return {name: getattr(s, name) for name in sampler_options(s.sampler)}


# ---- resuming -----------------------------------------------------------------------------------

# what resuming may change: the budget, logging, and how the same global batch is computed
RESUMABLE = {
    "train.steps",
    "train.epochs",
    "train.minutes",
    "train.log_every",
    "train.sample_every",
    "train.checkpoint_every",
    "train.keep",
    "train.on_nan",
    "train.batch_size",
    "train.grad_accum",
    "train.grad_checkpointing",
    "train.compile",
    "data.stream",
    "data.workers",
}
BUDGET = ("steps", "epochs", "minutes")


def resume_config(saved: RunConfig, given: dict, names: dict | None = None) -> RunConfig:
    """The saved config with the resumable fields of `given` ({section: {field: value}}) applied.

    Giving the same value again is fine; a different value for a field outside RESUMABLE is refused,
    named by `names[section.field]` (the flag) when given. A new budget replaces the old one whole.
    """
    for section, values in given.items():
        for key, value in values.items():
            dotted, old = f"{section}.{key}", getattr(getattr(saved, section), key)
            if dotted not in RESUMABLE and old != value:
                raise DdpmkitError(
                    f"{(names or {}).get(dotted, dotted)} cannot change when resuming (this run has "
                    f"{old!r}); only the budget and logging flags can"
                )
    resumable = {s: {k: v for k, v in values.items() if f"{s}.{k}" in RESUMABLE} for s, values in given.items()}
    if any(k in given.get("train", {}) for k in BUDGET):
        resumable["train"] = {**{k: None for k in BUDGET}, **resumable.get("train", {})}
    return apply_overrides(saved, resumable)
