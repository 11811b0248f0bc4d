"""The `ddpmkit` command: a thin layer from flags to RunConfig to the library.

Every problem with the user's input (or a full or read-only disk) ends in one line on stderr and
exit status 2. `train` stopped by SIGINT or SIGTERM finishes the step in flight, saves a checkpoint
and exits 128 + the signal (130 or 143), as shells report signals; continue it with --resume.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

from ddpmkit import __version__
from ddpmkit.core.diffusion import OBJECTIVES
from ddpmkit.core.losses import T_SAMPLING
from ddpmkit.core.precision import PRECISIONS
from ddpmkit.core.samplers import SAMPLERS, UNIPC_ORDERS
from ddpmkit.core.schedules import SCHEDULES, SPACINGS
from ddpmkit.data import DATASETS, FITS
from ddpmkit.errors import DdpmkitError, either
from ddpmkit.fileio import atomic_write
from ddpmkit.models import ARCHITECTURES
from ddpmkit.notes import notes_to
from ddpmkit.run import checkpoint
from ddpmkit.run.config import (
    DDPM_VARIANCES,
    DEFAULT_GUIDANCE,
    DEFAULT_GUIDANCE_INTERVAL,
    DEFAULT_SAMPLING,
    LR_SCHEDULES,
    ON_NAN,
    OPTIMIZERS,
    RunConfig,
    SampleConfig,
    apply_overrides,
    distilled_config,
    resume_config,
    validate,
    with_dataset,
)
from ddpmkit.run.presets import PRESETS

# flag -> (section.field, type, help); all default to "not given" so presets and resume can tell
_ints = lambda text: tuple(int(v) for v in text.split(",") if v.strip())  # noqa: E731
_ints.__name__ = "comma-separated integers"
_gamma_or_off = lambda text: None if text.strip().lower() == "off" else float(text)  # noqa: E731
_gamma_or_off.__name__ = "number or off"
COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0)}


def _colour(text: str) -> tuple[int, int, int]:
    """white, black or R,G,B (integers in 0..255)."""
    if text.strip().lower() in COLOURS:
        return COLOURS[text.strip().lower()]
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise ValueError(text)
    return values


_colour.__name__ = "colour (white, black or R,G,B in 0..255)"
_count_or_auto = lambda text: "auto" if text.strip().lower() == "auto" else int(text)  # noqa: E731
_count_or_auto.__name__ = "count or auto"


EVERY_STEP = ()  # `--guidance-interval all`: no interval (SampleConfig's None), told apart from "not given"


def _interval(text: str) -> tuple[float, ...]:
    """LO,HI (finite sigmas, 0 <= LO < HI), or all: every step."""
    if text.strip().lower() == "all":
        return EVERY_STEP
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 2 or not all(map(math.isfinite, values)) or not 0 <= values[0] < values[1]:
        raise ValueError(text)
    return values


_interval.__name__ = "interval (LO,HI with 0 <= LO < HI, or all)"


TRAIN_FLAGS = [
    ("--dataset", "data.dataset", str, f"{either(DATASETS)} (default fashion-mnist)"),
    ("--data-dir", "data.data_dir", str, "where the dataset files are (else the usual places, else download)"),
    ("--image-size", "data.image_size", int, "resize images to this size (folder datasets)"),
    (
        "--fit",
        "data.fit",
        str,
        f"{either(FITS)}: how folder images of another shape become square: crop = resize the shorter "
        "side and centre-crop, as the reference implementations do (crop); pad = resize the longer side "
        "and letterbox on --background",
    ),
    (
        "--background",
        "data.background",
        _colour,
        "the colour under transparent pixels of folder images (and --fit pad's bars): white, black or R,G,B (white)",
    ),
    ("--label-dropout", "data.label_dropout", float, "probability of training a label as the null class (0.1)"),
    (
        "--arch",
        "model.arch",
        str,
        f"{either(ARCHITECTURES)}: the seed-002 DDPM U-Net or the seed-001 notebook's (unet)",
    ),
    ("--base-channels", "model.base_channels", int, "U-Net width at the first level (32)"),
    (
        "--channel-mults",
        "model.channel_mults",
        _ints,
        "width multipliers per level (default: 1,2,2,... with a level per halving down to 7 or 8 "
        "pixels: 1,2,2 at 28x28 and 32x32, 1,2,2,2 at 64x64)",
    ),
    ("--num-res-blocks", "model.num_res_blocks", int, "residual blocks per level (1)"),
    (
        "--attn-resolutions",
        "model.attn_resolutions",
        _ints,
        "feature-map sizes with self-attention, e.g. 7 (default: the lowest level; '' = none)",
    ),
    ("--dropout", "model.dropout", float, "dropout in residual blocks (0)"),
    ("--num-heads", "model.num_heads", int, "attention heads (4)"),
    ("--attn-type", "model.attn_type", str, "attention at the levels: full or linear (mid block stays full)"),
    ("--time-embedding", "model.time_embedding", str, "sinusoidal, learned or random_fourier step embedding"),
    ("--downsample", "model.downsample", str, "conv (4x4 stride 2), space_to_depth or conv3 (Ho et al.'s 3x3)"),
    ("--upsample", "model.upsample", str, "transposed (4x4 stride 2) or nearest (+3x3 conv)"),
    (
        "--emb-injection",
        "model.emb_injection",
        str,
        "how residual blocks take the step embedding: scale_shift (scales and shifts the normalised "
        "features; default) or add (added before the norm, as Ho et al.)",
    ),
    ("--init-conv-kernel", "model.init_conv_kernel", int, "kernel of the first convolution (3; seed 003 uses 7)"),
    ("--mult", "model.mult", int, "ConvNeXt expansion factor m (3)"),
    ("--timesteps", "diffusion.timesteps", int, "number of diffusion steps T (1000)"),
    ("--schedule", "diffusion.schedule", str, f"noise schedule: {either(SCHEDULES)} (cosine)"),
    ("--objective", "diffusion.objective", str, f"what the network predicts: {either(OBJECTIVES)} (v)"),
    ("--t-sampling", "diffusion.t_sampling", str, f"how training draws t: {either(T_SAMPLING)} (uniform)"),
    (
        "--min-snr-gamma",
        "diffusion.min_snr_gamma",
        _gamma_or_off,
        "min-SNR loss weighting: weight min(SNR, gamma) on the x0 error (5); off = L_simple",
    ),
    ("--steps", "train.steps", int, "train until this total number of optimizer steps"),
    ("--epochs", "train.epochs", float, "train until this many epochs in total"),
    ("--minutes", "train.minutes", float, "train for this many minutes of wall clock (this invocation)"),
    (
        "--batch-size",
        "train.batch_size",
        int,
        "images per micro-batch and process (64 up to 64x64 images, fewer above); the effective batch "
        "of one optimizer step is batch-size x processes x grad-accum",
    ),
    ("--grad-accum", "train.grad_accum", int, "micro-batches accumulated per optimizer step (1)"),
    ("--workers", "data.workers", int, "DataLoader processes decoding images when streaming (min(4, CPUs))"),
    (
        "--class-balance",
        "data.class_balance",
        float,
        "draw class c with probability ~ n_c^(1 - B) in training: 0 as the data falls, 1 every class "
        "equally often, small classes' images repeated (0.5 for a folder, else 0)",
    ),
    ("--optimizer", "train.optimizer", str, f"{either(OPTIMIZERS)} (adamw)"),
    ("--lr", "train.lr", float, "peak learning rate (2e-3 for colour images up to 32x32, else 1e-3)"),
    ("--weight-decay", "train.weight_decay", float, "AdamW weight decay (0)"),
    ("--warmup", "train.warmup", int, "linear learning-rate warm-up steps (200)"),
    (
        "--lr-schedule",
        "train.lr_schedule",
        str,
        f"after the warm-up: {either(LR_SCHEDULES)} (decay to 0 at the end "
        "of the budget; with --minutes alone the end is estimated from the speed so far) (constant)",
    ),
    ("--grad-clip", "train.grad_clip", float, "clip the gradient norm to this (1.0; 0 = off)"),
    ("--ema-decay", "train.ema_decay", float, "EMA decay of the sampling weights (0.999)"),
    (
        "--ema-power",
        "train.ema_power",
        float,
        "power-function EMA with this gamma instead of --ema-decay: "
        "beta_t = (1 - 1/t)^(gamma + 1), an average over a fixed fraction of the run (off)",
    ),
    ("--seed", "train.seed", int, "random seed (0)"),
    ("--precision", "train.precision", str, f"{either(PRECISIONS)} autocast (auto: bf16 where the hardware has it)"),
    ("--log-every", "train.log_every", int, "log metrics every N steps (50)"),
    ("--sample-every", "train.sample_every", int, "write a sample grid every N steps (1000)"),
    ("--checkpoint-every", "train.checkpoint_every", int, "save a checkpoint every N steps (1000)"),
    ("--keep", "train.keep", int, "checkpoints kept on disk (2)"),
    ("--on-nan", "train.on_nan", str, f"on a NaN/inf loss or gradient: {either(ON_NAN)} the step (stop)"),
    (
        "--sampler",
        "sample.sampler",
        str,
        f"default sampler for grids and `sample`: {either(SAMPLERS)} ({DEFAULT_SAMPLING['sampler']})",
    ),
    ("--sample-steps", "sample.steps", int, f"default number of sampling steps ({DEFAULT_SAMPLING['steps']})"),
    ("--eta", "sample.eta", float, "default eta of the samplers that take it (ddim; 0)"),
    ("--variance", "sample.variance", str, f"default reverse variance of ddpm: {either(DDPM_VARIANCES)} (beta_tilde)"),
]
# `ddpmkit distill`: flag -> (section.field, type, help); the defaults are DistillConfig's and DISTILL_TRAIN's
DISTILL_FLAGS = [
    ("--from", "distill.start", int, "the teacher's DDIM steps in the first round; its student takes half (64)"),
    ("--to", "distill.to", int, "the final student's steps: --from halved once per round (4)"),
    ("--steps-per-round", "distill.steps_per_round", int, "optimizer steps per halving (500)"),
    (
        "--guidance",
        "distill.guidance",
        float,
        "the teacher's classifier-free guidance weight W, folded into the student, which then samples "
        "with guidance 1 (1: the unguided teacher, even where the teacher run samples with more)",
    ),
    ("--batch-size", "train.batch_size", int, "images per optimizer step (64)"),
    ("--lr", "train.lr", float, "learning rate at the start of each round, falling linearly to 0 (2e-4)"),
    ("--ema-decay", "train.ema_decay", float, "EMA decay within a round (0: the student's weights themselves)"),
    ("--seed", "train.seed", int, "random seed of the data order and noise (0)"),
    ("--precision", "train.precision", str, f"{either(PRECISIONS)} autocast (auto: bf16 where the hardware has it)"),
    ("--minutes", "train.minutes", float, "stop after this many minutes of wall clock; continue with --resume"),
    ("--log-every", "train.log_every", int, "log metrics every N steps (50)"),
    ("--sample-every", "train.sample_every", int, "write a sample grid every N steps (once a round)"),
    ("--checkpoint-every", "train.checkpoint_every", int, "save a checkpoint every N steps (100)"),
    ("--keep", "train.keep", int, "checkpoints kept on disk (2)"),
    ("--data-dir", "data.data_dir", str, "where the teacher's dataset is now, if it moved"),
]
# every option of every sampler (a SampleConfig field) has a flag in `sample`, `animate` and `eval`
SAMPLER_OPTION_FLAGS = {
    "eta": (float, "eta in [0, 1] of the samplers that take it (ddim: 0 deterministic, 1 DDPM-like noise)"),
    "variance": (str, f"ddpm's reverse variance: {either(DDPM_VARIANCES)} (beta_tilde, the posterior's)"),
    "s_churn": (float, "euler and heun: Karras et al.'s stochastic churn S_churn (0 = deterministic)"),
    "s_tmin": (float, "euler and heun: churn only where sigma >= S_TMIN (0)"),
    "s_tmax": (float, "euler and heun: churn only where sigma <= S_TMAX (no limit)"),
    "s_noise": (float, "scale of the noise added by euler and heun's churn, euler-a and dpm++sde (1)"),
    "order": (int, f"unipc's order: {either(UNIPC_ORDERS)} (2; the corrector makes it accurate to order + 1)"),
}
# boolean switches: flag -> (section.field, value when given, help)
BOOL_FLAGS = {
    "--unconditional": ("data.conditional", False, "train without class labels"),
    "--hflip": (
        "data.hflip",
        True,
        "random horizontal flips in training (off by default: flips mirror text, flags and digits)",
    ),
    "--self-condition": ("model.self_condition", True, "self-conditioning on the previous x0 estimate"),
    "--final-res-block": ("model.final_res_block", True, "seed 003: a last residual block on [x, first features]"),
    "--learn-sigma": (
        "diffusion.learn_sigma",
        True,
        "learn the reverse variances (L_simple + 0.001 L_vlb; min-SNR weights the L_simple part)",
    ),
    "--train-on-all": (
        "data.train_on_all",
        True,
        "folder datasets: train on every image, the 10%% held out for `ddpmkit eval` too (then eval "
        "judges against images the model has seen)",
    ),
    "--stream": (
        "data.stream",
        True,
        "folder datasets: decode images in --workers processes instead of "
        "loading them all into memory (automatic when they would not fit)",
    ),
    "--grad-checkpointing": (
        "train.grad_checkpointing",
        True,
        "recompute U-Net activations in the backward pass: less memory, about a third more compute",
    ),
    "--compile": (
        "train.compile",
        True,
        "torch.compile the training network (worth it on GPUs; minutes of "
        "compiling, and slower on the CPUs we measured)",
    ),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddpmkit", description="Train, sample and evaluate denoising diffusion models.")
    parser.add_argument("--version", action="version", version=f"ddpmkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    _sample_parser(sub)
    _animate_parser(sub)
    _forward_parser(sub)
    _eval_parser(sub)
    _distill_parser(sub)
    _serve_parser(sub)
    return parser


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a diffusion model into a run directory",
        description="Train a diffusion model. Give a budget with --steps, --epochs or --minutes. "
        "Several processes: --nproc N on one machine, or torchrun --nproc_per_node N -m ddpmkit "
        "train ...; each step then trains on batch-size x N x grad-accum images. "
        "Ctrl-C (SIGINT) or SIGTERM saves a checkpoint and exits 130 or 143.",
    )
    p.add_argument("--out", required=True, help="the run directory (must be new unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out up to the new budget")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named configuration")
    for flag, (_, _, text) in BOOL_FLAGS.items():
        p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
    for flag, dest, kind, text in TRAIN_FLAGS:
        p.add_argument(
            flag, dest=dest, type=kind, default=argparse.SUPPRESS, help=text, metavar=flag[2:].upper().replace("-", "_")
        )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=int,
        help="train in N processes on this machine (data parallel; runs "
        "`python -m torch.distributed.run --standalone --nproc_per_node N -m ddpmkit train ...`)",
    )


def _distill_parser(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="distil a trained run into a student that samples in a few steps (progressive distillation)",
        description="Progressive distillation (Salimans & Ho 2022): a student, initialised as the teacher, "
        "learns to take one DDIM step where its teacher takes two; then it becomes the teacher and the "
        "steps halve, from --from down to --to. The result is a run directory that `sample` and `eval` "
        "open with DDIM at --to steps. Ctrl-C (SIGINT) or SIGTERM saves a checkpoint and exits 130 or 143.",
    )
    p.add_argument("run_dir", nargs="?", help="the teacher: a run directory made by `ddpmkit train`")
    p.add_argument("--out", required=True, help="the new run directory (must be new unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the distillation in --out")
    for flag, dest, kind, text in DISTILL_FLAGS:
        p.add_argument(
            flag, dest=dest, type=kind, default=argparse.SUPPRESS, help=text, metavar=flag[2:].upper().replace("-", "_")
        )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained run into a PNG grid (and .npz)")
    p.add_argument("run_dir", help="a run directory made by `ddpmkit train`")
    p.add_argument("--n", type=int, default=64, help="number of samples (64)")
    p.add_argument("--class", dest="class_id", type=int, help="draw only this class id")
    _sampler_flags(p)
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (256)")
    p.add_argument("--out", default="samples.png", help="the grid PNG to write (samples.png)")
    p.add_argument("--npz", help="also write images (uint8) and labels (int, -1 = none) to this .npz")
    p.add_argument("--which", choices=("ema", "model"), default="ema", help="EMA or raw weights (ema)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sampler_flags(p) -> None:
    p.add_argument("--sampler", help=f"{either(SAMPLERS)} (the run's default)")
    p.add_argument("--steps", type=int, help="sampling steps (the run's default)")
    p.add_argument("--spacing", help=f"{either(SPACINGS)} (the run's default)")
    for name, (kind, text) in SAMPLER_OPTION_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=text)
    p.add_argument(
        "--guidance",
        type=float,
        help=f"classifier-free guidance weight W (1 = plain conditional; the run's default: {DEFAULT_GUIDANCE:g} "
        "for a class-conditional run trained with label dropout, else 1)",
    )
    p.add_argument(
        "--guidance-interval",
        type=_interval,
        metavar="LO,HI",
        help="guide only at steps whose noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) is in (LO, HI], "
        "plain conditional elsewhere (Kynkaanniemi et al. 2024), where a step costs half; all = every step "
        "(the run's default: {:g},{:g} where it guides by default, else all)".format(*DEFAULT_GUIDANCE_INTERVAL),
    )
    p.add_argument(
        "--precision",
        help=f"the network's precision while sampling: {either(PRECISIONS)} "
        "(the run's; auto = bf16 where the hardware has it)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the network for sampling (on a GPU with CUDA graphs; compiling takes a while)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")


def _animate_parser(sub) -> None:
    p = sub.add_parser("animate", help="an animated GIF of the reverse process of a trained run")
    p.add_argument("run_dir", help="a run directory made by `ddpmkit train`")
    p.add_argument("--out", default="denoise.gif", help="the GIF to write (denoise.gif)")
    p.add_argument("--n", type=int, default=16, help="number of samples in the grid (16)")
    p.add_argument("--class", dest="class_id", type=int, help="draw only this class id")
    p.add_argument(
        "--frames",
        choices=("x_t", "x0_hat", "both"),
        default="both",
        help="show the iterate x_t, the denoiser's estimate x0_hat, or both side by side (both)",
    )
    p.add_argument("--every", type=int, default=1, help="keep every K-th step; the first and last always (1)")
    p.add_argument("--fps", type=float, default=10.0, help="frames per second (10); the last frame is held 2 s")
    _sampler_flags(p)
    p.add_argument("--which", choices=("ema", "model"), default="ema", help="EMA or raw weights (ema)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")


def _forward_parser(sub) -> None:
    p = sub.add_parser("forward", help="a figure of dataset images noised by q(x_t | x0) at increasing t")
    p.add_argument("--dataset", required=True, help=either(DATASETS))
    p.add_argument("--data-dir", help="where the dataset files are (else the usual places, else download)")
    p.add_argument("--out", default="noising.png", help="the PNG to write (noising.png)")
    p.add_argument("--n", type=int, default=6, help="images, one row each, taking the classes in turn (6)")
    which_t = p.add_mutually_exclusive_group()
    which_t.add_argument(
        "--steps",
        type=_ints,
        help="the steps t to show, e.g. 0,50,100,250,500,750,1000 (default 0, .05T, .1T, .25T, .5T, .75T, T)",
    )
    which_t.add_argument("--num", type=int, help="show this many steps evenly spaced over 0..T")
    p.add_argument("--schedule", default="cosine", help=f"noise schedule: {either(SCHEDULES)} (cosine)")
    p.add_argument("--timesteps", type=int, default=1000, help="number of diffusion steps T (1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the noise (0)")


# ---- commands ----------------------------------------------------------------------------------


def _device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise DdpmkitError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DdpmkitError("--device cuda was asked for but no CUDA GPU is available")
    return name


def _given(args, flags=TRAIN_FLAGS) -> dict:
    """The flags (of `train` unless told) the user actually gave, as {section: {field: value}}."""
    out: dict = {}
    for _, dest, _, _ in flags:
        if hasattr(args, dest):
            section, name = dest.split(".")
            out.setdefault(section, {})[name] = getattr(args, dest)
    for flag, (dest, value, _) in BOOL_FLAGS.items():
        if getattr(args, flag[2:].replace("-", "_"), False):
            section, name = dest.split(".")
            out.setdefault(section, {})[name] = value
    return out


def cmd_train(args) -> int:
    from ddpmkit.run import load
    from ddpmkit.train import distributed
    from ddpmkit.train.stream import training_data
    from ddpmkit.train.trainer import Trainer, total_steps

    if args.nproc is not None:  # run this same command in N processes under torchrun
        return distributed.relaunch(args.nproc, distributed.without_option(args.argv, "--nproc"))
    given, run_dir = _given(args), Path(args.out)
    if args.resume:
        if args.preset:
            raise DdpmkitError("--preset cannot be combined with --resume (the run keeps its configuration)")
        config = checkpoint.load_config(run_dir)
        if config.distill is not None:
            raise DdpmkitError(
                f"{run_dir} was made by `ddpmkit distill`; continue it with `ddpmkit distill --out {run_dir} --resume`"
            )
        config = resume_config(config, given, _flageither())
    else:
        config = apply_overrides(RunConfig(preset=args.preset), PRESETS.get(args.preset, {}))
        config = apply_overrides(config, given)
    try:
        validate(config)
    except DdpmkitError as error:
        raise DdpmkitError(_with_flag_names(str(error))) from error
    if args.resume:  # a run directory may come from someone else: its checkpoint is checked before anything is built
        load.check_resume(run_dir, config)
    requested = _device(args.device)
    dist = distributed.setup(cuda=requested.startswith("cuda"))
    try:
        device = distributed.device_for_rank(requested)
        data = distributed.rank_zero_first(lambda: training_data(config), device)  # one download, by rank 0
        config = with_dataset(config, data.info, labelled=_labelled(data))
        # a missing budget or an architecture that cannot be built fails before --out is created
        total = total_steps(config, len(data), dist.world_size)
        try:
            trainer = Trainer(config, run_dir, data, device)
        except DdpmkitError as error:  # the network names its keywords (num_heads); the user typed flags
            raise DdpmkitError(_with_flag_names(str(error))) from error
        if not args.resume:
            distributed.on_rank_zero(lambda: checkpoint.create_run(run_dir, config), device)
        else:
            trainer.resume()
        trainer.fit(total, config.train.minutes, progress=not args.no_progress)
        if trainer.interrupted_by is not None:
            return _interrupted("train", trainer.interrupted_by, trainer.step, run_dir, dist.rank)
        if dist.rank == 0:
            print(f"trained to step {trainer.step}; run directory {run_dir}")
    finally:
        distributed.teardown()
    return 0


def _flageither() -> dict:
    """config field -> its flag, for messages."""
    return {dest: f for f, dest, _, _ in TRAIN_FLAGS} | {dest: f for f, (dest, _, _) in BOOL_FLAGS.items()}


def _with_flag_names(message: str) -> str:
    """A message about the config or the network with each field written as the flag that sets it:
    `model.num_heads` (a config field) and `num_heads` (a network keyword) both become --num-heads."""
    flags = {dest: flag for dest, flag in _flageither().items()}
    flags |= {dest.split(".")[1]: flag for dest, flag in _flageither().items() if dest.startswith("model.")}
    flags |= {"image_size": "--image-size", "timesteps": "--timesteps"}
    names = "|".join(re.escape(name) for name in sorted(flags, key=len, reverse=True))
    return re.sub(rf"(?<![\w.-])({names})(?![\w-])", lambda match: flags[match.group(1)], message)


def _labelled(data) -> bool:
    import torch

    return bool(len(data.labels)) and int(torch.as_tensor(data.labels).min()) >= 0


def _interrupted(command: str, signum: int, step: int, run_dir: Path, rank: int) -> int:
    """SIGINT/SIGTERM stopped training and its checkpoint is saved: exit 128 + signal, as shells do."""
    import signal

    if rank == 0:
        print(
            f"ddpmkit {command}: stopped by {signal.Signals(signum).name} at step {step} and saved a checkpoint; "
            f"continue with `ddpmkit {command} --out {run_dir} --resume`",
            file=sys.stderr,
        )
    return 128 + signum


def cmd_distill(args) -> int:
    from ddpmkit.run.sampling import check_guidance
    from ddpmkit.train.distill import Distiller
    from ddpmkit.train.stream import training_data
    from ddpmkit.train.trainer import batch_indices

    given, out = _given(args, DISTILL_FLAGS), Path(args.out)
    names = {dest: flag for flag, dest, _, _ in DISTILL_FLAGS}
    if args.resume:
        config = checkpoint.load_config(out)
        if config.distill is None:
            raise DdpmkitError(f"{out} was not made by `ddpmkit distill`; continue it with `ddpmkit train --resume`")
        if args.run_dir is not None and Path(args.run_dir).resolve() != Path(config.distill.teacher):
            raise DdpmkitError(f"{out} distils {config.distill.teacher}, not {args.run_dir}")
        config = resume_config(config, given, names)
    else:
        if args.run_dir is None:
            raise DdpmkitError("give the teacher's run directory: ddpmkit distill RUN --out NEW")
        teacher_dir = Path(args.run_dir)
        checkpoint.check_new_run(out)
        teacher = checkpoint.load_config(teacher_dir)
        ckpt = checkpoint.latest_checkpoint(teacher_dir)
        if ckpt is None:
            raise DdpmkitError(f"{teacher_dir} has no complete checkpoint yet; train it first")
        checkpoint.load_state(ckpt)  # its format version
        if out.resolve().is_relative_to(teacher_dir.resolve()):
            raise DdpmkitError(f"--out {out} is inside the teacher's run directory {teacher_dir}; choose another")
        config = distilled_config(teacher, str(teacher_dir.resolve()), ckpt.name, given)
        check_guidance(teacher, config.distill.guidance)
    validate(config)
    device = _device(args.device)
    data = training_data(config)
    if with_dataset(config, data.info) != config:
        raise DdpmkitError(
            f"the images in {config.data.data_dir or config.data.dataset} are not the ones the teacher "
            "was trained on (their size, channels or classes differ)"
        )
    batch_indices(config.train.seed, 0, len(data), config.train.batch_size)  # enough images for one batch
    distiller = Distiller(config, out, data, device)
    if args.resume:
        distiller.resume()
    else:
        checkpoint.create_run(out, config)
        distiller.start(ckpt / "ema.safetensors")
    distiller.fit(minutes=config.train.minutes, progress=not args.no_progress)
    if distiller.interrupted_by is not None:
        return _interrupted("distill", distiller.interrupted_by, distiller.step, out, 0)
    if distiller.step < distiller.total:
        print(f"stopped after --minutes at step {distiller.step} of {distiller.total}; continue with --resume")
    else:
        print(f"distilled to {config.distill.to} steps in {len(distiller.counts)} rounds; run directory {out}")
    return 0


def cmd_sample(args) -> int:
    from ddpmkit import viz
    from ddpmkit.run.load import load_denoiser
    from ddpmkit.run.sampling import check_guidance, default_labels, generate, npz_bytes

    if args.n < 1:
        raise DdpmkitError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise DdpmkitError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = _device(args.device)
    config, denoiser = load_denoiser(Path(args.run_dir), device, args.which)
    settings = sample_settings(config.sample, args)
    check_guidance(config, settings.guidance)
    labels = default_labels(config, args.n, args.class_id)
    images = generate(
        denoiser,
        args.n,
        (config.in_channels, config.image_size, config.image_size),
        labels=labels,
        settings=settings,
        seed=args.seed,
        batch_size=args.batch_size,
        device=device,
        progress=not args.no_progress,
    )
    viz.save_grid(images, Path(args.out), labels=labels, class_names=config.class_names)
    if args.npz:
        atomic_write(Path(args.npz), npz_bytes(images, labels))
    print(f"wrote {args.out}" + (f" and {args.npz}" if args.npz else ""))
    return 0


def sample_settings(defaults: SampleConfig, args) -> SampleConfig:
    """The run's sampling defaults, overridden by the flags given (one flag per SampleConfig field)."""
    values = dict(defaults.__dict__)
    for name in values:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if values["guidance_interval"] == EVERY_STEP:
        values["guidance_interval"] = None
    return SampleConfig(**values)


def cmd_animate(args) -> int:
    from ddpmkit import viz
    from ddpmkit.core.samplers import Trajectory
    from ddpmkit.run.load import load_denoiser
    from ddpmkit.run.sampling import check_guidance, default_labels, generate

    for ok, message in (
        (args.n >= 1, f"--n must be >= 1, got {args.n}"),
        (args.every >= 1, f"--every must be >= 1, got {args.every}"),
        (args.fps > 0, f"--fps must be > 0, got {args.fps}"),
    ):
        if not ok:
            raise DdpmkitError(message)
    device = _device(args.device)
    config, denoiser = load_denoiser(Path(args.run_dir), device, args.which)
    settings = sample_settings(config.sample, args)
    check_guidance(config, settings.guidance)
    labels = default_labels(config, args.n, args.class_id)
    trajectory = Trajectory()  # one batch, so the callback sees every image at every step
    x0 = generate(
        denoiser,
        args.n,
        (config.in_channels, config.image_size, config.image_size),
        labels=labels,
        settings=settings,
        seed=args.seed,
        batch_size=args.n,
        device=device,
        callback=trajectory,
    )
    pictures = viz.denoising_frames(
        trajectory, x0, args.frames, args.every, labels=labels, class_names=config.class_names
    )
    viz.save_gif(pictures, Path(args.out), fps=args.fps)
    print(f"wrote {args.out} ({len(pictures)} frames)")
    return 0


def cmd_forward(args) -> int:
    import torch

    from ddpmkit import viz
    from ddpmkit.core.pixels import to_model_range
    from ddpmkit.core.schedules import build_schedule
    from ddpmkit.data import load_dataset

    if args.n < 1:
        raise DdpmkitError(f"--n must be >= 1, got {args.n}")
    schedule = build_schedule(args.schedule, args.timesteps)
    steps = list(args.steps) if args.steps is not None else viz.forward_steps(schedule.T, args.num)
    viz.check_steps(steps, schedule.T)
    data = load_dataset(args.dataset, "train", data_dir=args.data_dir)
    index = viz.one_per_class(data.labels, args.n)
    labels = data.labels[index] if bool((data.labels[index] >= 0).all()) else None
    figure = viz.forward_figure(
        schedule,
        to_model_range(data.images[index]),
        steps,
        labels=labels,
        class_names=data.info.class_names,
        generator=torch.Generator().manual_seed(args.seed),
    )
    viz.save_png(figure, Path(args.out))
    print(f"wrote {args.out}")
    return 0


def _eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a run's samples (domain FD, accuracy, precision/recall, FID/IS) "
        "and its bits/dim; or score real images with --reference",
        description="Evaluate RUN_DIR, or with --reference DATASET score N real training images "
        "(optionally blurred) against the test set, to show what the numbers mean. A folder's test "
        "set is the 10% of its images that training leaves out.",
    )
    p.add_argument("run_dir", nargs="?", help="a run directory made by `ddpmkit train`")
    p.add_argument(
        "--reference",
        metavar="DATASET|RUN_DIR",
        help="score real TRAIN images of this dataset instead of a run; given a run directory, of the run's "
        "dataset decoded as the run was trained (its data dir, size, --fit and --background)",
    )
    p.add_argument("--data-dir", help="with --reference: where the dataset files are (a folder: the folder)")
    p.add_argument(
        "--image-size", type=int, help="with --reference: resize the images to this size, as the run was trained"
    )
    p.add_argument(
        "--fit", choices=FITS, help="with --reference: how folder images become square, as the run was trained (crop)"
    )
    p.add_argument(
        "--background",
        type=_colour,
        help="with --reference: the colour under transparent folder pixels, as the run was trained (white)",
    )
    p.add_argument("--blur", type=float, default=0.0, help="with --reference: Gaussian blur sigma in pixels (0)")
    p.add_argument("--n", type=int, default=1000, help="images to generate (or real images) to score (1000)")
    _sampler_flags(p)
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (256)")
    p.add_argument(
        "--nll-n",
        type=_count_or_auto,
        default="auto",
        help="test images for bits/dim, -log p(x|y) and -log p(x); 0 = skip (auto: 1000 on a GPU; on a CPU, "
        "where each image costs about 200 fp32 network passes, 100 up to 32x32 and a quarter as many per "
        "doubling of the side, 25 at 64x64)",
    )
    p.add_argument(
        "--nll-stride",
        type=int,
        default=10,
        help="evaluate one KL term per block of K steps, stratified (10; 1 = every term)",
    )
    p.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="InceptionV3 weights for FID/IS (else $DDPMKIT_INCEPTION_WEIGHTS, the cache, a download)",
    )
    p.add_argument(
        "--inception",
        choices=("auto", "on", "off"),
        default="auto",
        help="Inception FID/IS: on, off, or auto = only on a GPU (seconds per image on a CPU)",
    )
    p.add_argument("--out", help="the JSON report (default RUN_DIR/eval-<time>-<sampler><steps>.json)")
    p.add_argument("--which", choices=("ema", "model"), default="ema", help="EMA or raw weights (ema)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_eval(args) -> int:
    import json
    import time

    from ddpmkit.eval import report as evaluate

    for ok, message in (
        (args.n >= 4, f"--n must be >= 4 (precision/recall use 3 neighbours), got {args.n}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.nll_n == "auto" or args.nll_n >= 0, f"--nll-n must be auto or >= 0, got {args.nll_n}"),
        (args.nll_stride >= 1, f"--nll-stride must be >= 1, got {args.nll_stride}"),
        (args.blur >= 0, f"--blur must be >= 0, got {args.blur}"),
        ((args.run_dir is None) != (args.reference is None), "give either RUN_DIR or --reference"),
        (args.image_size is None or args.reference, "--image-size goes with --reference (a run has its own size)"),
        (
            (args.fit is None and args.background is None) or args.reference,
            "--fit and --background go with --reference (a run decodes its images as it was trained)",
        ),
    ):
        if not ok:
            raise DdpmkitError(message)
    device, progress = _device(args.device), not args.no_progress
    weights = args.inception_weights or os.environ.get("DDPMKIT_INCEPTION_WEIGHTS") or None
    common = {
        "n": args.n,
        "seed": args.seed,
        "inception": args.inception,
        "inception_weights_path": weights,
        "device": device,
        "progress": progress,
    }
    started = time.monotonic()
    if args.reference:
        report = evaluate.evaluate_reference(**reference_source(args), blur=args.blur, **common)
        out = Path(args.out) if args.out else None
    else:
        run_dir = Path(args.run_dir)
        settings = sample_settings(checkpoint.load_config(run_dir).sample, args)
        report = evaluate.evaluate_run(
            run_dir,
            settings=settings,
            batch_size=args.batch_size,
            nll_n=args.nll_n,
            nll_stride=args.nll_stride,
            which=args.which,
            **common,
        )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path(args.out) if args.out else run_dir / f"eval-{stamp}-{settings.sampler}{settings.steps}.json"
    report.update(evaluate.provenance(args.argv, weights, time.monotonic() - started))
    print(evaluate.metrics_table(report))
    if out is not None:
        atomic_write(out, (json.dumps(report, indent=2) + "\n").encode())
        print(f"wrote {out}")
    return 0


def reference_source(args) -> dict:
    """evaluate_reference's data arguments for `eval --reference`: a dataset and the flags, or a run
    directory's dataset as its config describes it (so that its floor is framed as the run saw it)."""
    flags = {"data_dir": args.data_dir, "image_size": args.image_size, "fit": args.fit, "background": args.background}
    if args.reference in DATASETS or not checkpoint.is_run(Path(args.reference)):
        return {"dataset": args.reference, **{k: v for k, v in flags.items() if v is not None}}
    if given := [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]:
        raise DdpmkitError(f"{' and '.join(given)} come from the run with --reference RUN_DIR; leave them out")
    from ddpmkit.eval.report import reference_data

    return reference_data(checkpoint.load_config(Path(args.reference)))


def note_printer(command: str):
    """A handler that prints each library note as one line on stderr, once per command (eval reads a
    folder's train and test splits, and would say twice what it skipped); under torchrun only rank 0's
    (every rank makes the same)."""
    seen: set[str] = set()

    def print_note(message: str) -> None:
        if os.environ.get("RANK", "0") == "0" and message not in seen:
            seen.add(message)
            print(f"ddpmkit {command}: note: {message}", file=sys.stderr)

    return print_note


def _serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="a local web page to watch and steer trained runs (needs the serve extra)",
        description="Serve a web page for RUN directories: generate while watching the reverse process, "
        "the forward process, sampler comparisons, and each run's training and evaluation. "
        "Needs Gradio: pip install 'ddpmkit[serve]'.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN", help="run directories made by `ddpmkit train`")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (127.0.0.1: this machine only; 0.0.0.0 opens the page to the network)",
    )
    p.add_argument("--port", type=int, default=7860, help="the port to listen on (7860)")
    p.add_argument("--max-images", type=int, default=64, help="images one request may ask for (64)")
    p.add_argument("--concurrency", type=int, help="requests sampled at once (1 on a CPU, 2 on a GPU)")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait; more are refused (16)")
    p.add_argument("--which", choices=("ema", "model"), default="ema", help="EMA or raw weights (ema)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")


def cmd_serve(args) -> int:
    import os
    import shutil
    import tempfile

    from ddpmkit.serve.runs import load_runs
    from ddpmkit.serve.settings import Limits, Settings

    for ok, message in (
        (1 <= args.port <= 65535, f"--port must be 1 to 65535, got {args.port}"),
        (args.max_images >= 1, f"--max-images must be >= 1, got {args.max_images}"),
        (args.concurrency is None or args.concurrency >= 1, f"--concurrency must be >= 1, got {args.concurrency}"),
        (args.queue_size >= 1, f"--queue-size must be >= 1, got {args.queue_size}"),
    ):
        if not ok:
            raise DdpmkitError(message)
    device = _device(args.device)
    runs = load_runs(args.run_dirs, device, args.which)  # a run that cannot load stops here, in one line
    for run in runs.values():
        if run.examples_problem:
            print(f"ddpmkit serve: warning: {run.name}: {run.examples_problem}", file=sys.stderr)
    cache = tempfile.mkdtemp(prefix="ddpmkit-serve-")  # Gradio's files (private to this server)
    os.environ["GRADIO_TEMP_DIR"], os.environ["GRADIO_ANALYTICS_ENABLED"] = cache, "False"  # read at import
    try:
        try:
            from ddpmkit.serve import app
        except ImportError as e:
            if (e.name or "").split(".")[0] not in ("gradio", "gradio_client"):
                raise
            raise DdpmkitError("the page needs Gradio; install it with: pip install 'ddpmkit[serve]'") from e
        concurrency = args.concurrency or (1 if device == "cpu" else 2)
        settings = Settings(args.host, args.port, Limits(max_images=args.max_images), concurrency, args.queue_size)
        app.serve(runs, settings, Path(cache))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return 0


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "animate": cmd_animate,
    "forward": cmd_forward,
    "eval": cmd_eval,
    "distill": cmd_distill,
    "serve": cmd_serve,
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # `train --nproc N` runs itself again under torchrun
    try:
        with notes_to(note_printer(args.command)):
            return COMMANDS[args.command](args)
    except DdpmkitError as e:
        print(f"ddpmkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment (disk full, permissions) rather than a bug: one line too
        print(f"ddpmkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ddpmkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
