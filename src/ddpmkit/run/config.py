"""Typed configuration: CLI flags -> RunConfig -> library objects. Defaults live only here.

A run directory stores its RunConfig as config.json, so `sample`, `eval` and `animate` need
nothing but the run directory. Names (architectures, schedules, samplers...) are checked against
the registries of the layers below; `run.build` turns a valid config into objects.

A field left None is derived from the image size and the other fields by `resolve` (the rules are
the `default_*` functions) once the dataset is known (`with_dataset`); config.json holds the
resolved values, so a run is reproducible from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field

import torch

from ddpmkit.core.diffusion import OBJECTIVES
from ddpmkit.core.distillation import Grids, halvings
from ddpmkit.core.losses import T_SAMPLING
from ddpmkit.core.precision import PRECISIONS
from ddpmkit.core.samplers import SAMPLERS, UNIPC_ORDERS, sampler_options
from ddpmkit.core.schedules import SCHEDULES, SPACINGS, build_schedule, check_steps
from ddpmkit.data import DATASETS, FITS, DatasetInfo
from ddpmkit.errors import DdpmkitError, either
from ddpmkit.models import ARCHITECTURES

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
LR_SCHEDULES = ("constant", "cosine", "linear")
ON_NAN = ("stop", "skip")
DDPM_VARIANCES = ("beta_tilde", "beta")
# the values each sampler option that is a string may take (validation, `ddpmkit serve`'s dropdowns)
OPTION_CHOICES = {"variance": DDPM_VARIANCES}


@dataclass
class ModelConfig:
    arch: str = "unet"  # "unet" (seed 002) or "convnext" (seed 001)
    # unet
    base_channels: int = 32
    channel_mults: tuple[int, ...] | None = None  # None = derived from the image size (28x28: 1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] | None = None  # None = the lowest level (28x28: 7); () = none
    dropout: float = 0.0
    num_heads: int = 4
    attn_type: str = "full"
    time_embedding: str = "sinusoidal"
    downsample: str = "conv"
    upsample: str = "transposed"
    init_conv_kernel: int = 3
    final_res_block: bool = False
    emb_injection: str = "scale_shift"  # how ResBlocks take the embedding: scale_shift (FiLM) or add (Ho et al.)
    # convnext
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 3)
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
    train_on_all: bool = False  # folder datasets: train on the held-out split too (data.split)
    stream: bool = False  # folder datasets: decode in DataLoader workers instead of loading into memory
    workers: int | None = None  # DataLoader worker processes when streaming; None = min(4, CPUs)
    fit: str = "crop"  # folder images of another shape: "crop" (shorter side, centre crop) or "pad" (letterbox)
    background: tuple[int, ...] = (255, 255, 255)  # folder images: the colour under transparent pixels and pad's bars
    hflip: bool = False  # random horizontal flips in training (Ho et al. on CIFAR-10); off where flips change meaning
    # how often training draws each class: p(c) ~ n_c^(1 - class_balance); 0 = as the data falls, 1 = uniform;
    # None = derived (default_class_balance: 0.5 for a folder, else 0)
    class_balance: float | None = None


@dataclass
class TrainConfig:
    steps: int | None = None  # the run's total number of optimizer steps
    epochs: float | None = None
    minutes: float | None = None  # wall-clock budget of this invocation
    batch_size: int | None = None  # images per micro-batch and process; None = derived (28x28: 64)
    grad_accum: int = 1
    optimizer: str = "adamw"  # a name in OPTIMIZERS
    lr: float | None = None  # peak learning rate; None = derived (grayscale: 1e-3; colour <= 32x32: 2e-3)
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


# The sampler, step count and spacing new runs sample with by default (`ddpmkit sample`, the grids),
# measured by bench/samplers.py (bench/results/samplers-2026-12-01.md) on the 15-minute Fashion-MNIST
# model: DPM-Solver++(2M) with 10 steps on Karras et al.'s sigmas scored FD_dom 7.98 against DDIM-100's
# 12.84 (DDIM-50, the default before: 13.83), 20 s per 1,000 samples on 2 cores (DDIM-50: 108 s).
# Confirmed on a second 15-minute model at NFE 4-100 (bench/results/samplers-2026-12-02.md): 7.24
# against DDIM-100's 11.83, the best row at 10 NFE.
DEFAULT_SAMPLING = {"sampler": "dpm++", "steps": 10, "spacing": "karras"}
# the classifier-free guidance weight a class-conditional run trained with label dropout samples with,
# measured by bench/guidance.py (bench/results/guidance-2026-12-02-fm15-default.md) on the 15-minute
# Fashion-MNIST model at the sampler above: W = 1.25 keeps FD_dom (7.30 against 7.24 at W = 1) and
# raises conditional accuracy from 0.838 to 0.895; W = 1.5 already doubles FD_dom (12.5).
DEFAULT_GUIDANCE = 1.25
# ... applied only where sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) is in (0.28, 5.42], Kynkaanniemi et al.
# 2024's interval for EDM2: on the same model and sampler (bench/results/guidance-2026-12-02-fm15-default-
# intervals.md) FD_dom 6.28 against 7.30 guiding every step, accuracy 0.880 against 0.895, and half the
# sampling time (15 s against 29 s per 1,000: 3 of the 10 steps are guided, the others run one branch).
DEFAULT_GUIDANCE_INTERVAL = (0.28, 5.42)


@dataclass
class SampleConfig:
    """The run's default sampling settings (a preset may change them; flags override)."""

    sampler: str = DEFAULT_SAMPLING["sampler"]
    steps: int = DEFAULT_SAMPLING["steps"]
    spacing: str = DEFAULT_SAMPLING["spacing"]
    guidance: float | None = None  # None: DEFAULT_GUIDANCE where the run can be guided, else 1 (resolve)
    # guide only at steps with LO < sigma_t <= HI, plain conditional elsewhere (Kynkaanniemi et al. 2024);
    # None: at every step. A step outside it evaluates one branch instead of two.
    guidance_interval: tuple[float, ...] | None = None
    # each sampler's own options (a field per keyword option of a sampler in core.samplers.SAMPLERS)
    eta: float = 0.0  # ddim: 0 deterministic .. 1 DDPM-like noise
    variance: str = "beta_tilde"  # ddpm: the reverse variance, beta_tilde (posterior) or beta (upper bound)
    s_churn: float = 0.0  # euler, heun: Karras et al.'s stochastic churn S_churn (0: deterministic)
    s_tmin: float = 0.0  # euler, heun: churn only where S_tmin <= sigma_t <= S_tmax
    s_tmax: float | None = None  # (None: no upper bound)
    s_noise: float = 1.0  # euler, heun (churn), euler-a, dpm++sde: the scale of the noise they add
    order: int = 2  # unipc: 2 or 3 (its accuracy is order + 1)
    precision: str = "auto"  # the network's precision while sampling (auto: bf16 where native)
    compile: bool = False  # torch.compile the network for sampling (on a GPU with CUDA graphs)


@dataclass
class DistillConfig:
    """How a run was distilled from a teacher run (`ddpmkit distill`; progressive distillation,
    Salimans & Ho 2022). Round r trains a student of start / 2^r steps to match two DDIM steps of
    its teacher (the student of round r - 1; the teacher run's EMA weights in round 1)."""

    teacher: str = ""  # the teacher's run directory
    teacher_checkpoint: str = ""  # its checkpoint the first round started from
    start: int = 64  # the teacher's DDIM steps in round 1 (its student takes start / 2)
    to: int = 4  # the final student's steps
    steps_per_round: int = 500  # optimizer steps per halving
    guidance: float = 1.0  # the teacher's classifier-free guidance weight, folded into the student
    spacing: str = "trailing"  # of both grids; the student's SampleConfig uses it too


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distill: DistillConfig | None = None  # set for a run made by `ddpmkit distill`
    # filled in from the dataset when the run starts
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    class_names: tuple[str, ...] = ()
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
    "distill": DistillConfig,
}


# the optimisation of `ddpmkit distill` where it differs from training's (TrainConfig): the paper's
# code anneals the learning rate linearly to 0 over each round without EMA (there: 5e-5, batch 128,
# 50k steps a round); our rounds are a hundred times shorter, hence a larger rate
DISTILL_TRAIN = {"lr": 2e-4, "warmup": 0, "ema_decay": 0.0, "checkpoint_every": 100}


def distilled_config(teacher: RunConfig, teacher_dir: str, checkpoint_name: str, given: dict) -> RunConfig:
    """The config of a student distilled from `teacher` (its run directory and checkpoint), with the
    `given` {section: {field: value}} settings of `ddpmkit distill`: the teacher's network (without
    dropout, as the paper's students), diffusion and data; the distillation's optimisation; and
    sampling defaults that are the student's own grid, DDIM with `to` steps, guidance folded in."""
    settings = DistillConfig(teacher=teacher_dir, teacher_checkpoint=checkpoint_name)  # guidance 1 unless given
    settings = dataclasses.replace(settings, **given.get("distill", {}))
    try:
        total = len(halvings(settings.start, settings.to)) * settings.steps_per_round
    except DdpmkitError:
        total = None  # validate() names the flag
    once_a_round = max(settings.steps_per_round, 1)
    train = {**DISTILL_TRAIN, "sample_every": once_a_round, **given.get("train", {}), "steps": total}
    sample = dataclasses.replace(
        teacher.sample,
        sampler="ddim",
        steps=settings.to,
        spacing=settings.spacing,
        guidance=1.0,
        guidance_interval=None,
        eta=0.0,
    )
    student = dataclasses.replace(
        teacher,
        model=dataclasses.replace(teacher.model, dropout=0.0),
        data=dataclasses.replace(teacher.data, **given.get("data", {})),
        train=TrainConfig(**train),
        sample=sample,
        distill=settings,
    )
    return resolve(student)  # the derived defaults (e.g. the batch size) the student's fresh TrainConfig leaves None


def from_dict(cls, data: dict, where: str = ""):
    """Build a dataclass from a dict (parsed JSON or overrides), recursively, refusing unknown keys
    and values of the wrong type: an int field takes no bool, float or string, a float field no string."""
    what = where or "the config"
    if not isinstance(data, dict):
        raise DdpmkitError(f"{what} must be an object of {cls.__name__} fields, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    unknown = set(data) - set(hints)
    if unknown:
        raise DdpmkitError(f"unknown {cls.__name__} keys in config: {', '.join(sorted(map(str, unknown)))}")
    values = {}
    for name, value in data.items():
        dotted = f"{where}.{name}" if where else name
        if cls is RunConfig and name in SECTIONS:
            optional = type(None) in typing.get_args(typing.get_type_hints(cls)[name])  # the distill section
            values[name] = None if value is None and optional else from_dict(SECTIONS[name], value, dotted)
        else:
            values[name] = typed(value, hints[name], dotted)
    return cls(**values)


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {int: "integers", float: "numbers", str: "strings"}


def typed(value, hint, name: str, optional: bool = False):
    """`value` as a field of type `hint` (int, float, str, bool, tuple[X, ...] or X | None); an int
    in a float field becomes a float. Anything else is refused in one sentence naming the field."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        (inner,) = [a for a in args if a is not type(None)]
        return None if value is None else typed(value, inner, name, optional=True)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise DdpmkitError(f"{name} must be a list of {_PLURALS[args[0]]}, got {_show(value)}")
        return tuple(typed(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
    number = isinstance(value, int) and not isinstance(value, bool)
    if hint is float and number and abs(value) < 2**1000:  # JSON writes 2 for 2.0
        return float(value)
    if number if hint is int else isinstance(value, hint):
        return value
    kind = _KINDS[hint] + (" or null" if optional else "")
    raise DdpmkitError(f"{name} must be {kind}, got {_show(value)}")


def _show(value) -> str:
    """A value as it appears in a message: its repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def apply_overrides(config: RunConfig, overrides: dict) -> RunConfig:
    """A copy of `config` with {section: {field: value}} overrides applied (unknown keys refused)."""
    data = dataclasses.asdict(config)
    for section, values in overrides.items():
        if isinstance(values, dict):
            data[section] = {**(data[section] or {}), **values}
        else:
            data[section] = values
    return from_dict(RunConfig, data)


def with_dataset(config: RunConfig, info: DatasetInfo, labelled: bool = True) -> RunConfig:
    """The config with the image shape and classes of the dataset it trains on (`labelled`: every
    image has a class), and its derived defaults resolved; a conditional config needs labels."""
    if config.data.conditional and (info.num_classes == 0 or not labelled):
        raise DdpmkitError(f"dataset {info.name} has no class labels; train it with --unconditional")
    return resolve(
        dataclasses.replace(
            config,
            in_channels=info.channels,
            image_size=info.image_size,
            num_classes=info.num_classes,
            class_names=tuple(info.class_names),
        )
    )


# ---- defaults that follow the image size ------------------------------------------------------


def default_channel_mults(image_size: int) -> tuple[int, ...]:
    """(1, 2, 2, ...): a level for each halving of the image that leaves a whole number of at least
    7 pixels, so the lowest level is 7x7 or 8x8 wherever the size allows it.

    28 -> levels 28, 14, 7: (1, 2, 2) (the measured Fashion-MNIST model); 32 -> 32, 16, 8: (1, 2, 2);
    64 -> 64, 32, 16, 8: (1, 2, 2, 2); 16 -> (1, 2); 12 -> (1,).
    """
    levels, size = 1, image_size
    while size % 2 == 0 and size // 2 >= 7:
        levels, size = levels + 1, size // 2
    return (1,) + (2,) * (levels - 1)


def default_attn_resolutions(image_size: int, channel_mults: tuple[int, ...]) -> tuple[int, ...]:
    """Self-attention at the lowest level only, where it is cheapest (28x28: 7; 32x32 and 64x64: 8)."""
    return (image_size // 2 ** (len(channel_mults) - 1),)


def default_batch_size(image_size: int) -> int:
    """64 (measured at 28x28: bench/recipe.py) up to 64x64; larger images get fewer, so that a batch
    holds no more pixels (and activations) than 64 images of 64x64 (128x128: 16), and never fewer than 8."""
    return max(8, min(64, 64 * 64**2 // image_size**2))


def default_lr(image_size: int, channels: int = 1) -> float:
    """The peak learning rate measured for the data's kind, at batch 64 (bench/recipe.py, equal wall clock):

    - grayscale 28x28 (Fashion-MNIST): 1e-3 (2e-3 was within noise at 4 minutes, and 2e-3 with a
      cosine decay 1.17x worse at 15: bench/results/recipe-2026-11-27-4min.md and
      recipe-2026-12-02-fashion-short-15min-rows-0-1-2-5.md);
    - colour up to 32x32 (emoji-noto at 32x32): 2e-3, FD_dom 0.78x the 1e-3 row's at 4 minutes and
      0.83x at 15 (bench/results/recipe-2026-12-03-folder-32-{4,15}min-*.md).

    Every other kind (colour above 32x32, grayscale at other sizes) keeps 1e-3 until measured there.
    """
    colour_small = channels == 3 and image_size <= 32
    return 2e-3 if colour_small else 1e-3


def default_class_balance(dataset: str) -> float:
    """0.5 for a folder (its classes are whatever sizes the user's collection has), 0 for the built-in
    data sets (balanced, or as their papers trained them). Measured on emoji-noto at 32x32, 15 minutes:
    FD_dom 0.97x the unbalanced row with balanced conditional accuracy 0.616 against 0.555
    (bench/results/recipe-2026-12-03-folder-32-15min-rows-0-13-14.md). A folder whose classes are all
    the same size keeps plain epochs whatever B is (train.trainer.class_balance_weights)."""
    return 0.5 if dataset == "folder" else 0.0


def resolve(config: RunConfig) -> RunConfig:
    """The config with every field left None (derive) set by the rules above, from the image size
    and the fields the user did set; a value the user set is kept, even one that cannot work (the
    network then refuses it, naming the flag). Idempotent."""
    m, t, size = config.model, config.train, config.image_size
    mults = m.channel_mults if m.channel_mults is not None else default_channel_mults(size)
    attn = m.attn_resolutions if m.attn_resolutions is not None else default_attn_resolutions(size, mults)
    batch = t.batch_size if t.batch_size is not None else default_batch_size(size)
    lr = t.lr if t.lr is not None else default_lr(size, config.in_channels)
    guidance, interval = config.sample.guidance, config.sample.guidance_interval
    if guidance is None:  # derived: a new run's default guidance, in the default interval
        guidance = default_guidance(config)
        interval = DEFAULT_GUIDANCE_INTERVAL if guidance != 1.0 and interval is None else interval
    data = config.data
    balance = data.class_balance if data.class_balance is not None else default_class_balance(data.dataset)
    return dataclasses.replace(
        config,
        data=dataclasses.replace(data, class_balance=balance),
        model=dataclasses.replace(m, channel_mults=tuple(mults), attn_resolutions=tuple(attn)),
        train=dataclasses.replace(t, batch_size=batch, lr=lr),
        sample=dataclasses.replace(config.sample, guidance=guidance, guidance_interval=interval),
    )


def default_guidance(config: RunConfig) -> float:
    """DEFAULT_GUIDANCE for a class-conditional model that trained its null class (label dropout > 0)
    and is not a distilled student (its teacher's guidance is folded in); 1 (no guidance) otherwise."""
    guidable = config.data.conditional and config.data.label_dropout > 0 and config.distill is None
    return DEFAULT_GUIDANCE if guidable else 1.0


# ---- validation: one sentence naming the flag -------------------------------------------------


def _one_of(value, choices, flag: str) -> tuple[bool, str]:
    return value in choices, f"{flag} must be {either(choices)}, got {value!r}"


def validate(config: RunConfig) -> None:
    """Refuse settings that cannot work, with one sentence naming the flag."""
    m, d, data, t = config.model, config.diffusion, config.data, config.train
    if config.distill is not None:  # first: its --to is also the sampling steps
        check_distill(config, d.timesteps)
    checks = [
        _one_of(m.arch, ARCHITECTURES, "--arch"),
        (d.timesteps >= 1, f"--timesteps must be >= 1, got {d.timesteps}"),
        _one_of(d.schedule, SCHEDULES, "--schedule"),
        _one_of(d.objective, OBJECTIVES, "--objective"),
        (d.min_snr_gamma is None or d.min_snr_gamma > 0, "--min-snr-gamma must be > 0"),
        _one_of(d.t_sampling, T_SAMPLING, "--t-sampling"),
        _one_of(data.dataset, DATASETS, "--dataset"),
        (
            not data.train_on_all or data.dataset == "folder",
            f"--train-on-all is for --dataset folder; {data.dataset} has a test split of its own",
        ),
        (0.0 <= data.label_dropout < 1.0, f"--label-dropout must be in [0, 1), got {data.label_dropout}"),
        (
            data.class_balance is None or 0.0 <= data.class_balance <= 1.0,
            f"--class-balance must be in [0, 1], got {data.class_balance}",
        ),
        (t.steps is None or t.steps >= 1, f"--steps must be >= 1, got {t.steps}"),
        (t.epochs is None or 0 < t.epochs < math.inf, f"--epochs must be a finite number > 0, got {t.epochs}"),
        (t.minutes is None or t.minutes > 0, f"--minutes must be > 0, got {t.minutes}"),
        (t.batch_size is None or t.batch_size >= 1, f"--batch-size must be >= 1, got {t.batch_size}"),
        (t.grad_accum >= 1, f"--grad-accum must be >= 1, got {t.grad_accum}"),
        _one_of(t.optimizer, OPTIMIZERS, "--optimizer"),
        (t.lr is None or 0 < t.lr < math.inf, f"--lr must be a finite number > 0, got {t.lr}"),
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
        _one_of(data.fit, FITS, "--fit"),
        (_is_colour(data.background), f"--background must be white, black or R,G,B in 0..255, got {data.background!r}"),
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
    check_limits(config)
    build_schedule(d.schedule, d.timesteps)  # refuses a schedule that leaves signal in x_T
    check_sample(config.sample, d.timesteps)  # the grids' settings: refused now, not after training


def check_distill(config: RunConfig, T: int) -> None:
    """Refuse distillation settings that cannot work with this model of T steps (flags of `ddpmkit distill`)."""
    s = config.distill
    if config.diffusion.objective == "eps":
        raise DdpmkitError(
            "distillation needs a model that predicts v or x0 (Salimans & Ho 2022, sec. 4: from eps_hat, "
            "x0_hat = (x_t - sigma_t eps_hat) / alpha_t is unstable near t = T); this run has --objective eps"
        )
    if config.model.self_condition:
        raise DdpmkitError("distillation of a model trained with --self-condition is not supported")
    checks = [
        (s.steps_per_round >= 1, f"--steps-per-round must be >= 1, got {s.steps_per_round}"),
        (2 <= s.start <= T, f"--from must be between 2 and the model's T = {T} steps, got {s.start}"),
        (math.isfinite(s.guidance) and s.guidance >= 0, f"--guidance must be a finite number >= 0, got {s.guidance}"),
        _one_of(s.spacing, SPACINGS, "distill.spacing"),
    ]
    for ok, message in checks:
        if not ok:
            raise DdpmkitError(message)
    try:
        for n in halvings(s.start, s.to):
            Grids(T, n, s.spacing)  # each teacher grid contains its student's
    except DdpmkitError as e:
        raise DdpmkitError(f"--from {s.start} --to {s.to}: {e}") from e


def _is_colour(value) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    )


def _is_interval(value) -> bool:
    """None, or (LO, HI): finite, with 0 <= LO < HI."""
    return value is None or (len(value) == 2 and all(map(math.isfinite, value)) and 0 <= value[0] < value[1])


def check_sample(s: SampleConfig, T: int) -> None:
    """Refuse sampling settings that cannot work with a model of T steps (flags of `ddpmkit sample`)."""
    checks = [
        _one_of(s.sampler, SAMPLERS, "--sampler"),
        (0.0 <= s.eta <= 1.0, f"--eta must be in [0, 1], got {s.eta}"),
        *(_one_of(getattr(s, name), choices, f"--{name}") for name, choices in OPTION_CHOICES.items()),
        _one_of(s.precision, PRECISIONS, "--precision"),
        (
            s.guidance is None or math.isfinite(s.guidance) and s.guidance >= 0,
            f"--guidance must be a finite number >= 0, got {s.guidance}",
        ),
        (
            _is_interval(s.guidance_interval),
            f"--guidance-interval must be LO,HI with 0 <= LO < HI (sigmas), got {s.guidance_interval!r}",
        ),
        (0 <= s.s_churn < math.inf, f"--s-churn must be a finite number >= 0, got {s.s_churn}"),
        (0 <= s.s_tmin < math.inf, f"--s-tmin must be a finite number >= 0, got {s.s_tmin}"),
        (s.s_tmax is None or s.s_tmax >= s.s_tmin, f"--s-tmax must be >= --s-tmin ({s.s_tmin}), got {s.s_tmax}"),
        (0 <= s.s_noise < math.inf, f"--s-noise must be a finite number >= 0, got {s.s_noise}"),
        _one_of(s.order, UNIPC_ORDERS, "--order"),
    ]
    for ok, message in checks:
        if not ok:
            raise DdpmkitError(message)
    check_steps(T, s.steps, s.spacing)  # the step count and the spacing's name


# ---- limits: a run directory from someone else is untrusted input ---------------------------

# The fields that size an allocation (or a loop, or a file), each with its range. A shared run
# directory is untrusted input: `sample`, `eval`, `animate`, `train --resume` and `serve` check its
# config against these limits before anything is built, and run.load then checks the network the
# config describes against the weights file. Each upper limit is generous for real use (several
# times the largest value of the models these configs follow) yet keeps any one field from asking
# for more memory than a workstation has; a network's total size is bounded by its weights file.
LIMITS: dict[str, tuple[int, int]] = {
    "model.base_channels": (1, 1024),  # the widest bases in use: ADM 256, Stable Diffusion 320
    "model.channel_mults": (1, 16),  # each level's; ADM at 512x512 goes up to 4
    "model.num_res_blocks": (1, 16),  # DDPM and ADM use 2 or 3
    "model.attn_resolutions": (1, 1024),  # each a feature-map size, at most the image size
    "model.num_heads": (1, 64),  # ADM: 4 heads, or 64 channels per head
    "model.init_conv_kernel": (1, 15),  # seed 003 uses 7
    "model.channels": (1, 4096),  # each level of the ConvNeXt U-Net (seed 001: up to 128)
    "model.strides": (1, 8),  # seed 001: 2 and 3
    "model.mult": (1, 16),  # ConvNeXt's expansion: 4 in its paper, 3 in seed 001
    "diffusion.timesteps": (1, 10_000),  # T: DDPM uses 1000, improved DDPM 4000 (sample.steps <= T)
    "data.image_size": (1, 1024),  # pixel-space models reach 1024x1024 (the last stage of cascades)
    "data.workers": (0, 256),  # processes
    "train.steps": (1, 10**9),
    "train.batch_size": (1, 4096),  # per process and micro-batch; the fashion-gpu preset uses 256
    "train.grad_accum": (1, 1024),
    "train.warmup": (0, 10**9),
    "train.seed": (0, 2**32 - 1),
    "train.log_every": (1, 10**9),
    "train.sample_every": (1, 10**9),
    "train.checkpoint_every": (1, 10**9),
    "train.keep": (1, 10_000),  # checkpoints on disk
    "image_size": (1, 1024),  # as data.image_size
    "num_classes": (0, 100_000),  # ImageNet-21k has 21,841 classes
    "class_names": (0, 256),  # characters in each name: a grid's caption column grows with them
}
# how many entries a list may hold
LENGTHS: dict[str, tuple[int, int]] = {
    "model.channel_mults": (1, 8),  # levels: seven halvings take 1024 to 8
    "model.attn_resolutions": (0, 8),
    "model.channels": (2, 9),
    "model.strides": (1, 8),
    "class_names": (0, 100_000),  # as num_classes
}


def check_limits(config: RunConfig) -> None:
    """Refuse a config with a field outside LIMITS or LENGTHS, naming the field and the limit."""
    for name, (low, high) in LENGTHS.items():
        value = _field(config, name)
        if value is None:  # a default still to be derived (resolve) from the image size
            continue
        count = len(value)
        if not low <= count <= high:
            raise DdpmkitError(f"{name} must have {low} to {high:,} entries, got {count:,}")
    for name, (low, high) in LIMITS.items():
        value = _field(config, name)
        items = [(f"{name}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, tuple) else [(name, value)]
        for label, v in items:
            size, unit = (len(v), " characters long") if isinstance(v, str) else (v, "")
            if v is not None and size > high:
                raise DdpmkitError(f"{label} must be at most {high:,}{unit}, got {size:,}")
            if v is not None and size < low:
                raise DdpmkitError(f"{label} must be at least {low:,}{unit}, got {size:,}")
    checks = [
        _one_of(config.in_channels, (1, 3), "in_channels"),  # grayscale or RGB: what the data and grids hold
        (
            config.num_classes >= 1 or not config.data.conditional,
            f"a class-conditional run needs num_classes >= 1, got {config.num_classes}",
        ),
        (
            len(config.class_names) <= config.num_classes,
            f"class_names has {len(config.class_names):,} names for {config.num_classes:,} classes",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise DdpmkitError(message)


def _field(config: RunConfig, dotted: str):
    """config.model.base_channels for "model.base_channels"."""
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


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
