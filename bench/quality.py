"""Quality per minute: ddpmkit's default recipe against lucidrains' denoising-diffusion-pytorch.

    python bench/quality.py --minutes 15 --n 1000     # writes bench/results/quality-<date>.{md,json}

Both train on Fashion-MNIST for the same wall-clock minutes on the same machine, one after the
other: ddpmkit through its CLI (`ddpmkit train --dataset fashion-mnist --minutes M`, the default
class-conditional recipe), the reference with its Unet + GaussianDiffusion and the defaults of its
Trainer (bench/_refs.py). Each then draws n images in <= 50 steps (ddpmkit: `ddpmkit sample` with
the run's default sampler, classes balanced; lucidrains: DDIM, sampling_timesteps=50), and both are
scored with ddpmkit's domain metrics against the same reference statistics, as are n real images
(the floor: what a perfect model would score at this n).
"""

from __future__ import annotations

import argparse
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


def run_ddpmkit(args, work: Path) -> dict:
    """Train with the default recipe for --minutes, then draw n samples with the run's defaults."""
    run = work / "ddpmkit"
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    cli, seed = [sys.executable, "-m", "ddpmkit"], ["--seed", str(args.seed)]
    train_s = _run(
        [
            *cli,
            "train",
            "--dataset",
            args.dataset,
            "--minutes",
            str(args.minutes),
            "--out",
            str(run),
            *seed,
            "--no-progress",
            *data,
        ],
        args.threads,
    )
    samples = work / "ddpmkit-samples.npz"
    sample_s = _run(
        [
            *cli,
            "sample",
            str(run),
            "--n",
            str(args.n),
            *seed,
            "--batch-size",
            str(SAMPLE_BATCH),
            "--npz",
            str(samples),
            "--out",
            str(work / "ddpmkit-samples.png"),
        ],
        args.threads,
    )
    return {**ddpmkit_record(work), "train_process_s": train_s, "sample_process_s": sample_s}


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


def run_lucidrains(args, work: Path) -> dict:
    """The same in a separate process (it needs the torchvision stand-in; the scoring must not see it)."""
    spec = {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "minutes": args.minutes,
        "n": args.n,
        "seed": args.seed,
        "threads": args.threads,
        "out": str(work / "lucidrains-samples.npz"),
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--lucidrains-worker", json.dumps(spec)]
    print("$ " + " ".join(cmd[:3]) + " ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=_env(args.threads), stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _lucidrains_record(work: Path) -> dict:
    """--score-only: the lucidrains worker's record beside its samples (older runs wrote none)."""
    samples = work / "lucidrains-samples.npz"
    info = samples.with_suffix(".json")
    if info.is_file():
        return json.loads(info.read_text())
    return {"samples": str(samples), "note": "its steps and timings were not recorded by this run"}


def lucidrains_worker(spec: dict) -> dict:
    import _refs

    from ddpmkit.data import load_dataset

    ok, why = _refs.available("lucidrains")
    if not ok:
        return {"skipped": why}
    torch.set_num_threads(spec["threads"])
    train = load_dataset(spec["dataset"], "train", spec["data_dir"])
    images01 = train.images.float() / 255  # GaussianDiffusion maps [0, 1] to [-1, 1] itself (auto_normalize)
    diffusion, steps, seen, seconds = _refs.train_lucidrains(images01, spec["minutes"], seed=spec["seed"])
    start = time.monotonic()
    with torch.inference_mode():
        samples01 = _refs.sample_lucidrains(diffusion, spec["n"], SAMPLE_BATCH, seed=spec["seed"])
    sample_s = time.monotonic() - start
    save_npz(Path(spec["out"]), samples01 * 2 - 1, None)
    record = {
        "steps": steps,
        "images_seen": seen,
        "train_loop_s": seconds,
        "sample_s": sample_s,
        "samples": spec["out"],
        "version": _refs.version("lucidrains"),
        "recipe": {
            "unet": _refs.LUCIDRAINS_UNET,
            "trainer": _refs.LUCIDRAINS_TRAINER,
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


def score_all(args, contestants: dict) -> dict:
    """Domain metrics of each contestant's samples and of n real TRAIN images (the floor).

    The domain metrics' reference statistics are the TEST set's, so the floor uses training images,
    as `ddpmkit.eval.report.evaluate_reference` does: held out from the reference, like the samples."""
    from ddpmkit.data import load_dataset, to_model_range
    from ddpmkit.eval.domain import DomainMetrics

    metrics = DomainMetrics.for_dataset(args.dataset, args.data_dir, device="cpu", progress=True)
    scores = {}
    for name, c in contestants.items():
        if "samples" in c:
            images, labels = load_npz(Path(c["samples"]))
            scores[name] = metrics.score(images, labels)
    train = load_dataset(args.dataset, "train", args.data_dir)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.n]
    scores["floor"] = metrics.score(to_model_range(train.images[pick]), train.labels[pick])
    return scores


def report(result: dict) -> str:
    c, s = result["contestants"], result["scores"]
    lines = [
        f"# Quality per minute, {result['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        *([_measure.busy_warning(result["machine"]), ""] if _measure.busy_warning(result["machine"]) else []),
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
        f"{result['machine']['torch']}, {result['threads']} threads. Dataset {result['dataset']}; "
        f"{result['minutes']} training minutes each; {result['n']} samples each, scored with "
        "ddpmkit.eval.domain.DomainMetrics against the test set's features.",
        "",
        "| | minutes | steps | images seen | FD_dom | vs ref | precision | recall | class entropy | cond. accuracy |",
        "|" + "---|" * 10,
    ]
    if result["machine"].get("note"):
        lines[-2:-2] = [f"Note: {result['machine']['note']}.", ""]
    ref = s.get("lucidrains", {}).get("fd_dom")
    for name in ("ddpmkit", "lucidrains", "floor"):
        if name not in s:
            continue
        info, sc = c.get(name, {}), s[name]
        ratio = f"{sc['fd_dom'] / ref:.2f}" if ref and name == "ddpmkit" else ""
        acc = "" if sc["conditional_accuracy"] is None else f"{sc['conditional_accuracy']:.3f}"
        label = "floor (real train images)" if name == "floor" else name
        minutes = "" if name == "floor" else f"{result['minutes']:g}"
        lines.append(
            f"| {label} | {minutes} | {info.get('steps', '')} | {info.get('images_seen', '')} | "
            f"{sc['fd_dom']:.3f} | {ratio} | {sc['precision']:.3f} | {sc['recall']:.3f} | "
            f"{sc['class_entropy']:.3f} | {acc} |"
        )
    d, r = c.get("ddpmkit", {}), c.get("lucidrains", {})
    if "train_process_s" in d:
        lines.append(
            f"\nWall clock: ddpmkit `train` process {d['train_process_s']:.0f} s (start-up, data, "
            f"the --minutes loop, final checkpoint and grid), `sample` process {d['sample_process_s']:.0f} s."
        )
    if "train_loop_s" in r:
        lines.append(f"lucidrains training loop {r['train_loop_s']:.0f} s, sampling {r['sample_s']:.0f} s.")
    for name, info in c.items():
        if "skipped" in info:
            lines.append(f"\nSkipped {name}: {info['skipped']}")
        if "note" in info:
            lines.append(f"\n{name}: {info['note']}.")
    lines += [
        "",
        "ddpmkit: `ddpmkit train` defaults (class-conditional), samples from `ddpmkit sample` "
        "(run's default sampler; classes balanced).",
        "lucidrains: Unet(dim=32, dim_mults=(1, 2, 4), channels=1) in GaussianDiffusion (its defaults), "
        "its Trainer's defaults in a plain loop (bench/_refs.py); DDIM with sampling_timesteps=50.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Quality per minute: ddpmkit against lucidrains' reference.")
    p.add_argument("--minutes", type=float, default=15.0, help="training wall-clock minutes for each (15)")
    p.add_argument("--n", type=int, default=1000, help="samples scored for each, and real images for the floor (1000)")
    p.add_argument("--out-dir", default=str(HERE / "_work"), help="work directory for runs and samples (bench/_work)")
    p.add_argument("--results-dir", default=str(HERE / "results"), help="where quality-<date>.{md,json} go")
    p.add_argument("--keep-runs", action="store_true", help="keep the run directories and samples afterwards")
    p.add_argument("--threads", type=int, default=2, help="torch threads for both (2)")
    p.add_argument("--dataset", default="fashion-mnist", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help="where the dataset files are (else ddpmkit's usual places)")
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
    if args.minutes <= 0 or args.n < 2:
        p.error("--minutes must be > 0 and --n >= 2")
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
    work = Path(args.score_only) if args.score_only else Path(args.out_dir) / f"quality-{date}-{os.getpid()}"
    if args.score_only:
        args.keep_runs = True
    else:
        work.mkdir(parents=True)
    try:
        contestants = (
            {"ddpmkit": ddpmkit_record(work), "lucidrains": _lucidrains_record(work)}
            if args.score_only
            else {"ddpmkit": run_ddpmkit(args, work), "lucidrains": run_lucidrains(args, work)}
        )
        if "skipped" in contestants["lucidrains"]:
            print(f"skipping lucidrains: {contestants['lucidrains']['skipped']}", file=sys.stderr)
        command = "python bench/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
        result = {
            "date": date,
            "command": command.strip(),
            "machine": machine,
            "threads": args.threads,
            "dataset": args.dataset,
            "minutes": args.minutes,
            "n": args.n,
            "seed": args.seed,
            "contestants": contestants,
            "scores": score_all(args, contestants),
        }
    finally:
        if not args.keep_runs:
            shutil.rmtree(work, ignore_errors=True)
    text = report(result)
    stem = Path(args.results_dir) / f"quality-{date}"
    _measure.write_report(stem, result, text)
    if not args.keep_runs:
        print(f"removed {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
