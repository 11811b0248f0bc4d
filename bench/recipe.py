"""Tuning the default small-data recipe: one change at a time, each trained for the same wall clock.

    python bench/recipe.py --minutes 4 --n 500          # the sweep: bench/results/recipe-<date>.{md,json}
    python bench/recipe.py --minutes 15 --n 1000 --rows 0,3   # confirm a winner at the issue's budget

Every row is `ddpmkit train --dataset fashion-mnist --minutes M` with the default recipe plus one
change (batch, learning rate, EMA decay, min-SNR weighting, model width), run one after another on
the same machine with the same seed, then `ddpmkit eval --n N` (DDIM, 50 steps; domain metrics only).
A shorter budget than the final one ranks the changes cheaply; the winner is confirmed at the full
budget against the default in one run (`--rows`), since what wins in 4 minutes can lose in 15.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
from pathlib import Path

import _measure
from options import run_row

HERE = Path(__file__).resolve().parent
ROWS = {  # name -> the flags added to the default recipe
    "default (batch 64, lr 1e-3, warm-up 200, EMA 0.999, v, base 32)": [],
    "--batch-size 32": ["--batch-size", "32"],
    "--batch-size 128": ["--batch-size", "128"],
    "--lr 2e-3": ["--lr", "2e-3"],
    "--lr 5e-4": ["--lr", "5e-4"],
    "--ema-decay 0.998": ["--ema-decay", "0.998"],
    "--ema-decay 0.9995": ["--ema-decay", "0.9995"],
    "--min-snr-gamma 5": ["--min-snr-gamma", "5"],
    "--base-channels 48": ["--base-channels", "48"],
}


def report(result: dict) -> str:
    m = result["machine"]
    lines = [f"# The small-data recipe, one change at a time, {result['date']}", "",
             f"Command: `{result['command']}`", "",
             *([_measure.busy_warning(m), ""] if _measure.busy_warning(m) else []),
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {result['threads']} threads. "
             f"Fashion-MNIST, {result['minutes']:g} training minutes per row, seed {result['seed']}, "
             f"{result['n']} samples (DDIM 50) scored with the domain metrics.", "",
             "| change | params | train img/s | steps | FD_dom | vs first row | cond. accuracy | precision "
             "| recall |", "|" + "---|" * 9]
    base = result["rows"][0]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['train_images_per_s']:.0f} | {r['steps']} | "
                     f"{r['fd_dom']:.1f} | {r['fd_dom'] / base['fd_dom']:.2f}x | {r['conditional_accuracy']:.3f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The default recipe, one change at a time, at equal wall clock.")
    p.add_argument("--minutes", type=float, default=4.0, help="training minutes per row (4)")
    p.add_argument("--n", type=int, default=500, help="samples scored per row (500)")
    p.add_argument("--rows", help="comma-separated row numbers to run (all); 0 is the default recipe")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    p.add_argument("--data-dir", help="where the dataset files are (else ddpmkit's usual places)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(HERE / "_work"), help="work directory (bench/_work)")
    p.add_argument("--results-dir", default=str(HERE / "results"), help="where recipe-<date>.{md,json} go")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.n < 2:
        p.error("--minutes must be > 0 and --n >= 2")
    names = list(ROWS)
    try:
        chosen = [names[int(i)] for i in args.rows.split(",")] if args.rows else names
    except (ValueError, IndexError):
        p.error(f"--rows takes numbers from 0 to {len(names) - 1}, comma-separated")
    machine = _measure.machine(args.threads)
    if _measure.busy_warning(machine):
        print(_measure.busy_warning(machine), file=sys.stderr)
    date = datetime.date.today().isoformat()
    work = Path(args.out_dir) / f"recipe-{date}-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        rows = [run_row(name, ROWS[name], args, work / f"run-{i}") for i, name in enumerate(chosen)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python bench/recipe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"date": date, "command": command.strip(), "machine": machine, "threads": args.threads,
              "minutes": args.minutes, "n": args.n, "seed": args.seed, "rows": rows}
    suffix = f"-{args.minutes:g}min" + ("-rows-" + "-".join(args.rows.split(",")) if args.rows else "")
    _measure.write_report(Path(args.results_dir) / f"recipe-{date}{suffix}", result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
