"""Seed 003's model options at equal wall-clock time: throughput and domain FD with and without each.

    python bench/options.py --minutes 3 --n 500     # writes bench/results/options-<date>.{md,json}

Every row is `ddpmkit train --dataset fashion-mnist --minutes M` with the default recipe plus one
option, run one after another on the same machine, then `ddpmkit eval --n N --sampler ddim --steps 50
--spacing uniform` (DDIM, 50 steps, as before issue 14; domain metrics only). Training images/s is
the median of the run's logged windows after the first. A first section times one attention layer,
full against linear, at 28x28 and 32x32 (forward + backward, the batch and widths of the default
model's first level).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _measure
import torch

HERE = Path(__file__).resolve().parent
ROWS = {  # name -> the flags added to the default recipe
    "default": [],
    "--self-condition": ["--self-condition"],
    "linear attention at 28, 14, 7 (full in the mid block)": ["--attn-resolutions", "28,14,7", "--attn-type", "linear"],
    "--time-embedding learned": ["--time-embedding", "learned"],
    "--time-embedding random_fourier": ["--time-embedding", "random_fourier"],
    "--preset seed-003 (the seed's layout)": ["--preset", "seed-003"],
}


def attention_timing(threads: int, batch: int = 64, repeats: int = 5) -> list[dict]:
    """Seconds of forward + backward through one Attention2d, full and linear, at 28x28 and 32x32."""
    from ddpmkit.models.layers import Attention2d

    torch.set_num_threads(threads)
    out = []
    for size in (28, 32):
        for channels in (32, 64):
            x = torch.randn(batch, channels, size, size, requires_grad=True)
            row = {"size": size, "channels": channels, "batch": batch}
            for kind in ("full", "linear"):
                layer = Attention2d(channels, num_heads=4, kind=kind)
                layer(x).sum().backward()  # warm-up
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    layer(x).sum().backward()
                    times.append(time.perf_counter() - start)
                row[f"{kind}_ms"] = 1000 * statistics.median(times)
            row["speedup"] = row["full_ms"] / row["linear_ms"]
            out.append(row)
    return out


def dataset_flags(args) -> list[str]:
    """`ddpmkit train`'s dataset flags: Fashion-MNIST unless the script set args.dataset (recipe.py --set)."""
    flags = ["--dataset", getattr(args, "dataset", "fashion-mnist")]
    flags += ["--data-dir", args.data_dir] if args.data_dir else []
    return flags + (["--image-size", str(args.image_size)] if getattr(args, "image_size", None) else [])


def run_row(name: str, flags: list[str], args, run: Path) -> dict:
    from ddpmkit.run import checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    cli = [sys.executable, "-m", "ddpmkit"]
    peak_file = run.with_name(f"{run.name}-peak-rss-mib.txt")
    print(f"$ ddpmkit train {' '.join(flags)} --minutes {args.minutes}", file=sys.stderr, flush=True)
    started = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            str(HERE / "_peak.py"),  # `ddpmkit train ...`, writing its peak resident memory to peak_file
            str(peak_file),
            "train",
            *dataset_flags(args),
            *flags,
            "--minutes",
            str(args.minutes),
            "--out",
            str(run),
            "--no-progress",
            "--seed",
            str(args.seed),
        ],
        env=env,
        check=True,
    )
    train_s = time.monotonic() - started
    report = run.with_name(f"{run.name}-eval.json")
    subprocess.run(
        [
            *cli,
            "eval",
            str(run),
            *_measure.DDIM_50_FLAGS,
            "--n",
            str(args.n),
            "--nll-n",
            "0",
            "--inception",
            "off",
            "--no-progress",
            "--out",
            str(report),
        ],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = checkpoint.load_config(run)
    from ddpmkit.run.build import net as build_net

    with torch.device("meta"):
        params = sum(p.numel() for p in build_net(config).parameters())
    domain = json.loads(report.read_text())["results"]["domain"]
    return {
        "name": name,
        "flags": flags,
        "params": params,
        "steps": metrics[-1]["step"],
        "train_images_per_s": statistics.median(m["images_per_s"] for m in metrics[1:] or metrics),
        "fd_dom": domain["fd_dom"],
        "conditional_accuracy": domain["conditional_accuracy"],
        "conditional_balanced_accuracy": domain.get("conditional_balanced_accuracy"),
        "precision": domain["precision"],
        "recall": domain["recall"],
        "train_process_minutes": train_s / 60,  # start-up, data, the --minutes loop, the last checkpoint
        "peak_rss_mib": float(peak_file.read_text()),
        "classifier": {k: domain.get(f"classifier_test_{k}") for k in ("accuracy", "balanced_accuracy")},
    }


def report(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Model options at equal time, {result['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        *([_measure.busy_warning(m), ""] if _measure.busy_warning(m) else []),
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {result['threads']} threads. "
        f"Fashion-MNIST, {result['minutes']:g} training minutes per row, {result['n']} samples "
        "(DDIM 50) scored with the domain metrics.",
        "",
        "| option | params | train img/s | vs default | steps | FD_dom | vs default | cond. accuracy "
        "| precision | recall |",
        "|" + "---|" * 10,
    ]
    base = result["rows"][0]  # the first row run (the default recipe unless --rows leaves it out)
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['train_images_per_s']:.0f} | "
            f"{r['train_images_per_s'] / base['train_images_per_s']:.2f}x | {r['steps']} | "
            f"{r['fd_dom']:.1f} | {r['fd_dom'] / base['fd_dom']:.2f}x | {r['conditional_accuracy']:.3f} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} |"
        )
    lines += [
        "",
        f"One attention layer, forward + backward (4 heads, batch {result['attention'][0]['batch']}), median ms:",
        "",
        "| size | channels | full | linear | full / linear |",
        "|---|---|---|---|---|",
    ]
    for a in result["attention"]:
        lines.append(
            f"| {a['size']}x{a['size']} | {a['channels']} | {a['full_ms']:.1f} | {a['linear_ms']:.1f} | "
            f"{a['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def row_parser(description: str, minutes: float, stem: str) -> argparse.ArgumentParser:
    """The flags of a benchmark that trains rows of `ddpmkit train` flags (this one, recipe.py)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--minutes", type=float, default=minutes, help=f"training minutes per row ({minutes:g})")
    p.add_argument("--n", type=int, default=500, help="samples scored per row (500)")
    p.add_argument("--rows", help="comma-separated row numbers to run (all); 0 is the default recipe")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    p.add_argument("--data-dir", help="where the dataset files are (else ddpmkit's usual places)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(HERE / "_work"), help="work directory (bench/_work)")
    p.add_argument("--keep-runs", action="store_true", help="keep each row's run (OUT_DIR/STEM-DATE-PID/run-I)")
    p.add_argument("--results-dir", default=str(HERE / "results"), help=f"where {stem}-<date>.{{md,json}} go")
    return p


def parse_rows(p: argparse.ArgumentParser, argv, names):
    """(args, the row names chosen by --rows); one-line errors for impossible values. names: the
    rows' names, or a function of the parsed args giving them (recipe.py's --set)."""
    args = p.parse_args(argv)
    names = names(args) if callable(names) else names
    if args.minutes <= 0 or args.n < 2:
        p.error("--minutes must be > 0 and --n >= 2")
    try:
        return args, [names[int(i)] for i in args.rows.split(",")] if args.rows else names
    except (ValueError, IndexError):
        p.error(f"--rows takes numbers from 0 to {len(names) - 1}, comma-separated")


def run_rows(args, chosen: list[str], flags: dict, stem: str, argv, extra=None) -> dict:
    """Train and score each chosen row one after the other; the result record (machine, rows, ...)."""
    machine = _measure.machine(args.threads)
    if _measure.busy_warning(machine):
        print(_measure.busy_warning(machine), file=sys.stderr)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "threads": args.threads,
        "minutes": args.minutes,
        "n": args.n,
        "seed": args.seed,
        **(extra() if extra else {}),
    }
    work = Path(args.out_dir) / f"{stem}-{result['date']}-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        rows = [run_row(name, flags[name], args, work / f"run-{i}") for i, name in enumerate(chosen)]
    finally:
        if not args.keep_runs:
            shutil.rmtree(work, ignore_errors=True)
    command = f"python bench/{stem}.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return {**result, "command": command.strip(), "rows": rows}


def main(argv=None) -> int:
    p = row_parser("Seed 003's options at equal time: throughput and domain FD.", 3.0, "options")
    args, chosen = parse_rows(p, argv, list(ROWS))
    result = run_rows(args, chosen, ROWS, "options", argv, extra=lambda: {"attention": attention_timing(args.threads)})
    suffix = "-rows-" + "-".join(args.rows.split(",")) if args.rows else ""
    _measure.write_report(Path(args.results_dir) / f"options-{result['date']}{suffix}", result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(_measure.run_main(main))
