"""The default model's training and sampling speed at several git revisions, side by side in one run.

    python bench/revisions.py fd957e9 HEAD            # before/after a change (e.g. a refactor)
    python bench/revisions.py fd957e9 HEAD --rounds 3 --precision fp32

Each revision is checked out into bench/_work/rev-<sha> (a git worktree, made once) and measured
by its own `bench/speed.py --worker` (the "ddpmkit default" row: Trainer.train_step and
sampling.generate with DDIM 50, batch 64) in a fresh process with that tree's `src` first on the
path. Revisions alternate, round after round (A B A B ...), so that drift of a noisy machine
falls on all of them alike; the table gives each revision's median over the rounds and its ratio
to the first revision. Writes bench/results/revisions-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import _measure
from _measure import FULL

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def worktree(revision: str) -> tuple[str, Path]:
    """(full sha, a checkout of it under bench/_work), made on first use."""
    sha = subprocess.run(["git", "rev-parse", revision], cwd=REPO, capture_output=True, text=True, check=True)
    sha = sha.stdout.strip()
    path = HERE / "_work" / f"rev-{sha[:10]}"
    if not path.is_dir():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), sha], cwd=REPO, check=True, capture_output=True
        )
    return sha, path


def default_model() -> dict:
    """The default U-Net's keywords (this tree's defaults; every revision builds the same model)."""
    from ddpmkit.run.build import ARCH_KEYS
    from ddpmkit.run.config import RunConfig, resolve

    # resolved at 28x28: older trees do not know that None means "derive from the image size"
    return {k: getattr(resolve(RunConfig()).model, k) for k in ARCH_KEYS["unet"]}


def measure(tree: Path, model: dict, precision: str, threads: int) -> dict:
    """The default row measured by `tree`'s own harness, with `tree`'s ddpmkit."""
    spec = {
        "impl": "ddpmkit",
        "model": model,
        "conditional": True,
        "precision": precision,
        "threads": threads,
        "sizes": FULL._asdict(),
    }
    proc = subprocess.run(
        [sys.executable, str(tree / "bench" / "speed.py"), "--worker", json.dumps(spec)],
        cwd=tree / "bench",
        env=_env(tree, threads),
        capture_output=True,
        text=True,
        check=True,
    )
    return _measure.parse_result(proc.stdout)


def _env(tree: Path, threads: int) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(tree / "src"),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TQDM_DISABLE": "1",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The default model's speed at several git revisions.")
    p.add_argument("revisions", nargs="+", help="git revisions; the first is the baseline")
    p.add_argument("--rounds", type=int, default=2, help="measurements of each revision, alternating (2)")
    p.add_argument("--precision", default="auto", help="the rows' precision: auto or fp32 (auto)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results-dir", default=str(HERE / "results"))
    args = p.parse_args(argv)
    machine = _measure.machine(args.threads)
    trees = [(rev, *worktree(rev)) for rev in args.revisions]
    model = default_model()
    runs: dict[str, list[dict]] = {sha: [] for _, sha, _ in trees}
    for k in range(args.rounds):
        for rev, sha, tree in trees:
            print(f"round {k + 1}/{args.rounds}: {rev} ({sha[:10]}) ...", file=sys.stderr, flush=True)
            runs[sha].append(measure(tree, model, args.precision, args.threads))
    rows = []
    for rev, sha, _ in trees:
        train = statistics.median(r["train_images_per_s"] for r in runs[sha])
        sample = statistics.median(r["sample_images_per_s"] for r in runs[sha])
        rows.append(
            {"revision": rev, "sha": sha, "train_images_per_s": train, "sample_images_per_s": sample, "runs": runs[sha]}
        )
    base = rows[0]
    date = datetime.date.today().isoformat()
    command = "python bench/revisions.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# Revisions side by side, {date}",
        "",
        f"Command: `{command.strip()}`",
        "",
        *([_measure.busy_warning(machine), ""] if _measure.busy_warning(machine) else []),
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {args.threads} "
        f"threads (AVX-512 BF16: {machine['avx512_bf16']}). The default model (class-conditional), "
        f"batch 64, precision {args.precision}; sampling DDIM 50 steps. Median of {args.rounds} "
        "alternating rounds.",
        "",
        "| revision | train img/s | vs first | sample img/s | vs first | rounds (train; sample) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        each = "; ".join(f"{x['train_images_per_s']:.1f}, {x['sample_images_per_s']:.2f}" for x in r["runs"])
        lines.append(
            f"| {r['revision']} ({r['sha'][:10]}) | {r['train_images_per_s']:.1f} | "
            f"{r['train_images_per_s'] / base['train_images_per_s']:.3f}x | "
            f"{r['sample_images_per_s']:.2f} | {r['sample_images_per_s'] / base['sample_images_per_s']:.3f}x"
            f" | {each} |"
        )
    stem = Path(args.results_dir) / f"revisions-{date}"
    _measure.write_report(
        stem, {"date": date, "command": command.strip(), "machine": machine, "rows": rows}, "\n".join(lines) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(_measure.run_main(main))
