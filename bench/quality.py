"""Quality per minute: ddpmkit's default recipe against lucidrains' denoising-diffusion-pytorch.

    python bench/quality.py --minutes 15 --n 1000     # writes bench/results/quality-<date>.{md,json}
    python bench/quality.py --dataset folder --data-dir ../shared/data/emoji-noto --image-size 32 \
        --minutes 15 --n 1000                          # -> bench/results/quality-<date>-emoji-noto-32.*

Both train on the same images (Fashion-MNIST, or a folder's train split) for the same wall-clock
minutes on the same machine, one after the other: ddpmkit through its CLI (`ddpmkit train
--dataset D --minutes M`, the default class-conditional recipe), the reference with its Unet +
GaussianDiffusion and the defaults of its Trainer (bench/_refs.py), once per learning rate in
--lucidrains-lrs (its default 1e-4 and a second one: a fair rival is tuned too; the better row is
the one to beat). Each then draws n images in 50 steps (ddpmkit: DDIM, uniform spacing; classes
in the training split's proportions as `ddpmkit eval` draws them; lucidrains: DDIM,
sampling_timesteps=50), and all are scored with ddpmkit's domain metrics against the same reference
statistics, as are n real training images (the floor: what a perfect model would score at this n)
and the same images blurred (sigma 1 px). A grid of each contestant goes beside the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _measure
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SAMPLE_BATCH = 250
LUCIDRAINS_LRS = "1e-4,3e-4"  # its Trainer's default, and 3x it


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}


def _run(cmd: list[str], threads: int) -> float:
    """Run a command (its output passes through); return its wall-clock seconds."""
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    start = time.monotonic()
    subprocess.run(cmd, env=_env(threads), check=True)
    return time.monotonic() - start


def save_npz(path: Path, images: torch.Tensor, labels) -> None:
    """images in [-1, 1] -> uint8 [N, H, W(, C)] and int64 labels (-1 = none), as `ddpmkit sample --npz`."""
    from ddpmkit.data import to_uint8
    from ddpmkit.fileio import atomic_write

    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    labels = np.full(len(pixels), -1) if labels is None else np.asarray(labels)
    buf = io.BytesIO()
    np.savez(buf, images=pixels, labels=labels.astype(np.int64))
    atomic_write(path, buf.getvalue())


def load_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images of a .npz from `ddpmkit sample --npz` in [-1, 1] as [N, C, H, W], and labels or None."""
    from ddpmkit.data import to_model_range

    with np.load(path, allow_pickle=False) as f:
        pixels, labels = torch.from_numpy(f["images"]), torch.from_numpy(f["labels"])
    pixels = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
    return to_model_range(pixels), (labels if bool((labels >= 0).all()) else None)


# ---- the two contestants ------------------------------------------------------------------------


def data_flags(args) -> list[str]:
    """The dataset flags of `ddpmkit train` for this comparison."""
    flags = ["--dataset", args.dataset]
    flags += ["--data-dir", args.data_dir] if args.data_dir else []
    return flags + (["--image-size", str(args.image_size)] if args.image_size else [])


def run_ddpmkit(args, work: Path, grid: Path) -> dict:
    """Train with the default recipe (plus --ddpmkit-args) for --minutes, then draw n samples with the
    run's defaults, and a grid of 8 per class."""
    run = work / "ddpmkit"
    cli, seed = [sys.executable, "-m", "ddpmkit"], ["--seed", str(args.seed)]
    extra = args.ddpmkit_args.split()
    train = [*cli, "train", *data_flags(args), *extra, "--minutes", str(args.minutes), "--out", str(run), *seed]
    train_s = _run([*train, "--no-progress"], args.threads)
    start = time.monotonic()
    draw_ddpmkit(run, args.n, args.seed, work / "ddpmkit-samples.npz")
    sample_s = time.monotonic() - start
    from ddpmkit.run import checkpoint

    per_class = 8 * max(checkpoint.load_config(run).num_classes, 1)
    _run([*cli, "sample", str(run), "--n", str(per_class), *seed, "--out", str(grid)], args.threads)
    record = {**ddpmkit_record(work), "train_process_s": train_s, "sample_s": sample_s, "grid": str(grid)}
    return {**record, "extra_flags": extra}


def draw_ddpmkit(run: Path, n: int, seed: int, out: Path) -> None:
    """n samples of the run's EMA weights with DDIM 50 steps, labelled as `ddpmkit eval` labels
    them (the training split's class proportions), saved as `ddpmkit sample --npz` would."""
    from ddpmkit.eval.report import eval_labels
    from ddpmkit.run.load import load_denoiser
    from ddpmkit.run.sampling import generate

    config, denoiser = load_denoiser(run, "cpu", "ema")
    labels = eval_labels(config, n)
    shape = (config.in_channels, config.image_size, config.image_size)
    settings = dataclasses.replace(config.sample, **_measure.DDIM_50)  # 50 DDIM steps, as lucidrains samples
    images = generate(denoiser, n, shape, labels=labels, settings=settings, seed=seed, batch_size=SAMPLE_BATCH)
    save_npz(out, images, labels)


def ddpmkit_record(work: Path) -> dict:
    """What the ddpmkit run in `work` trained (read back from its run directory) and its samples."""
    from ddpmkit.run import checkpoint

    run, samples = work / "ddpmkit", work / "ddpmkit-samples.npz"
    config = checkpoint.load_config(run)
    steps = json.loads((checkpoint.latest_checkpoint(run) / "state.json").read_text())["step"]
    return {
        "steps": steps,
        "images_seen": steps * config.train.batch_size * config.train.grad_accum,
        "samples": str(samples),
        "recipe": {
            "model": dict(config.model.__dict__),
            "diffusion": dict(config.diffusion.__dict__),
            "train": dict(config.train.__dict__),
            "sample": dict(config.sample.__dict__),
            "conditional": config.data.conditional,
        },
    }


def lucidrains_name(lr: float) -> str:
    return f"lucidrains lr {lr:g}"


def run_lucidrains(args, work: Path, lr: float, grid: Path) -> dict:
    """The same in a separate process (it needs the torchvision stand-in; the scoring must not see it)."""
    spec = {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "image_size": args.image_size,
        "minutes": args.minutes,
        "lr": lr,
        "n": args.n,
        "seed": args.seed,
        "threads": args.threads,
        "out": str(work / f"lucidrains-lr{lr:g}-samples.npz"),
        "grid": str(grid),
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--lucidrains-worker", json.dumps(spec)]
    print("$ " + " ".join(cmd[:3]) + f" ... (lr {lr:g})", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=_env(args.threads), stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _lucidrains_record(work: Path, lr: float) -> dict:
    """--score-only: the lucidrains worker's record beside its samples (older runs wrote none)."""
    samples = work / f"lucidrains-lr{lr:g}-samples.npz"
    if not samples.is_file() and lr == 1e-4:  # runs before --lucidrains-lrs trained one, at its default
        samples = work / "lucidrains-samples.npz"
    info = samples.with_suffix(".json")
    if info.is_file():
        return json.loads(info.read_text())
    if not samples.is_file():
        return {"skipped": f"no samples for lr {lr:g} in {work}"}
    return {"samples": str(samples), "note": "its steps and timings were not recorded by this run"}


def lucidrains_worker(spec: dict) -> dict:
    import _refs

    from ddpmkit import viz
    from ddpmkit.data import load_dataset

    ok, why = _refs.available("lucidrains")
    if not ok:
        return {"skipped": why}
    torch.set_num_threads(spec["threads"])
    train = load_dataset(spec["dataset"], "train", spec["data_dir"], spec.get("image_size"), progress=False)
    images01 = train.images.float() / 255  # GaussianDiffusion maps [0, 1] to [-1, 1] itself (auto_normalize)
    lr = spec.get("lr", _refs.LUCIDRAINS_TRAINER["lr"])
    diffusion, steps, seen, seconds = _refs.train_lucidrains(images01, spec["minutes"], seed=spec["seed"], lr=lr)
    start = time.monotonic()
    with torch.inference_mode():
        samples01 = _refs.sample_lucidrains(diffusion, spec["n"], SAMPLE_BATCH, seed=spec["seed"])
    sample_s = time.monotonic() - start
    save_npz(Path(spec["out"]), samples01 * 2 - 1, None)
    if spec.get("grid"):
        viz.save_grid(samples01[:64] * 2 - 1, Path(spec["grid"]))
    record = {
        "steps": steps,
        "images_seen": seen,
        "train_loop_s": seconds,
        "sample_s": sample_s,
        "samples": spec["out"],
        "grid": spec.get("grid"),
        "version": _refs.version("lucidrains"),
        "recipe": {
            "unet": _refs.lucidrains_unet(train.info.channels),
            "trainer": {**_refs.LUCIDRAINS_TRAINER, "lr": lr},
            "diffusion": {
                "timesteps": diffusion.num_timesteps,
                "objective": diffusion.objective,
                "sampling_timesteps": diffusion.sampling_timesteps,
            },
            "params": _refs.count(diffusion.model),
        },
    }
    from ddpmkit.fileio import atomic_write_text

    atomic_write_text(Path(spec["out"]).with_suffix(".json"), json.dumps(record, indent=2) + "\n")  # for --score-only
    return record


# ---- scoring and the report -----------------------------------------------------------------------


def score_all(args, contestants: dict) -> tuple[dict, dict, int]:
    """Domain metrics of each contestant's samples, of n real TRAIN images (the floor) and of the same
    images blurred; the classifier's record (its held-out accuracy says how much the numbers mean);
    the images' channels.

    The domain metrics' reference statistics are the TEST set's (a folder's held-out images), so the
    floor uses training images, as `ddpmkit.eval.report.evaluate_reference` does: held out from the
    reference, like the samples."""
    from ddpmkit.data import load_dataset, to_model_range
    from ddpmkit.eval.domain import DomainMetrics
    from ddpmkit.eval.metrics import gaussian_blur

    metrics = DomainMetrics.for_dataset(args.dataset, args.data_dir, args.image_size, device="cpu", progress=True)
    scores = {}
    for name, c in contestants.items():
        if "samples" in c:
            images, labels = load_npz(Path(c["samples"]))
            scores[name] = metrics.score(images, labels)
    train = load_dataset(args.dataset, "train", args.data_dir, args.image_size, progress=False)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.n]
    real = to_model_range(train.images[pick])
    scores["floor"] = metrics.score(real, train.labels[pick])
    scores["blurred"] = metrics.score(gaussian_blur(real, BLUR_SIGMA), train.labels[pick])
    return scores, metrics.info, train.info.channels


BLUR_SIGMA = 1.0
ROW_LABELS = {"floor": "real train images (floor)", "blurred": f"real train images blurred (sigma {BLUR_SIGMA:g} px)"}


def best_reference(scores: dict) -> str | None:
    """The lucidrains row with the lowest FD_dom: the one ddpmkit is compared with."""
    rows = [name for name in scores if name.startswith("lucidrains")]
    return min(rows, key=lambda name: scores[name]["fd_dom"]) if rows else None


def _dataset_line(result: dict) -> str:
    info = result.get("classifier", {})
    name = result["dataset"]
    if result.get("data_dir") and name == "folder":
        name = f"folder {Path(result['data_dir']).name}"
    size = f" at {result['image_size']}x{result['image_size']}" if result.get("image_size") else ""
    line = f"Dataset {name}{size}"
    if info:
        line += (
            f" ({info['train_images']} training images; the domain classifier, trained on them, scores "
            f"{info['test_accuracy']:.3f} accuracy and {info.get('test_balanced_accuracy', float('nan')):.3f} "
            f"balanced accuracy on the {info['test_images']} held-out test images)"
        )
    return line + "."


def report(result: dict) -> str:
    c, s = result["contestants"], result["scores"]
    m = result["machine"]
    lines = [
        f"# Quality per minute, {result['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        *([_measure.busy_warning(m), ""] if _measure.busy_warning(m) else []),
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {result['threads']} threads. "
        f"{_dataset_line(result)} {result['minutes']:g} training minutes each; {result['n']} samples each, "
        "scored with ddpmkit.eval.domain.DomainMetrics against the test set's features.",
        "",
        "| | minutes | steps | images seen | FD_dom | vs best lucidrains | precision | recall | class entropy "
        "| cond. accuracy | cond. balanced accuracy |",
        "|" + "---|" * 11,
    ]
    if m.get("note"):
        lines[-2:-2] = [f"Note: {m['note']}.", ""]
    best = best_reference(s)
    ref = s[best]["fd_dom"] if best else None
    names = ["ddpmkit", *sorted(n for n in s if n.startswith("lucidrains")), "floor", "blurred"]
    for name in (n for n in names if n in s):
        info, sc = c.get(name, {}), s[name]
        ratio = f"**{sc['fd_dom'] / ref:.2f}x**" if ref and name == "ddpmkit" else ("best" if name == best else "")
        minutes = "" if name in ROW_LABELS else f"{result['minutes']:g}"
        lines.append(
            f"| {ROW_LABELS.get(name, name)} | {minutes} | {info.get('steps', '')} | {info.get('images_seen', '')} | "
            f"{sc['fd_dom']:.3f} | {ratio} | {sc['precision']:.3f} | {sc['recall']:.3f} | "
            f"{sc['class_entropy']:.3f} | {_fmt(sc.get('conditional_accuracy'))} | "
            f"{_fmt(sc.get('conditional_balanced_accuracy'))} |"
        )
    d = c.get("ddpmkit", {})
    if "train_process_s" in d:
        lines.append(
            f"\nWall clock: ddpmkit `train` process {d['train_process_s']:.0f} s (start-up, data, "
            f"the --minutes loop, final checkpoint and grid), sampling {d.get('sample_s', 0):.0f} s."
        )
    for name, info in c.items():
        if "train_loop_s" in info:
            lines.append(f"{name}: training loop {info['train_loop_s']:.0f} s, sampling {info['sample_s']:.0f} s.")
        if "skipped" in info:
            lines.append(f"\nSkipped {name}: {info['skipped']}")
        if "note" in info:
            lines.append(f"\n{name}: {info['note']}.")
    extra = " ".join(d.get("extra_flags", []))
    channels = result.get("channels", 1)
    lines += [
        "",
        "ddpmkit: `ddpmkit train` defaults (class-conditional)"
        + (f" plus `{extra}`" if extra else "")
        + ", samples drawn with DDIM 50 steps, classes in the training split's proportions "
        "(as `ddpmkit eval` draws them).",
        f"lucidrains: Unet(dim=32, dim_mults=(1, 2, 4), channels={channels}) in GaussianDiffusion (its defaults), "
        "its Trainer's defaults in a plain loop (bench/_refs.py; random horizontal flips included), at each "
        "learning rate shown; DDIM with sampling_timesteps=50.",
    ]
    grids = [(name, info["grid"]) for name, info in c.items() if info.get("grid")]
    if grids:
        lines += ["", *[f"![{name}]({Path(path).name})" for name, path in grids]]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}"


def result_stem(args, date: str) -> str:
    """quality-<date> for Fashion-MNIST; quality-<date>-<folder name>-<size> for a folder."""
    if args.dataset == "fashion-mnist" and not args.image_size:
        return f"quality-{date}"
    name = Path(args.data_dir).name if args.dataset == "folder" and args.data_dir else args.dataset
    return f"quality-{date}-{name}" + (f"-{args.image_size}" if args.image_size else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Quality per minute: ddpmkit against lucidrains' reference.")
    p.add_argument("--minutes", type=float, default=15.0, help="training wall-clock minutes for each (15)")
    p.add_argument("--n", type=int, default=1000, help="samples scored for each, and real images for the floor (1000)")
    p.add_argument("--out-dir", default=str(HERE / "_work"), help="work directory for runs and samples (bench/_work)")
    p.add_argument("--results-dir", default=str(HERE / "results"), help="where quality-<date>.{md,json} go")
    p.add_argument("--keep-runs", action="store_true", help="keep the run directories and samples afterwards")
    p.add_argument("--threads", type=int, default=2, help="torch threads for both (2)")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default) or folder (with --data-dir)")
    p.add_argument("--data-dir", help="where the dataset files are; for --dataset folder, the folder")
    p.add_argument("--image-size", type=int, help="resize the images to this size (a folder's native size if unset)")
    p.add_argument(
        "--lucidrains-lrs",
        default=LUCIDRAINS_LRS,
        help=f"learning rates lucidrains trains at, one run each, comma-separated ({LUCIDRAINS_LRS})",
    )
    p.add_argument(
        "--ddpmkit-args",
        default="",
        help="extra `ddpmkit train` flags, e.g. to try a candidate recipe (none: the defaults are what is compared)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--score-only",
        metavar="WORK_DIR",
        help="score the samples a --keep-runs run left in WORK_DIR (bench/_work/quality-*) instead of training again",
    )
    p.add_argument("--lucidrains-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.lucidrains_worker:
        print(json.dumps(lucidrains_worker(json.loads(args.lucidrains_worker))))
        return 0
    if args.minutes <= 0 or args.n < 4:
        p.error("--minutes must be > 0 and --n >= 4")
    if args.dataset == "folder" and not args.data_dir:
        p.error("--dataset folder needs --data-dir")
    try:
        lrs = [float(lr) for lr in args.lucidrains_lrs.split(",") if lr.strip()]
    except ValueError:
        p.error(f"--lucidrains-lrs takes comma-separated numbers, got {args.lucidrains_lrs!r}")
    torch.set_num_threads(args.threads)
    machine = _measure.machine(args.threads)
    if args.score_only:  # the training ran earlier: today's load says nothing about it
        machine["load_average_at_start"] = 0.0
        machine["note"] = (
            f"scored afterwards with --score-only from the samples in {args.score_only}; "
            "the load while they trained was not recorded by this command"
        )
    if _measure.busy_warning(machine):
        print(_measure.busy_warning(machine), file=sys.stderr)
    date = datetime.date.today().isoformat()
    stem = Path(args.results_dir) / result_stem(args, date)
    work = Path(args.score_only) if args.score_only else Path(args.out_dir) / f"quality-{date}-{os.getpid()}"
    if args.score_only:
        args.keep_runs = True
    else:
        work.mkdir(parents=True)
    stem.parent.mkdir(parents=True, exist_ok=True)
    grid = lambda name: stem.with_name(f"{stem.name}-{name.replace(' ', '-')}.png")  # noqa: E731
    try:
        if args.score_only:
            contestants = {"ddpmkit": ddpmkit_record(work)}
            contestants |= {lucidrains_name(lr): _lucidrains_record(work, lr) for lr in lrs}
        else:
            contestants = {"ddpmkit": run_ddpmkit(args, work, grid("ddpmkit"))}
            for lr in lrs:
                name = lucidrains_name(lr)
                contestants[name] = run_lucidrains(args, work, lr, grid(name))
                if "skipped" in contestants[name]:
                    print(f"skipping lucidrains: {contestants[name]['skipped']}", file=sys.stderr)
                    break  # the others would be skipped for the same reason
        command = "python bench/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
        scores, classifier, channels = score_all(args, contestants)
        result = {
            "date": date,
            "command": command.strip(),
            "machine": machine,
            "threads": args.threads,
            "dataset": args.dataset,
            "data_dir": args.data_dir,
            "image_size": args.image_size,
            "channels": channels,
            "minutes": args.minutes,
            "n": args.n,
            "seed": args.seed,
            "lucidrains_lrs": lrs,
            "contestants": contestants,
            "classifier": classifier,
            "scores": scores,
        }
    finally:
        if not args.keep_runs:
            shutil.rmtree(work, ignore_errors=True)
    _measure.write_report(stem, result, report(result))
    if not args.keep_runs:
        print(f"removed {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_measure.run_main(main))
