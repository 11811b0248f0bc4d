"""Tuning the default small-data recipe: one change at a time, each trained for the same wall clock.

    python bench/recipe.py --minutes 4 --n 500          # the sweep: bench/results/recipe-<date>.{md,json}
    python bench/recipe.py --minutes 15 --n 1000 --rows 0,3   # confirm a winner at the issue's budget

Every row is `ddpmkit train --dataset fashion-mnist --minutes M` with the default recipe plus one
change (batch, learning rate, EMA decay, loss weighting, model width), run one after another on
the same machine with the same seed, then `ddpmkit eval --n N` (DDIM, 50 steps; domain metrics only).
A shorter budget than the final one ranks the changes cheaply; the winner is confirmed at the full
budget against the default in one run (`--rows`), since what wins in 4 minutes can lose in 15.
The sweep of bench/results/recipe-2026-11-27-* made min-SNR (gamma 5) the default; row 7, which was
`--min-snr-gamma 5` then, is now `--min-snr-gamma off`, so a rerun is the next round: each change
on top of min-SNR.
"""

from __future__ import annotations

import sys
from pathlib import Path

import _measure
from options import parse_rows, row_parser, run_rows

ROWS = {  # name -> the flags added to the default recipe
    "default (batch 64, lr 1e-3, warm-up 200, EMA 0.999, v, min-SNR 5, base 32)": [],
    "--batch-size 32": ["--batch-size", "32"],
    "--batch-size 128": ["--batch-size", "128"],
    "--lr 2e-3": ["--lr", "2e-3"],
    "--lr 5e-4": ["--lr", "5e-4"],
    "--ema-decay 0.998": ["--ema-decay", "0.998"],
    "--ema-decay 0.9995": ["--ema-decay", "0.9995"],
    "--min-snr-gamma off (L_simple; the default before this sweep)": ["--min-snr-gamma", "off"],
    "--base-channels 48": ["--base-channels", "48"],
}


def report(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# The small-data recipe, one change at a time, {result['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        *([_measure.busy_warning(m), ""] if _measure.busy_warning(m) else []),
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {result['threads']} threads. "
        f"Fashion-MNIST, {result['minutes']:g} training minutes per row, seed {result['seed']}, "
        f"{result['n']} samples (DDIM 50) scored with the domain metrics.",
        "",
        "| change | params | train img/s | steps | FD_dom | vs first row | cond. accuracy | precision | recall |",
        "|" + "---|" * 9,
    ]
    base = result["rows"][0]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['train_images_per_s']:.0f} | {r['steps']} | "
            f"{r['fd_dom']:.1f} | {r['fd_dom'] / base['fd_dom']:.2f}x | {r['conditional_accuracy']:.3f} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = row_parser("The default recipe, one change at a time, at equal wall clock.", 4.0, "recipe")
    args, chosen = parse_rows(p, argv, list(ROWS))
    result = run_rows(args, chosen, ROWS, "recipe", argv)
    suffix = f"-{args.minutes:g}min" + ("-rows-" + "-".join(args.rows.split(",")) if args.rows else "")
    _measure.write_report(Path(args.results_dir) / f"recipe-{result['date']}{suffix}", result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
