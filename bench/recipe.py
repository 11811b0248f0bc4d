"""Tuning the default small-data recipe: one change at a time, each trained for the same wall clock.

    python bench/recipe.py --minutes 4 --n 500          # the sweep: bench/results/recipe-<date>.{md,json}
    python bench/recipe.py --minutes 15 --n 1000 --rows 0,3   # confirm a winner at the issue's budget
    python bench/recipe.py --set folder-32 --data-dir ../shared/data/emoji-noto --minutes 4 --n 500
    python bench/recipe.py --set folder-64 --data-dir ../shared/data/emoji-noto --minutes 15 --rows 0

Every row is `ddpmkit train` on the set's data with the default recipe plus one change (batch,
learning rate, EMA decay, loss weighting, model width and depth, attention, flips, class balance,
self-conditioning, noise-level sampling, power EMA), run one after another on the same machine
with the same seed, then `ddpmkit eval --n N` (DDIM, 50 steps; domain metrics only; a folder is
judged against its held-out split). Each row also reports the minutes its `ddpmkit train` process
took and its peak resident memory (64x64 on 2 cores must stay under 4 GiB).
A shorter budget than the final one ranks the changes cheaply; the winner is confirmed at the full
budget against the default in one run (`--rows`), since what wins in 4 minutes can lose in 15.

Sets (`--set`): fashion-mnist (the default); fashion-short: issue 17's round of what the field found
since DDPM for short budgets (lr decay to the budget's end, power EMA, EDM's noise levels, width).
The fashion-mnist set's sweep of bench/results/recipe-2026-11-27-* made
min-SNR (gamma 5) the default; row 7, which was `--min-snr-gamma 5` then, is now
`--min-snr-gamma off`, so a rerun is the next round: each change on top of min-SNR.
folder-32 and folder-64: `--dataset folder --data-dir DIR --image-size 32 / 64`, for a folder of
colour images such as ../shared/data/emoji-noto (issue #12), whose defaults are chosen from
the folder-32 rows; the folder-64 rows say what 64x64 takes in minutes and memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import _measure
from options import parse_rows, row_parser, run_rows

MEMORY_LIMIT_MIB = 4096  # 64x64 on the project's 2-core machine must stay under 4 GiB

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
# issue 17's round: what the field found since DDPM for small budgets, each on top of the defaults
SHORT_BUDGET_ROWS = {
    "default (constant lr after warm-up, EMA 0.999 with warm-up, uniform t, min-SNR 5, base 32)": [],
    "--lr-schedule cosine (decay to 0 at the end of the budget)": ["--lr-schedule", "cosine"],
    "--ema-power 7 (Karras et al. 2024 power EMA, sigma_rel ~ 0.10: an average over the last ~10%)": [
        "--ema-power",
        "7",
    ],
    "--t-sampling lognormal (EDM's noise levels)": ["--t-sampling", "lognormal"],
    "EDM-like: --t-sampling lognormal --min-snr-gamma off (v loss = EDM's weighting at sigma_data 1)": [
        "--t-sampling",
        "lognormal",
        "--min-snr-gamma",
        "off",
    ],
    "--lr 2e-3 --lr-schedule cosine (a higher peak that decays)": ["--lr", "2e-3", "--lr-schedule", "cosine"],
    "--base-channels 24 (narrower: more steps in the same time)": ["--base-channels", "24"],
}
FOLDER_32_ROWS = {
    "default (whatever `ddpmkit train` derives for this folder at 32x32)": [],
    "--base-channels 48 (wider)": ["--base-channels", "48"],
    "--num-res-blocks 2 (deeper)": ["--num-res-blocks", "2"],
    "--channel-mults 1,2,2,2 (a fourth level, 4x4)": ["--channel-mults", "1,2,2,2"],
    "--attn-resolutions 16,8 (attention at two levels)": ["--attn-resolutions", "16,8"],
    "--batch-size 32": ["--batch-size", "32"],
    "--batch-size 128": ["--batch-size", "128"],
    "--lr 1e-3 (the default before 2e-3 was measured better here)": ["--lr", "1e-3"],
    "--lr 4e-3": ["--lr", "4e-3"],
    "--ema-decay 0.998": ["--ema-decay", "0.998"],
    "--ema-decay 0.9995": ["--ema-decay", "0.9995"],
    "--min-snr-gamma off (L_simple)": ["--min-snr-gamma", "off"],
    "--hflip (random flips on; off by default for a folder: they mirror text and flags)": ["--hflip"],
    "--class-balance 0.5 (small classes drawn more often; the default since, so now row 0 again)": [
        "--class-balance",
        "0.5",
    ],
    "--class-balance 1 (every class equally often)": ["--class-balance", "1"],
    "--channel-mults 1,2,4 (twice the width at 8x8: 2.4x the parameters, 1.5x the FLOPs)": [
        "--channel-mults",
        "1,2,4",
    ],
    "--self-condition (Chen et al., Analog Bits: x0_hat fed back; an extra no-grad pass on half the steps)": [
        "--self-condition"
    ],
    "--t-sampling lognormal (EDM's noise levels: more steps where the content is decided)": [
        "--t-sampling",
        "lognormal",
    ],
    "--ema-power 7 (Karras et al. 2024 power EMA, an average over the last ~10% of the run)": ["--ema-power", "7"],
}
FOLDER_64_ROWS = {
    "default (whatever `ddpmkit train` derives for this folder at 64x64)": [],
    "--channel-mults 1,2,2,2 (a fourth level, 8x8)": ["--channel-mults", "1,2,2,2"],
    "--base-channels 48 (wider)": ["--base-channels", "48"],
    "--batch-size 32": ["--batch-size", "32"],
    "--lr 2e-3": ["--lr", "2e-3"],
    "--grad-checkpointing (less memory, more compute)": ["--grad-checkpointing"],
}
# set -> (dataset, image size, rows)
ROW_SETS = {
    "fashion-mnist": ("fashion-mnist", None, ROWS),
    "fashion-short": ("fashion-mnist", None, SHORT_BUDGET_ROWS),
    "folder-32": ("folder", 32, FOLDER_32_ROWS),
    "folder-64": ("folder", 64, FOLDER_64_ROWS),
}


def report(result: dict) -> str:
    m = result["machine"]
    data = result["dataset"] + (f" {Path(result['data_dir']).name}" if result.get("data_dir") else "")
    data += f" at {result['image_size']}x{result['image_size']}" if result.get("image_size") else ""
    lines = [
        f"# The small-data recipe, one change at a time, {result['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        *([_measure.busy_warning(m), ""] if _measure.busy_warning(m) else []),
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {result['threads']} threads. "
        f"{data}, {result['minutes']:g} training minutes per row, seed {result['seed']}, "
        f"{result['n']} samples (DDIM 50) scored with the domain metrics.",
        "",
        "| change | params | train img/s | steps | FD_dom | vs first row | cond. accuracy | cond. balanced accuracy "
        "| precision | recall | train process minutes | peak MiB |",
        "|" + "---|" * 12,
    ]
    base = result["rows"][0]
    for r in result["rows"]:
        balanced = r.get("conditional_balanced_accuracy")
        peak = r.get("peak_rss_mib")
        over = " (over 4 GiB)" if peak is not None and peak > MEMORY_LIMIT_MIB else ""
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['train_images_per_s']:.0f} | {r['steps']} | "
            f"{r['fd_dom']:.1f} | {r['fd_dom'] / base['fd_dom']:.2f}x | {r['conditional_accuracy']:.3f} | "
            f"{'' if balanced is None else f'{balanced:.3f}'} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{r.get('train_process_minutes', float('nan')):.1f} | "
            f"{'' if peak is None else f'{peak:.0f}'}{over} |"
        )
    classifier = base.get("classifier", {})
    if classifier.get("accuracy") is not None:
        lines += [
            "",
            f"The domain classifier scores {classifier['accuracy']:.3f} accuracy and "
            f"{classifier['balanced_accuracy']:.3f} balanced accuracy on the held-out test images: "
            "differences in accuracy smaller than its errors mean little.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = row_parser("The default recipe, one change at a time, at equal wall clock.", 4.0, "recipe")
    p.add_argument(
        "--set", choices=list(ROW_SETS), default="fashion-mnist", help="the data and its rows (fashion-mnist)"
    )
    args, chosen = parse_rows(p, argv, lambda args: list(ROW_SETS[args.set][2]))
    args.dataset, args.image_size, rows = ROW_SETS[args.set]
    if args.dataset == "folder" and not args.data_dir:
        p.error(f"--set {args.set} needs --data-dir, the folder of images")
    where = {"set": args.set, "dataset": args.dataset, "data_dir": args.data_dir, "image_size": args.image_size}
    result = run_rows(args, chosen, rows, "recipe", argv, extra=lambda: where)
    suffix = "" if args.set == "fashion-mnist" else f"-{args.set}"
    suffix += f"-{args.minutes:g}min" + ("-rows-" + "-".join(args.rows.split(",")) if args.rows else "")
    _measure.write_report(Path(args.results_dir) / f"recipe-{result['date']}{suffix}", result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(_measure.run_main(main))
