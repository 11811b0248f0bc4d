"""The `ddpmkit` command: a thin layer from flags to RunConfig to the library.

Every problem with the user's input (or a full or read-only disk) ends in one line on stderr and
exit status 2. `train` stopped by SIGINT or SIGTERM finishes the step in flight, saves a checkpoint
and exits 128 + the signal (130 or 143), as shells report signals; continue it with --resume.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

from ddpmkit import __version__
from ddpmkit.core.diffusion import OBJECTIVES
from ddpmkit.core.losses import T_SAMPLING
from ddpmkit.core.precision import PRECISIONS
from ddpmkit.core.samplers import SAMPLERS
from ddpmkit.core.schedules import SCHEDULES, SPACINGS
from ddpmkit.data import DATASETS
from ddpmkit.errors import DdpmkitError, either
from ddpmkit.fileio import atomic_write
from ddpmkit.models import ARCHITECTURES
from ddpmkit.run import checkpoint
from ddpmkit.run.config import (
    DDPM_VARIANCES,
    LR_SCHEDULES,
    ON_NAN,
    OPTIMIZERS,
    RunConfig,
    SampleConfig,
    apply_overrides,
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


TRAIN_FLAGS = [
    ("--dataset", "data.dataset", str, f"{either(DATASETS)} (default fashion-mnist)"),
    ("--data-dir", "data.data_dir", str, "where the dataset files are (else the usual places, else download)"),
    ("--image-size", "data.image_size", int, "resize images to this size (folder datasets)"),
    ("--label-dropout", "data.label_dropout", float, "probability of training a label as the null class (0.1)"),
    (
        "--arch",
        "model.arch",
        str,
        f"{either(ARCHITECTURES)}: the seed-002 DDPM U-Net or the seed-001 notebook's (unet)",
    ),
    ("--base-channels", "model.base_channels", int, "U-Net width at the first level (32)"),
    ("--channel-mults", "model.channel_mults", _ints, "width multipliers per level, e.g. 1,2,2"),
    ("--num-res-blocks", "model.num_res_blocks", int, "residual blocks per level (1)"),
    ("--attn-resolutions", "model.attn_resolutions", _ints, "feature-map sizes with self-attention, e.g. 7"),
    ("--dropout", "model.dropout", float, "dropout in residual blocks (0)"),
    ("--num-heads", "model.num_heads", int, "attention heads (4)"),
    ("--attn-type", "model.attn_type", str, "attention at the levels: full or linear (mid block stays full)"),
    ("--time-embedding", "model.time_embedding", str, "sinusoidal, learned or random_fourier step embedding"),
    ("--downsample", "model.downsample", str, "conv (4x4 stride 2) or space_to_depth"),
    ("--upsample", "model.upsample", str, "transposed (4x4 stride 2) or nearest (+3x3 conv)"),
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
        "images per micro-batch and process (64); the effective batch "
        "of one optimizer step is batch-size x processes x grad-accum",
    ),
    ("--grad-accum", "train.grad_accum", int, "micro-batches accumulated per optimizer step (1)"),
    ("--workers", "data.workers", int, "DataLoader processes decoding images when streaming (min(4, CPUs))"),
    ("--optimizer", "train.optimizer", str, f"{either(OPTIMIZERS)} (adamw)"),
    ("--lr", "train.lr", float, "peak learning rate (1e-3)"),
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
    ("--sampler", "sample.sampler", str, f"default sampler for grids and `sample`: {either(SAMPLERS)} (ddim)"),
    ("--sample-steps", "sample.steps", int, "default number of sampling steps (50)"),
    ("--eta", "sample.eta", float, "default eta of the samplers that take it (ddim; 0)"),
    ("--variance", "sample.variance", str, f"default reverse variance of ddpm: {either(DDPM_VARIANCES)} (beta_tilde)"),
]
# every option of every sampler (a SampleConfig field) has a flag in `sample`, `animate` and `eval`
SAMPLER_OPTION_FLAGS = {
    "eta": (float, "eta in [0, 1] of the samplers that take it (ddim: 0 deterministic, 1 DDPM-like noise)"),
    "variance": (str, f"ddpm's reverse variance: {either(DDPM_VARIANCES)} (beta_tilde, the posterior's)"),
}
# boolean switches: flag -> (section.field, value when given, help)
BOOL_FLAGS = {
    "--unconditional": ("data.conditional", False, "train without class labels"),
    "--self-condition": ("model.self_condition", True, "self-conditioning on the previous x0 estimate"),
    "--final-res-block": ("model.final_res_block", True, "seed 003: a last residual block on [x, first features]"),
    "--learn-sigma": ("diffusion.learn_sigma", True, "learn the reverse variances (L_simple + 0.001 L_vlb)"),
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
# resuming may change these: the budget, logging, and how the same global batch is computed
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


def _sampler_flags(p) -> None:
    p.add_argument("--sampler", help=f"{either(SAMPLERS)} (the run's default)")
    p.add_argument("--steps", type=int, help="sampling steps (the run's default)")
    p.add_argument("--spacing", help=f"{either(SPACINGS)} (the run's default)")
    for name, (kind, text) in SAMPLER_OPTION_FLAGS.items():
        p.add_argument(f"--{name}", type=kind, help=text)
    p.add_argument("--guidance", type=float, help="classifier-free guidance weight W (1 = plain conditional)")
    p.add_argument(
        "--precision",
        help=f"the network's precision while sampling: {either(PRECISIONS)} "
        "(the run's; auto = bf16 where the hardware has it)",
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


def _given(args) -> dict:
    """The train flags the user actually gave, as {section: {field: value}}."""
    out: dict = {}
    for _, dest, _, _ in TRAIN_FLAGS:
        if hasattr(args, dest):
            section, name = dest.split(".")
            out.setdefault(section, {})[name] = getattr(args, dest)
    for flag, (dest, value, _) in BOOL_FLAGS.items():
        if getattr(args, flag[2:].replace("-", "_"), False):
            section, name = dest.split(".")
            out.setdefault(section, {})[name] = value
    return out


def cmd_train(args) -> int:
    from ddpmkit.train import distributed
    from ddpmkit.train.stream import training_data
    from ddpmkit.train.trainer import Trainer, total_steps

    if args.nproc is not None:  # run this same command in N processes under torchrun
        return distributed.relaunch(args.nproc, distributed.without_option(args.argv, "--nproc"))
    given, run_dir = _given(args), Path(args.out)
    if args.resume:
        if args.preset:
            raise DdpmkitError("--preset cannot be combined with --resume (the run keeps its configuration)")
        config = resume_config(checkpoint.load_config(run_dir), given, _flageither())
    else:
        config = apply_overrides(RunConfig(preset=args.preset), PRESETS.get(args.preset, {}))
        config = apply_overrides(config, given)
    validate(config)
    requested = _device(args.device)
    dist = distributed.setup(cuda=requested.startswith("cuda"))
    try:
        device = distributed.device_for_rank(requested)
        data = distributed.rank_zero_first(lambda: training_data(config), device)  # one download, by rank 0
        config = with_dataset(config, data.info, labelled=_labelled(data))
        # a missing budget or an architecture that cannot be built fails before --out is created
        total = total_steps(config, len(data), dist.world_size)
        trainer = Trainer(config, run_dir, data, device)
        if not args.resume:
            distributed.on_rank_zero(lambda: checkpoint.create_run(run_dir, config), device)
        else:
            trainer.resume()
        trainer.fit(total, config.train.minutes, progress=not args.no_progress)
        if trainer.interrupted_by is not None:
            return _interrupted(trainer.interrupted_by, trainer.step, run_dir, dist.rank)
        if dist.rank == 0:
            print(f"trained to step {trainer.step}; run directory {run_dir}")
    finally:
        distributed.teardown()
    return 0


def _flageither() -> dict:
    """config field -> its flag, for messages."""
    return {dest: f for f, dest, _, _ in TRAIN_FLAGS} | {dest: f for f, (dest, _, _) in BOOL_FLAGS.items()}


def _labelled(data) -> bool:
    import torch

    return bool(len(data.labels)) and int(torch.as_tensor(data.labels).min()) >= 0


def _interrupted(signum: int, step: int, run_dir: Path, rank: int) -> int:
    """SIGINT/SIGTERM stopped training and its checkpoint is saved: exit 128 + signal, as shells do."""
    import signal

    if rank == 0:
        print(
            f"ddpmkit train: stopped by {signal.Signals(signum).name} at step {step} and saved a checkpoint; "
            f"continue with `ddpmkit train --out {run_dir} --resume`",
            file=sys.stderr,
        )
    return 128 + signum


def cmd_sample(args) -> int:
    from ddpmkit import viz
    from ddpmkit.core.pixels import to_uint8
    from ddpmkit.run.load import load_denoiser
    from ddpmkit.run.sampling import check_guidance, default_labels, generate

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
        progress=True,
    )
    viz.save_grid(images, Path(args.out), labels=labels, class_names=config.class_names)
    if args.npz:
        pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
        pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
        label_array = labels.numpy() if labels is not None else np.full(args.n, -1)
        buf = io.BytesIO()
        np.savez(buf, images=pixels, labels=label_array.astype(np.int64))
        atomic_write(Path(args.npz), buf.getvalue())
    print(f"wrote {args.out}" + (f" and {args.npz}" if args.npz else ""))
    return 0


def sample_settings(defaults: SampleConfig, args) -> SampleConfig:
    """The run's sampling defaults, overridden by the flags given (one flag per SampleConfig field)."""
    values = dict(defaults.__dict__)
    for name in values:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
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
        "(optionally blurred) against the test set, to show what the numbers mean.",
    )
    p.add_argument("run_dir", nargs="?", help="a run directory made by `ddpmkit train`")
    p.add_argument("--reference", metavar="DATASET", help="score real TRAIN images of this dataset instead of a run")
    p.add_argument("--data-dir", help="with --reference: where the dataset files are")
    p.add_argument("--blur", type=float, default=0.0, help="with --reference: Gaussian blur sigma in pixels (0)")
    p.add_argument("--n", type=int, default=1000, help="images to generate (or real images) to score (1000)")
    _sampler_flags(p)
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (256)")
    p.add_argument("--nll-n", type=int, default=100, help="test images for bits/dim (100; 0 = skip)")
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
    import os
    import time

    from ddpmkit.eval import report as evaluate

    for ok, message in (
        (args.n >= 4, f"--n must be >= 4 (precision/recall use 3 neighbours), got {args.n}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.nll_n >= 0, f"--nll-n must be >= 0, got {args.nll_n}"),
        (args.nll_stride >= 1, f"--nll-stride must be >= 1, got {args.nll_stride}"),
        (args.blur >= 0, f"--blur must be >= 0, got {args.blur}"),
        ((args.run_dir is None) != (args.reference is None), "give either RUN_DIR or --reference"),
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
        report = evaluate.evaluate_reference(args.reference, data_dir=args.data_dir, blur=args.blur, **common)
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


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "animate": cmd_animate, "forward": cmd_forward, "eval": cmd_eval}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # `train --nproc N` runs itself again under torchrun
    try:
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
