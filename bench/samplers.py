"""Which sampler at which budget (issue 14, part 3): FD_dom, precision and recall of every sampler at
the same numbers of network evaluations (NFE), on one trained run.

    python bench/samplers.py RUN_DIR        # -> bench/results/samplers-<date>.{md,json,png}
    python bench/samplers.py RUN_DIR --rows dpm++,heun-karras --nfe 10,15 --n 1000
    python bench/samplers.py RUN_DIR --tag emoji   # -> samplers-<date>-emoji.*: a second run the same day
    python bench/samplers.py --render bench/results/samplers-<date>.json   # remake its .md and .png

Each row draws n samples (classes as `ddpmkit eval` draws them, seed 0) with one sampler and spacing at
the step count whose NFE is the column's (NFE = steps, except heun: 2 steps - 1, or 2 steps - 2 where
it enters Karras' grid from above sigma_max with one Euler step, as on the cosine schedule; an NFE a
sampler cannot reach, or that needs more steps than the model's T, is skipped and listed), and scores
them with the domain metrics: the same functions, labels and seed as `ddpmkit eval RUN --sampler X
--steps N --spacing S --n 1000 --nll-n 0 --inception off`, which each row records so that it can be
rerun alone. Sampling is timed apart from scoring, after one untimed warm-up batch, on --threads
threads in the run's sampling precision. DDIM with min(100, T) steps is the reference: the report
names the best row for "1,000 samples in <= 90 s at < 10% above DDIM-100's FD_dom" (the lowest FD_dom
among the rows that meet both; the fastest of them too), the choice for `DEFAULT_SAMPLING` in
src/ddpmkit/run/config.py. The full grid (10 rows x 9 NFEs x 1,000 samples) samples about 2,300
network evaluations of 1,000 images: about 3 hours on the 2-core AVX2 CPU where DDIM-50 takes 206 s,
52 minutes on the 2-core AVX-512 BF16 one (bench/results/samplers-2026-12-02.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import sys
import time
from pathlib import Path

import _measure
import torch

from ddpmkit.core.samplers import SAMPLERS, nfe
from ddpmkit.errors import DdpmkitError

HERE = Path(__file__).resolve().parent
NFES = (4, 6, 8, 10, 15, 20, 35, 50, 100)
ROWS = {  # name -> (sampler, spacing, its options): each sampler on the spacing it was designed with
    "ddim": ("ddim", "uniform", {}),
    "ddpm": ("ddpm", "uniform", {}),
    "dpm++": ("dpm++", "uniform", {}),
    "dpm++-karras": ("dpm++", "karras", {}),
    "dpm++sde-karras": ("dpm++sde", "karras", {}),
    "euler-karras": ("euler", "karras", {}),
    "euler-a-karras": ("euler-a", "karras", {}),
    "heun-karras": ("heun", "karras", {}),
    "unipc": ("unipc", "uniform", {"order": 2}),
    "unipc-3": ("unipc", "uniform", {"order": 3}),
}
REFERENCE = ("ddim", "uniform", {}, 100)  # DDIM-100 (or DDIM-T on a model with fewer steps)
BUDGET_S, TOLERANCE = 90.0, 0.10  # 1,000 samples in <= 90 s, FD_dom < 1.10 x DDIM-100's


def steps_for(sampler: str, target: int, schedule=None, spacing: str = "uniform") -> int | None:
    """The step count whose network evaluations are `target` (at least one per step), or None;
    with the run's schedule, Heun's evaluations are counted on the steps it visits."""
    T = schedule.T if schedule is not None else target
    return next((n for n in range(1, min(target, T) + 1) if nfe(sampler, n, schedule, spacing) == target), None)


def plan(rows: list[str], nfes: list[int], T: int, schedule=None) -> tuple[list[dict], list[dict]]:
    """The (row, NFE, steps) to measure, and those skipped with the reason."""
    todo, skipped = [], []
    for name in rows:
        sampler, spacing, options = ROWS[name]
        for target in nfes:
            steps = steps_for(sampler, target, schedule, spacing)
            if steps is None or steps > T:
                why = f"no step count makes {target} NFE" if steps is None else f"{steps} steps > T = {T}"
                skipped.append({"row": name, "nfe": target, "why": why})
                continue
            todo.append(
                {"row": name, "sampler": sampler, "spacing": spacing, "options": options, "nfe": target, "steps": steps}
            )
    return todo, skipped


def eval_command(run_dir, row: dict, guidance: float, args) -> str:
    """The `ddpmkit eval` command that scores the same row (the same images; the timing is this script's)."""
    options = "".join(f" --{k.replace('_', '-')} {v}" for k, v in row["options"].items())
    if "guidance_interval" in row:  # a row's own interval, None = every step (whatever the run's default)
        interval = row["guidance_interval"]
        options += " --guidance-interval " + ("all" if interval is None else "{:g},{:g}".format(*interval))
    return (
        f"ddpmkit eval {run_dir} --sampler {row['sampler']} --steps {row['steps']} --spacing {row['spacing']}"
        f"{options} --guidance {guidance:g} --n {args.n} --seed {args.seed} --batch-size {args.batch_size}"
        f" --device {args.device} --nll-n 0 --inception off"
    )


def measure(run_dir: Path, todo: list[dict], args) -> list[dict]:
    """Sample and score each planned row in this process, one after the other."""
    from ddpmkit.core.precision import resolve_precision
    from ddpmkit.eval.report import dataset_of, eval_labels, score_images
    from ddpmkit.run.load import load_denoiser
    from ddpmkit.run.sampling import check_guidance, generate

    config, denoiser = load_denoiser(run_dir, args.device, "ema")
    default = config.sample.guidance if args.guidance is None else args.guidance
    for guidance in {row.get("guidance", default) for row in todo}:  # a row may carry its own (bench/guidance.py)
        check_guidance(config, guidance)
    labels = eval_labels(config, args.n)  # as `ddpmkit eval` draws them: in the training split's proportions
    shape = (config.in_channels, config.image_size, config.image_size)
    data = dataset_of(config)
    base = config.sample

    def sample(settings, n: int) -> torch.Tensor:
        y = None if labels is None else labels[:n]
        batch, device = args.batch_size, args.device
        return generate(
            denoiser, n, shape, labels=y, settings=settings, seed=args.seed, batch_size=batch, device=device
        )

    warm_up = sample(dataclasses.replace(base, steps=1), min(args.n, args.batch_size))  # threads, allocator
    y = labels[: len(warm_up)] if labels is not None else None
    if "skipped" in (domain := score_images(warm_up, y, data, "off", None, args.device, False)["domain"]):
        raise DdpmkitError(f"this run has no domain metrics: {domain['skipped']}")
    rows = []
    for row in todo:
        guidance = row.get("guidance", default)
        grid = {"sampler": row["sampler"], "steps": row["steps"], "spacing": row["spacing"]}
        interval = row.get("guidance_interval", base.guidance_interval)
        settings = dataclasses.replace(base, **grid, guidance=guidance, guidance_interval=interval, **row["options"])
        print(f"{row['row']}: NFE {row['nfe']} ({row['steps']} steps)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        images = sample(settings, args.n)
        sampling_s = time.perf_counter() - start
        start = time.perf_counter()
        domain = score_images(images, labels, data, "off", None, args.device, False)["domain"]
        scoring_s = time.perf_counter() - start
        rows.append(
            {
                **row,
                "guidance": guidance,
                "guidance_interval": interval,
                "precision": resolve_precision(settings.precision, args.device),
                "fd_dom": domain.get("fd_dom"),
                "precision_knn": domain.get("precision"),
                "recall": domain.get("recall"),
                "conditional_accuracy": domain.get("conditional_accuracy"),
                "conditional_balanced_accuracy": domain.get("conditional_balanced_accuracy"),
                "conditional_accuracy_per_class": domain.get("conditional_accuracy_per_class"),
                "sampling_s": sampling_s,
                "s_per_1000": sampling_s * 1000 / args.n,
                "scoring_s": scoring_s,
                "command": eval_command(run_dir, row, guidance, args),
            }
        )
    return rows


def best_choice(rows: list[dict], reference_fd: float, budget_s: float = BUDGET_S, tolerance: float = TOLERANCE):
    """(the lowest-FD_dom row, the fastest row) among those within budget and tolerance; (None, None) if none."""
    ok = [r for r in rows if r["s_per_1000"] <= budget_s and r["fd_dom"] < (1 + tolerance) * reference_fd]
    if not ok:
        return None, None
    return min(ok, key=lambda r: r["fd_dom"]), min(ok, key=lambda r: r["s_per_1000"])


def _setting(r: dict) -> str:
    options = "".join(f", {k} {v}" for k, v in r["options"].items())
    return f"{r['sampler']}, {r['steps']} steps, {r['spacing']} spacing{options} (NFE {r['nfe']})"


def best_line(result: dict) -> str:
    ref = result["reference"]
    best, fastest = best_choice(result["rows"], ref["fd_dom"])
    goal = (
        f"\"1,000 samples in <= {BUDGET_S:g} s on this CPU at < {TOLERANCE:.0%} above DDIM-{ref['steps']}'s FD_dom "
        f'({ref["fd_dom"]:.2f})"'
    )
    if best is None:
        closest = min(result["rows"], key=lambda r: r["fd_dom"] / ref["fd_dom"] + (r["s_per_1000"] > BUDGET_S))
        return f"No row meets {goal}; the closest: {_setting(closest)}, FD_dom {closest['fd_dom']:.2f}."
    line = (
        f"Best choice for {goal}: **{_setting(best)}**, FD_dom {best['fd_dom']:.2f} "
        f"({best['fd_dom'] / ref['fd_dom']:.2f}x), {best['s_per_1000']:.0f} s per 1,000 samples"
    )
    if fastest is not best:
        line += f"; the fastest that qualifies: {_setting(fastest)}, {fastest['s_per_1000']:.0f} s"
    return line + "."


def fd_table(result: dict) -> list[str]:
    """FD_dom of each row at each NFE, one line per row (the lowest in each column in bold): the table docs show."""
    nfes = sorted({r["nfe"] for r in result["rows"]})
    fd = {(r["row"], r["nfe"]): r["fd_dom"] for r in result["rows"]}
    lowest = {n: min(v for (_, m), v in fd.items() if m == n) for n in nfes}
    lines = ["| row | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|" + "---|" * (len(nfes) + 1)]
    for name in dict.fromkeys(r["row"] for r in result["rows"]):
        cells = ["" if (name, n) not in fd else f"{fd[name, n]:.1f}" for n in nfes]
        cells = [f"**{c}**" if c and fd[name, n] == lowest[n] else c for c, n in zip(cells, nfes)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def at_nfe_line(result: dict, target: int = 10) -> str:
    """The issue's other target: the best row at `target` NFE within TOLERANCE of the reference's FD_dom."""
    ref, rows = result["reference"], [r for r in result["rows"] if r["nfe"] == target]
    if not rows:
        return f"No row at {target} NFE."
    best = min(rows, key=lambda r: r["fd_dom"])
    ratio = best["fd_dom"] / ref["fd_dom"]
    verdict = "within" if ratio < 1 + TOLERANCE else "not within"
    return (
        f"Best at {target} NFE: {best['row']}, FD_dom {best['fd_dom']:.2f}, {ratio:.2f}x DDIM-{ref['steps']}'s "
        f"{ref['fd_dom']:.2f} ({verdict} {TOLERANCE:.0%})."
    )


def report(result: dict) -> str:
    m, ref = result["machine"], result["reference"]
    warning = _measure.busy_warning(m)
    lines = [
        f"# Samplers at equal network evaluations, {result['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        *([warning, ""] if warning else []),
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {result['threads']} threads, sampling "
        f"precision {ref['precision']}. Run {result['run']['dir']} ({result['run']['checkpoint']}, "
        f"{result['run']['schedule']} schedule, T = {result['run']['T']}); {result['n']} samples per row, "
        f"classes as `ddpmkit eval` draws them, seed {result['seed']}, guidance {ref['guidance']:g}; domain metrics.",
        "",
        best_line(result),
        "",
        at_nfe_line(result),
        "",
        f"FD_dom (lower is better; DDIM-{ref['steps']}: {ref['fd_dom']:.2f}):",
        "",
        *fd_table(result),
        "",
        "Every row:",
        "",
        "| row | sampler | spacing | NFE | steps | FD_dom | vs DDIM-"
        f"{ref['steps']} | precision | recall | cond. accuracy | sampling s | s / 1,000 | scoring s |",
        "|" + "---|" * 13,
    ]
    for r in [*result["rows"], {**ref, "row": f"reference DDIM-{ref['steps']}"}]:
        accuracy = r["conditional_accuracy"]
        lines.append(
            f"| {r['row']} | {r['sampler']}{''.join(f' {k}={v}' for k, v in r['options'].items())} | {r['spacing']} "
            f"| {r['nfe']} | {r['steps']} | {r['fd_dom']:.2f} | {r['fd_dom'] / ref['fd_dom']:.2f}x "
            f"| {r['precision_knn']:.3f} | {r['recall']:.3f} | {'-' if accuracy is None else f'{accuracy:.3f}'} "
            f"| {r['sampling_s']:.1f} | {r['s_per_1000']:.0f} | {r['scoring_s']:.1f} |"
        )
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{s['row']} at NFE {s['nfe']} ({s['why']})" for s in result["skipped"])]
    missing = sorted(set(SAMPLERS) - {r["sampler"] for r in [*result["rows"], ref]})
    if missing:
        lines += ["", f"Samplers in no row: {', '.join(missing)}."]
    lines += [
        "",
        f"FD_dom against NFE: [{result['plot']}]({result['plot']}). Each row alone: its `command` in the JSON.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """FD_dom against NFE (log x), one line per row, DDIM-100's FD_dom and the 10% band dashed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    from ddpmkit.fileio import atomic_write

    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.subplots()
    for name in dict.fromkeys(r["row"] for r in result["rows"]):
        points = sorted((r["nfe"], r["fd_dom"]) for r in result["rows"] if r["row"] == name)
        ax.plot(*zip(*points), marker="o", label=name)
    ref = result["reference"]["fd_dom"]
    ax.axhline(ref, color="black", linestyle="--", linewidth=1, label=f"DDIM-{result['reference']['steps']}")
    ax.axhline((1 + TOLERANCE) * ref, color="gray", linestyle=":", linewidth=1, label=f"+{TOLERANCE:.0%}")
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(
        sorted({r["nfe"] for r in result["rows"]}), labels=[str(v) for v in sorted({r["nfe"] for r in result["rows"]})]
    )
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("FD_dom (lower is better)")
    ax.set_title(f"{result['n']} samples per point, {Path(result['run']['dir']).name}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False, fontsize=8, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="FD_dom, precision and recall of every sampler at equal NFE.")
    p.add_argument("run_dir", nargs="?", help="a trained run directory (the default 15-minute Fashion-MNIST model)")
    p.add_argument("--rows", help=f"comma-separated rows to run (all): {', '.join(ROWS)}")
    p.add_argument("--nfe", default=",".join(map(str, NFES)), help=f"the NFEs ({','.join(map(str, NFES))})")
    p.add_argument("--n", type=int, default=1000, help="samples per row (1000)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance (the run's default)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (256, as ddpmkit eval)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default=str(HERE / "results"), help="where samplers-<date>.{md,json,png} go")
    p.add_argument("--tag", help="added to the report's name: samplers-<date>-<tag> (one per run measured that day)")
    p.add_argument("--render", metavar="JSON", help="only rewrite the .md and .png of an earlier report's JSON")
    args = p.parse_args(argv)
    if args.render:
        stem = Path(args.render).with_suffix("")
        result = json.loads(Path(args.render).read_text())
        plot(result, stem.with_suffix(".png"))
        _measure.write_report(stem, result, report(result))
        return 0
    if args.run_dir is None:
        p.error("give a run directory (or --render JSON)")
    rows = args.rows.split(",") if args.rows else list(ROWS)
    try:
        nfes = [int(v) for v in args.nfe.split(",")]
    except ValueError:
        p.error("--nfe takes comma-separated integers")
    if unknown := [r for r in rows if r not in ROWS]:
        p.error(f"unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if args.n < 4 or min(nfes) < 1:
        p.error("--n must be >= 4 (precision/recall use 3 neighbours) and every NFE >= 1")

    from ddpmkit.run import checkpoint

    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    try:
        config = checkpoint.load_config(run_dir)
        T = config.diffusion.timesteps
        from ddpmkit.run.build import schedule as schedule_of

        todo, skipped = plan(rows, nfes, T, schedule_of(config))
        sampler, spacing, options, ref_steps = REFERENCE
        reference = {"row": "reference", "sampler": sampler, "spacing": spacing, "options": options}
        reference.update(nfe=min(ref_steps, T), steps=min(ref_steps, T))
        machine = _measure.machine(args.threads)
        if _measure.busy_warning(machine):
            print(_measure.busy_warning(machine), file=sys.stderr)
        measured = measure(run_dir, [*todo, reference], args)
    except DdpmkitError as e:
        print(f"bench/samplers.py: error: {e}", file=sys.stderr)
        return 2
    date = datetime.date.today().isoformat()
    stem = Path(args.results_dir) / f"samplers-{date}{'-' + args.tag if args.tag else ''}"
    result = {
        "date": date,
        "command": "python bench/samplers.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "threads": args.threads,
        "run": {
            "dir": str(run_dir),
            "checkpoint": checkpoint.latest_checkpoint(run_dir).name,
            "schedule": config.diffusion.schedule,
            "T": T,
        },
        "n": args.n,
        "seed": args.seed,
        "rows": measured[:-1],
        "reference": measured[-1],
        "skipped": skipped,
        "plot": stem.with_suffix(".png").name,
    }
    best, fastest = best_choice(result["rows"], result["reference"]["fd_dom"])
    result["best"], result["fastest"] = best, fastest
    plot(result, stem.with_suffix(".png"))
    _measure.write_report(stem, result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(_measure.run_main(main))
