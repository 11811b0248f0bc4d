"""Every figure of the README's headline ("What 15 CPU minutes give") from one command, at the defaults.

    python bench/headline.py                      # -> bench/results/headline-<date>[-<kind>].{md,json}, -samples.png
    python bench/headline.py --minutes 0.05 --n 20 --nll-n 2 --nll-stride 200 \\
        --data-dir DIR --results-dir bench/_work   # a smoke run of the harness (seconds), not a measurement

One after the other, each in its own process and each with ddpmkit's defaults:

  1. `ddpmkit train --dataset fashion-mnist --minutes M` (the README's command; steps reached and images/s
     are read back from the run);
  2. `ddpmkit sample RUN --n 100 --seed 0` (the picture);
  3. `ddpmkit eval --reference fashion-mnist --n N` (real training images: the floor);
  4. `ddpmkit eval RUN --n N` (the run's default sampler, with bits/dim: -log p(x|y) and
     -log p(x), each on --nll-n test images with its standard error);
  5. `ddpmkit eval RUN --n N --sampler ddim --steps 50 --spacing uniform` (DDIM 50, the default until
     issue 14) and `... --sampler dpm++ --steps 15 --spacing uniform` (DPM-Solver++(2M) 15 steps);
  6. `ddpmkit eval --reference fashion-mnist --blur 1 --n N` (what a light blur costs).

The report names the machine: the CPU model, its kind for this purpose (AVX-512 BF16, AVX-512 without
bf16, AVX2), the cores and torch threads, and the precision "auto" resolved to (bf16 autocast only where
the CPU computes bf16 natively; fp32 elsewhere, where a 15-minute run makes fewer steps).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _measure

HERE = Path(__file__).resolve().parent
SAMPLE_PNG_N = 100


def cpu_kind(flags: set[str]) -> str:
    """What decides the default precision and most of the speed on a CPU here."""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return "AVX-512 BF16"
    if "avx512f" in flags:
        return "AVX-512 (no bf16)"
    return "AVX2" if "avx2" in flags else "no AVX2"


def _slug(kind: str) -> str:
    """ "AVX-512 (no bf16)" -> "avx-512-no-bf16": a CPU kind as part of a file name."""
    return "-".join("".join(c if c.isalnum() else " " for c in kind.lower()).split())


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1] for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def machine(threads: int) -> dict:
    from ddpmkit.core.precision import resolve_precision

    info = _measure.machine(threads)
    return {**info, "cpu_kind": cpu_kind(cpu_flags()), "auto_precision": resolve_precision("auto", "cpu")}


def _run(cmd: list[str], threads: int) -> float:
    """Run a command (its output passes through to stderr); return its wall-clock seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    start = time.monotonic()
    subprocess.run(cmd, env=env, check=True, stdout=sys.stderr)
    return time.monotonic() - start


def trained(run: Path) -> dict:
    """Steps reached and the last logged images/s of a run directory."""
    from ddpmkit.run import checkpoint

    config = checkpoint.load_config(run)
    steps = json.loads((checkpoint.latest_checkpoint(run) / "state.json").read_text())["step"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [m["images_per_s"] for m in lines if "images_per_s" in m]
    return {
        "steps": steps,
        "images_seen": steps * config.train.batch_size * config.train.grad_accum,
        "last_images_per_s": rates[-1] if rates else None,
        "config": json.loads(config.to_json()),
    }


# the rows of the headline table: (key, what, `ddpmkit eval` arguments after the run or reference)
ROWS = [
    ("reference", "real training images (floor)", ["--reference", "fashion-mnist"]),
    ("default", "the model, the default sampler ({sampler}, {steps} steps, {spacing} spacing)", ["RUN"]),
    ("ddim50", "the model, DDIM 50 steps", ["RUN", *_measure.DDIM_50_FLAGS]),
    (
        "dpmpp15",
        "the model, DPM-Solver++(2M) 15 steps, uniform spacing",
        ["RUN", "--sampler", "dpm++", "--steps", "15", "--spacing", "uniform"],
    ),
    ("blur1", "real images blurred (sigma 1 px)", ["--reference", "fashion-mnist", "--blur", "1"]),
]
NLL_ROW = "default"  # bits/dim do not depend on the sampler: computed once, with this row


def eval_command(args, key: str, target: list[str], run: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "ddpmkit", "eval", *[str(run) if a == "RUN" else a for a in target]]
    cmd += ["--n", str(args.n), "--seed", str(args.seed), "--inception", "off", "--no-progress", "--out", str(out)]
    if "RUN" in target:
        nll_n = args.nll_n if key == NLL_ROW else 0
        cmd += ["--nll-n", str(nll_n), "--nll-stride", str(args.nll_stride)]
    elif args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    return cmd


def _bpd(nll: dict, quantity: str) -> str:
    q = (nll or {}).get(quantity)
    if not q:
        return "—"
    return "skipped" if "skipped" in q else f"{q['bpd']:.2f} ± {q['bpd_sem']:.2f}"


def table(result: dict) -> str:
    m, t = result["machine"], result["train"]
    lines = [
        f"# Headline: {result['minutes']:g} CPU minutes on Fashion-MNIST at the defaults ({result['date']})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, CPU kind **{m['cpu_kind']}**, "
        f"`--precision auto` = **{m['auto_precision']}**; torch {m['torch']}, Python {m['python']}.",
        "",
        f"Training reached step {t['steps']:,} ({t['images_seen']:,} images; last logged "
        f"{t['last_images_per_s'] or 0:.0f} images/s) in {t['seconds']:.0f} s of process time.",
        "",
    ]
    busy = _measure.busy_warning(m)
    lines += [busy, ""] if busy else []
    n = result["n"]
    lines += [
        f"| {n:,} images | FD_dom | conditional accuracy | precision | recall "
        f"| bits/dim -log p(x\\|y) | bits/dim -log p(x) | eval seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, what, _ in ROWS:
        row = result["rows"][key]
        what, r = what.format(**{"sampler": "", "steps": "", "spacing": "", **row.get("sampling", {})}), row["results"]
        d = r["domain"]
        accuracy = "—" if d.get("conditional_accuracy") is None else f"{d['conditional_accuracy']:.3f}"
        lines.append(
            f"| {what} | {d['fd_dom']:.1f} | {accuracy} | {d['precision']:.3f} | {d['recall']:.3f} "
            f"| {_bpd(r.get('nll'), 'conditional')} | {_bpd(r.get('nll'), 'unconditional')} | {row['seconds']:.0f} |"
        )
    nll_row = result["rows"][NLL_ROW]
    lines += [
        "",
        f"Bits/dim: the variational bound on {nll_row['nll_n']:,} test images, one stratified KL term per block of "
        f"{nll_row['nll_stride']} steps, ± one standard error; -log p(x|y) gives each image its class, -log p(x) "
        "the null class (the unconditional model that label dropout trains). Samples: "
        f"`ddpmkit sample RUN --n {SAMPLE_PNG_N} --seed 0` -> {result['samples_png']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The README's headline figures from one command, at the defaults.")
    p.add_argument("--minutes", type=float, default=15.0, help="training wall-clock minutes (15)")
    p.add_argument("--n", type=int, default=1000, help="images scored per row (1000)")
    p.add_argument("--nll-n", type=int, default=1000, help="test images for each bits/dim (1000)")
    p.add_argument("--nll-stride", type=int, default=10, help="KL terms: one per block of K steps (10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (2, the project's machine)")
    p.add_argument("--data-dir", help="where the Fashion-MNIST files are (else ddpmkit's usual places)")
    p.add_argument("--out-dir", default=str(HERE / "_work" / "headline"), help="work directory for the run")
    p.add_argument("--results-dir", default=str(HERE / "results"), help="where headline-<date>.* go")
    p.add_argument("--keep-run", action="store_true", help="keep the run directory afterwards")
    args = p.parse_args(argv)

    work, results = Path(args.out_dir), Path(args.results_dir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    results.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    kind = cpu_kind(cpu_flags())  # in the name: reports of each CPU kind are kept side by side
    stem = results / f"headline-{date}" if kind == "AVX-512 BF16" else results / f"headline-{date}-{_slug(kind)}"
    run, cli = work / "run", [sys.executable, "-m", "ddpmkit"]
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    result = {
        "date": date,
        "command": "python bench/headline.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "minutes": args.minutes,
        "n": args.n,
        "machine": machine(args.threads),
    }
    train = ["train", "--dataset", "fashion-mnist", *data, "--minutes", str(args.minutes), "--seed", str(args.seed)]
    seconds = _run([*cli, *train, "--out", str(run), "--no-progress"], args.threads)
    result["train"] = {**trained(run), "seconds": seconds}
    png = stem.with_name(stem.name + "-samples.png")
    _run([*cli, "sample", str(run), "--n", str(SAMPLE_PNG_N), "--seed", "0", "--out", str(png)], args.threads)
    result["samples_png"] = str(png.relative_to(HERE.parent) if png.is_relative_to(HERE.parent) else png)
    result["rows"] = {}
    for key, _, target in ROWS:
        out = work / f"eval-{key}.json"
        _run(eval_command(args, key, target, run, out), args.threads)
        result["rows"][key] = json.loads(out.read_text())
    if not args.keep_run:
        shutil.rmtree(run)
    _measure.write_report(stem, result, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(_measure.run_main(main))
