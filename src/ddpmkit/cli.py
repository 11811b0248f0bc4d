"""The `ddpmkit` command: a thin layer from flags to RunConfig to the library.

Every problem with the user's input ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

import numpy as np

from . import __version__, checkpoint
from .config import PRESETS, RunConfig, SampleConfig, apply_overrides, validate
from .errors import DdpmkitError
from .fileio import atomic_write

# flag -> (section.field, type, help); all default to "not given" so presets and resume can tell
_ints = lambda text: tuple(int(v) for v in text.split(",") if v.strip())  # noqa: E731
_ints.__name__ = "comma-separated integers"
TRAIN_FLAGS = [
    ("--dataset", "data.dataset", str, "mnist, fashion-mnist, cifar10 or folder (default fashion-mnist)"),
    ("--data-dir", "data.data_dir", str, "where the dataset files are (else the usual places, else download)"),
    ("--image-size", "data.image_size", int, "resize images to this size (folder datasets)"),
    ("--label-dropout", "data.label_dropout", float, "probability of training a label as the null class (0.1)"),
    ("--arch", "model.arch", str, "unet (seed 002 DDPM U-Net) or convnext (seed 001 notebook)"),
    ("--base-channels", "model.base_channels", int, "U-Net width at the first level (32)"),
    ("--channel-mults", "model.channel_mults", _ints, "width multipliers per level, e.g. 1,2,2"),
    ("--num-res-blocks", "model.num_res_blocks", int, "residual blocks per level (1)"),
    ("--attn-resolutions", "model.attn_resolutions", _ints, "feature-map sizes with self-attention, e.g. 7"),
    ("--dropout", "model.dropout", float, "dropout in residual blocks (0)"),
    ("--num-heads", "model.num_heads", int, "attention heads (4)"),
    ("--timesteps", "diffusion.timesteps", int, "number of diffusion steps T (1000)"),
    ("--schedule", "diffusion.schedule", str, "noise schedule: linear or cosine (cosine)"),
    ("--objective", "diffusion.objective", str, "what the network predicts: eps, x0 or v (eps)"),
    ("--min-snr-gamma", "diffusion.min_snr_gamma", float, "min-SNR loss weighting gamma (off)"),
    ("--steps", "train.steps", int, "train until this total number of optimizer steps"),
    ("--epochs", "train.epochs", float, "train until this many epochs in total"),
    ("--minutes", "train.minutes", float, "train for this many minutes of wall clock (this invocation)"),
    ("--batch-size", "train.batch_size", int, "images per step and process (128)"),
    ("--grad-accum", "train.grad_accum", int, "micro-batches accumulated per optimizer step (1)"),
    ("--optimizer", "train.optimizer", str, "adamw or adam (adamw)"),
    ("--lr", "train.lr", float, "peak learning rate (1e-3)"),
    ("--weight-decay", "train.weight_decay", float, "AdamW weight decay (0)"),
    ("--warmup", "train.warmup", int, "linear learning-rate warm-up steps (200)"),
    ("--grad-clip", "train.grad_clip", float, "clip the gradient norm to this (1.0; 0 = off)"),
    ("--ema-decay", "train.ema_decay", float, "EMA decay of the sampling weights (0.999)"),
    ("--seed", "train.seed", int, "random seed (0)"),
    ("--precision", "train.precision", str, "auto, fp32, bf16 or fp16 autocast (auto: bf16 where the hardware has it)"),
    ("--log-every", "train.log_every", int, "log metrics every N steps (50)"),
    ("--sample-every", "train.sample_every", int, "write a sample grid every N steps (1000)"),
    ("--checkpoint-every", "train.checkpoint_every", int, "save a checkpoint every N steps (1000)"),
    ("--keep", "train.keep", int, "checkpoints kept on disk (2)"),
    ("--on-nan", "train.on_nan", str, "on a NaN/inf loss or gradient: stop or skip the step (stop)"),
    ("--sampler", "sample.sampler", str, "default sampler for grids and `sample`: ddpm, ddim, dpm++"),
    ("--sample-steps", "sample.steps", int, "default number of sampling steps (50)"),
    ("--eta", "sample.eta", float, "default DDIM eta (0)"),
]
RESUMABLE = {"train.steps", "train.epochs", "train.minutes", "train.log_every", "train.sample_every",
             "train.checkpoint_every", "train.keep", "train.on_nan"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddpmkit", description="Train, sample and evaluate denoising diffusion models.")
    parser.add_argument("--version", action="version", version=f"ddpmkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    _sample_parser(sub)
    return parser


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a diffusion model into a run directory",
                       description="Train a diffusion model. Give a budget with --steps, --epochs or --minutes.")
    p.add_argument("--out", required=True, help="the run directory (must be new unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out up to the new budget")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named configuration")
    p.add_argument("--unconditional", action="store_true", default=argparse.SUPPRESS,
                   help="train without class labels")
    for flag, dest, kind, text in TRAIN_FLAGS:
        p.add_argument(flag, dest=dest, type=kind, default=argparse.SUPPRESS, help=text)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained run into a PNG grid (and .npz)")
    p.add_argument("run_dir", help="a run directory made by `ddpmkit train`")
    p.add_argument("--n", type=int, default=64, help="number of samples (64)")
    p.add_argument("--class", dest="class_id", type=int, help="draw only this class id")
    p.add_argument("--sampler", help="ddpm, ddim or dpm++ (the run's default)")
    p.add_argument("--steps", type=int, help="sampling steps (the run's default)")
    p.add_argument("--eta", type=float, help="DDIM eta in [0, 1]")
    p.add_argument("--spacing", help="uniform, quadratic or trailing")
    p.add_argument("--guidance", type=float, help="classifier-free guidance weight W (1 = plain conditional)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (256)")
    p.add_argument("--out", default="samples.png", help="the grid PNG to write (samples.png)")
    p.add_argument("--npz", help="also write images (uint8) and labels (int, -1 = none) to this .npz")
    p.add_argument("--which", choices=("ema", "model"), default="ema", help="EMA or raw weights (ema)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")


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
    if getattr(args, "unconditional", False):
        out.setdefault("data", {})["conditional"] = False
    return out


def cmd_train(args) -> int:
    from . import distributed
    from .data import load_dataset
    from .train import Trainer

    given, run_dir = _given(args), Path(args.out)
    if args.resume:
        config = _resume_config(run_dir, given, args.preset)
    else:
        config = apply_overrides(RunConfig(preset=args.preset), PRESETS.get(args.preset, {}))
        config = apply_overrides(config, given)
    validate(config)
    data = load_dataset(config.data.dataset, "train", data_dir=config.data.data_dir,
                        image_size=config.data.image_size)
    info = data.info
    config.in_channels, config.image_size = int(data.images.shape[1]), int(data.images.shape[2])
    config.num_classes, config.class_names = info.num_classes, tuple(info.class_names)
    if config.data.conditional and (info.num_classes == 0 or bool((data.labels < 0).any())):
        raise DdpmkitError(f"dataset {info.name} has no class labels; train it with --unconditional")
    dist = distributed.setup()
    try:
        device = distributed.device_for_rank(_device(args.device))
        if not args.resume and dist.rank == 0:
            checkpoint.create_run(run_dir, config)
        distributed.barrier()
        trainer = Trainer(config, run_dir, data, device)
        if args.resume:
            trainer.resume()
        total = _total_steps(config, len(data.images), dist.world_size)
        trainer.fit(total, config.train.minutes, progress=not args.no_progress)
        if dist.rank == 0:
            print(f"trained to step {trainer.step}; run directory {run_dir}")
    finally:
        distributed.teardown()
    return 0


def _resume_config(run_dir: Path, given: dict, preset) -> RunConfig:
    if preset:
        raise DdpmkitError("--preset cannot be combined with --resume (the run keeps its configuration)")
    config = checkpoint.load_config(run_dir)
    changed = [f"{s}.{k}" for s, values in given.items() for k in values if f"{s}.{k}" not in RESUMABLE]
    if changed:
        flag = next(f for f, dest, _, _ in TRAIN_FLAGS if dest == changed[0]) if changed[0] != "data.conditional" \
            else "--unconditional"
        raise DdpmkitError(f"{flag} cannot change when resuming; only the budget and logging flags can")
    budget = {k: None for k in ("steps", "epochs", "minutes")} if any(
        k in given.get("train", {}) for k in ("steps", "epochs", "minutes")) else {}
    return apply_overrides(config, {"train": {**budget, **given.get("train", {})}})


def _total_steps(config: RunConfig, n_data: int, world_size: int):
    t = config.train
    if t.steps is None and t.epochs is None and t.minutes is None:
        raise DdpmkitError("give a training budget: --steps N, --epochs N or --minutes N")
    if t.epochs is not None:
        global_batch = t.batch_size * t.grad_accum * world_size
        steps = math.ceil(t.epochs * n_data / global_batch)
        return min(steps, t.steps) if t.steps is not None else steps
    return t.steps


def cmd_sample(args) -> int:
    from .sampling import check_guidance, default_labels, generate, load_denoiser
    from . import viz
    from .data import to_uint8

    if args.n < 1:
        raise DdpmkitError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise DdpmkitError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = _device(args.device)
    config, denoiser = load_denoiser(Path(args.run_dir), device, args.which)
    settings = sample_settings(config.sample, args)
    check_guidance(config, settings.guidance)
    labels = default_labels(config, args.n, args.class_id)
    images = generate(denoiser, args.n, (config.in_channels, config.image_size, config.image_size),
                      labels=labels, settings=settings, seed=args.seed, batch_size=args.batch_size,
                      device=device, progress=True)
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
    """The run's sampling defaults, overridden by the flags given."""
    values = dict(defaults.__dict__)
    for name in ("sampler", "steps", "eta", "spacing", "guidance"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    return SampleConfig(**values)


COMMANDS = {"train": cmd_train, "sample": cmd_sample}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DdpmkitError as e:
        print(f"ddpmkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ddpmkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
