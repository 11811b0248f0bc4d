"""Training-step variants of the default model, one process each: what a speed choice is worth here.

    python bench/variants.py                  # foreach vs fused AdamW, channels_last, --compile
    python bench/variants.py --skip-compile   # without the compile row (it compiles for ~2 minutes)

Each row builds `ddpmkit.train.Trainer` with the defaults (batch 64, precision auto) on synthetic
1x28x28 data and times Trainer.train_step like bench/speed.py (median of timed windows after a
warm-up); one thing changes per row. Writes bench/results/variants-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _measure
import torch
from _measure import FULL

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "foreach AdamW (before)": "foreach",
    "fused AdamW (default)": "default",
    "fused AdamW, L_simple (--min-snr-gamma off)": "l_simple",
    "fused AdamW + channels_last": "channels_last",
    "fused AdamW + --compile": "compile",
}


def worker(variant: str, threads: int) -> dict:
    import speed

    from ddpmkit.run.build import ARCH_KEYS
    from ddpmkit.run.config import RunConfig, resolve
    from ddpmkit.train import Trainer

    torch.set_num_threads(threads)
    model = {k: getattr(resolve(RunConfig()).model, k) for k in ARCH_KEYS["unet"]}  # the defaults at 28x28
    config = speed.ddpmkit_config(model, True, "auto", FULL, compile=variant == "compile")
    if variant == "l_simple":  # the loss weighting's cost: the default's min-SNR weights are a few ops on [B]
        config.diffusion.min_snr_gamma = None
    trainer = Trainer(config, Path(tempfile.gettempdir()) / "ddpmkit-bench-unused", speed.synthetic_data(256))
    if variant == "foreach":
        trainer.optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=trainer.config.train.lr, foreach=True)
    if variant == "channels_last":
        trainer.model.to(memory_format=torch.channels_last)

    def step():
        trainer.train_step()
        trainer.step += 1

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    rate, rates = _measure.train_images_per_s(step, FULL)
    return {
        "train_images_per_s": rate,
        "windows": rates,
        "first_step_s": first,
        "optimizer": type(trainer.optimizer).__name__,
        "fused": trainer.optimizer.defaults.get("fused"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Training-step variants of the default model.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-compile", action="store_true", help="leave out the --compile row")
    p.add_argument("--results-dir", default=str(HERE / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _measure.emit(worker(args.worker, args.threads))
        return 0
    machine = _measure.machine(args.threads)
    rows = []
    for name, variant in VARIANTS.items():
        if variant == "compile" and args.skip_compile:
            continue
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
        rows.append({"name": name, **_measure.parse_result(proc.stdout)})
    base = next(r for r in rows if r["name"].startswith("fused AdamW (default)"))
    date = datetime.date.today().isoformat()
    command = "python bench/variants.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# Training-step variants, {date}",
        "",
        f"Command: `{command.strip()}`",
        "",
        *([_measure.busy_warning(machine), ""] if _measure.busy_warning(machine) else []),
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {args.threads} threads. "
        "Default model (1.29M parameters, class-conditional), batch 64, precision auto.",
        "",
        "| variant | train img/s | vs default | first step (s) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['train_images_per_s']:.1f} | "
            f"{r['train_images_per_s'] / base['train_images_per_s']:.2f}x | {r['first_step_s']:.1f} |"
        )
    stem = Path(args.results_dir) / f"variants-{date}"
    _measure.write_report(
        stem, {"date": date, "command": command.strip(), "machine": machine, "rows": rows}, "\n".join(lines) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
