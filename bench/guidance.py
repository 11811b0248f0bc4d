"""Classifier-free guidance against quality: FD_dom, conditional accuracy, precision and recall of one
sampler at several guidance weights W on one trained run, with the real-image floor beside them.

    python bench/guidance.py RUN_DIR                  # the run's own sampler, W = 1, 1.25, 1.5, 2, 3
    python bench/guidance.py RUN_DIR --weights 1,1.5 --row ddim --nfe 50 --n 1000
    python bench/guidance.py RUN_DIR --weights 1.25,2 --intervals all,0.28:5.42   # guidance intervals too

W = 1 is the plain conditional model; W > 1 moves each step along eps(x_t, y) - eps(x_t, null), which
trades diversity (recall) for class fidelity (conditional accuracy). Each row draws the same n samples
(the classes `ddpmkit eval` draws, seed 0) with bench/samplers.py's `measure` and records the `ddpmkit
eval` command that reproduces its scores. The floor is `ddpmkit eval --reference --n N`: n real
training images scored the same way. --intervals adds, for each weight, rows that guide only the steps
whose sigma_t lies in (LO, HI] (`ddpmkit sample --guidance-interval LO,HI`, Kynkaanniemi et al. 2024): a
step outside runs one branch, so such rows sample faster. Writes
bench/results/guidance-<date>[-<run name>].{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import _measure
import torch

from ddpmkit.errors import DdpmkitError

HERE = Path(__file__).resolve().parent
WEIGHTS = (1.0, 1.25, 1.5, 2.0, 3.0)


def own_row(config) -> dict:
    """The run's own sampling settings (what `ddpmkit sample RUN` uses) as a bench/samplers.py row."""
    from ddpmkit.core.samplers import nfe
    from ddpmkit.run.build import schedule as schedule_of

    s = config.sample
    return {
        "row": "the run's default",
        "sampler": s.sampler,
        "spacing": s.spacing,
        "options": {},
        "nfe": nfe(s.sampler, s.steps, schedule_of(config), s.spacing),
        "steps": s.steps,
    }


def floor(config, n: int, seed: int) -> dict:
    """Domain metrics of n real training images against the held-out set (`ddpmkit eval --reference`)."""
    from ddpmkit.eval.report import evaluate_reference, reference_data

    ref = evaluate_reference(**reference_data(config), n=n, seed=seed, inception="off", progress=False)
    return ref["results"]["domain"]


def where(row: dict) -> str:
    """The steps a row guides: every step, or those whose sigma_t lies in its interval."""
    interval = row.get("guidance_interval")
    return "every step" if interval is None else "({:g}, {:g}]".format(*interval)


def parse_intervals(text: str) -> list:
    """all,LO:HI,... -> [None, (LO, HI), ...] (None: every step)."""
    intervals = []
    for item in filter(None, (v.strip() for v in text.split(","))):
        if item == "all":
            intervals.append(None)
            continue
        lo, hi = (float(v) for v in item.split(":"))
        if not 0 <= lo < hi < float("inf"):
            raise ValueError(item)
        intervals.append((lo, hi))
    return intervals


def report(result: dict) -> str:
    m, row, ref = result["machine"], result["sampling"], result["floor"]
    warning = _measure.busy_warning(m)
    lines = [
        f"# Classifier-free guidance against quality, {result['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        *([warning, ""] if warning else []),
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {result['threads']} threads. Run "
        f"{result['run']}; {row['sampler']}, {row['steps']} steps, {row['spacing']} spacing (NFE {row['nfe']}); "
        f"{result['n']} samples per row, seed {result['seed']}, classes as `ddpmkit eval` draws them; domain metrics.",
        "",
        "| guidance W | guided where sigma_t in | FD_dom | vs floor | cond. accuracy | cond. balanced accuracy "
        "| worst class (accuracy) | precision | recall | s / 1,000 samples |",
        "|" + "---|" * 10,
    ]

    def cells(r: dict, precision: str) -> str:  # samplers.measure's rows keep the k-NN precision apart
        balanced = r.get("conditional_balanced_accuracy")
        per_class = r.get("conditional_accuracy_per_class") or {}
        worst = min(per_class.items(), key=lambda kv: kv[1], default=None)
        names = result.get("class_names") or []
        if worst is not None and int(worst[0]) < len(names):
            worst = (names[int(worst[0])], worst[1])
        return (
            f"{r['fd_dom']:.2f} | {r['fd_dom'] / ref['fd_dom']:.2f}x | {r['conditional_accuracy']:.3f} | "
            f"{'-' if balanced is None else f'{balanced:.3f}'} | "
            f"{'-' if worst is None else f'{worst[0]} ({worst[1]:.3f})'} | {r[precision]:.3f} | {r['recall']:.3f}"
        )

    for r in result["rows"]:
        lines.append(f"| {r['guidance']:g} | {where(r)} | {cells(r, 'precision_knn')} | {r['s_per_1000']:.0f} |")
    lines.append(f"| real training images (floor) | | {cells(ref, 'precision')} | - |")
    best = min(result["rows"], key=lambda r: r["fd_dom"])
    lines += [
        "",
        f"Lowest FD_dom at W = {best['guidance']:g}, {where(best)}; the classifier's held-out accuracy is "
        f"{ref['classifier_test_accuracy']:.3f} (balanced {ref['classifier_test_balanced_accuracy']:.3f}), "
        "the ceiling of conditional accuracy. Each row alone: its `command` in the JSON.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE))
    import samplers

    p = argparse.ArgumentParser(description="FD_dom, accuracy, precision and recall against the guidance weight.")
    p.add_argument("run_dir", help="a trained class-conditional run directory")
    p.add_argument("--weights", default=",".join(f"{w:g}" for w in WEIGHTS), help="guidance weights (1,1.25,1.5,2,3)")
    p.add_argument("--row", help=f"a bench/samplers.py row ({', '.join(samplers.ROWS)}); else the run's own sampler")
    p.add_argument("--nfe", type=int, default=10, help="network evaluations per image for --row (10)")
    p.add_argument(
        "--intervals",
        default="all",
        help="guidance intervals in sigma_t, all (every step) or LO:HI, comma-separated; each weight W != 1 is "
        "measured with each (all)",
    )
    p.add_argument("--n", type=int, default=1000, help="samples per row (1000)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (256, as ddpmkit eval)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default=str(HERE / "results"), help="where guidance-<date>.{md,json} go")
    args = p.parse_args(argv)
    try:
        weights = [float(w) for w in args.weights.split(",") if w.strip()]
    except ValueError:
        p.error("--weights takes comma-separated numbers")
    if not weights or min(weights) < 0:
        p.error("--weights must be numbers >= 0")
    try:
        intervals = parse_intervals(args.intervals)
    except ValueError:
        p.error("--intervals takes all or LO:HI (0 <= LO < HI, finite), comma-separated")
    if args.row is not None and args.row not in samplers.ROWS:
        p.error(f"unknown --row {args.row}; choose from {', '.join(samplers.ROWS)}")
    if args.n < 4:
        p.error("--n must be >= 4 (precision/recall use 3 neighbours)")

    from ddpmkit.run import checkpoint
    from ddpmkit.run.build import schedule as schedule_of

    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    machine = _measure.machine(args.threads)
    if _measure.busy_warning(machine):
        print(_measure.busy_warning(machine), file=sys.stderr)
    try:
        config = checkpoint.load_config(run_dir)
        if not config.data.conditional:
            raise DdpmkitError(f"{run_dir} is unconditional: guidance needs a class-conditional run")
        if args.row is None:
            row = own_row(config)
        else:
            todo, skipped = samplers.plan([args.row], [args.nfe], config.diffusion.timesteps, schedule_of(config))
            if not todo:
                raise DdpmkitError(f"--row {args.row} cannot make {args.nfe} NFE: {skipped[0]['why']}")
            row = todo[0]
        args.guidance = None  # each row carries its own: one model, one judge, one warm-up for every weight
        # W = 1 is plain conditional sampling whatever the interval: one row
        todo = [
            {**row, "guidance": w, "guidance_interval": i} for w in weights for i in (intervals if w != 1 else [None])
        ]
        rows = samplers.measure(run_dir, todo, args)
        ref = floor(config, args.n, args.seed)
    except DdpmkitError as e:
        print(f"bench/guidance.py: error: {e}", file=sys.stderr)
        return 2
    date = datetime.date.today().isoformat()
    result = {
        "date": date,
        "command": "python bench/guidance.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "threads": args.threads,
        "run": str(run_dir),
        "n": args.n,
        "seed": args.seed,
        "sampling": {k: row[k] for k in ("sampler", "spacing", "steps", "nfe")},
        "rows": rows,
        "floor": ref,
        "class_names": list(config.class_names),
    }
    _measure.write_report(Path(args.results_dir) / f"guidance-{date}-{run_dir.name}", result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(_measure.run_main(main))
