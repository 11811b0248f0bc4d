"""Distillation: a trained run distilled to 8, 4, 2 and 1 steps, each student against its teacher.

    python bench/distill.py RUN                  # -> bench/results/distill-<date>.{md,json} and distill-<date>-grid.png
    python bench/distill.py RUN --quick          # smoke run: 2 steps a round, 40 samples, bench/_work/

1. One distillation, `ddpmkit distill RUN --out WORK/student --to 1` (--from 64, 500 steps a round:
   the command's defaults; other flags such as --lr or --guidance are passed on), timed: wall clock,
   the process's CPU time (all threads) and the wall clock at which each round's student was written.
   Each round's student stays in WORK/student/rounds/.
2. n samples each, classes balanced, the same x_T (seed), scored with the domain metrics of
   `ddpmkit eval` (FD_dom, conditional accuracy, precision, recall): the teacher with each baseline
   sampler (--baselines, default DDIM 50 steps on uniform spacing and DPM-Solver++(2M) 10 steps on Karras
   sigmas, the best 10-NFE sampler of bench/samplers.py, at the guidance that
   was distilled) and the students of --report (8, 4, 2, 1) steps with DDIM on their own grids.
3. A picture: one row per class, the teacher's first baseline beside the 4-step student, same x_T.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _measure
import torch

HERE = Path(__file__).resolve().parent
SAMPLE_BATCH = 250


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}


def parse_baselines(text: str) -> list[tuple[str, int, str | None]]:
    """ "ddim:50,dpm++:10:uniform" -> [("ddim", 50, None), ("dpm++", 10, "uniform")]: sampler, steps, spacing."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, steps, *spacing = item.split(":")
        out.append((name, int(steps), spacing[0] if spacing else None))
    return out


def distill(run: Path, student: Path, args, extra: list[str]) -> dict:
    """`ddpmkit distill` in its own process: wall and CPU seconds, and when each round's student appeared."""
    cmd = [sys.executable, "-m", "ddpmkit", "distill", str(run), "--out", str(student), "--to", str(args.to)]
    quick = ["--steps-per-round", "2", "--batch-size", "8", "--log-every", "1"] if args.quick else []
    cmd += [*quick, *extra, "--no-progress"]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    before, start, wall_start = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic(), time.time()
    subprocess.run(cmd, env=_env(args.threads), check=True)
    wall, after = time.monotonic() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    files = (student / "rounds").glob("steps-*.safetensors")
    rounds = {int(path.stem.split("-")[1]): path.stat().st_mtime - wall_start for path in files}
    return {"command": cmd[2:], "wall_s": wall, "cpu_s": cpu, "round_written_s": dict(sorted(rounds.items()))}


def draw(denoiser, config, settings, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """n images (classes in turn) with `settings`; their labels and the seconds it took."""
    from ddpmkit.eval.report import eval_labels
    from ddpmkit.run.sampling import generate

    labels = eval_labels(config, n)  # as `ddpmkit eval` draws them: in the training split's proportions
    shape = (config.in_channels, config.image_size, config.image_size)
    start = time.monotonic()
    images = generate(denoiser, n, shape, labels=labels, settings=settings, seed=seed, batch_size=SAMPLE_BATCH)
    return images, labels, time.monotonic() - start


def score_rows(run: Path, student: Path, args) -> tuple[list[dict], dict]:
    """One row per baseline and per student; the images of the picture (by row name)."""
    import dataclasses

    from ddpmkit.eval.domain import DomainMetrics
    from ddpmkit.run import checkpoint
    from ddpmkit.run.load import load_denoiser
    from ddpmkit.train.distill import load_round, round_file

    config, teacher = load_denoiser(run)
    distilled = checkpoint.load_config(student)
    guidance = distilled.distill.guidance
    d = config.data
    metrics = DomainMetrics.for_dataset(d.dataset, d.data_dir, d.image_size, progress=not args.quick)
    rows, pictures = [], {}
    contestants = [
        (
            f"teacher, {name} {steps}",
            teacher,
            config,
            dataclasses.replace(
                config.sample, sampler=name, steps=steps, spacing=spacing or config.sample.spacing, guidance=guidance
            ),
        )
        for name, steps, spacing in parse_baselines(args.baselines)
    ]
    for n in args.report:
        if round_file(student, n).is_file():
            s_config, s_net = load_round(student, n)
            contestants.append(
                (
                    f"student, {n} step{'s' if n > 1 else ''}",
                    s_net,
                    s_config,
                    dataclasses.replace(s_config.sample, steps=n),
                )
            )
    for name, denoiser, cfg, settings in contestants:
        images, labels, seconds = draw(denoiser, cfg, settings, args.n, args.seed)
        score = metrics.score(images, labels)
        rows.append({"name": name, "settings": dict(settings.__dict__), "sample_s": seconds, **score})
        first = 10 * max(cfg.num_classes, 1)  # the classes in turn: ten of each
        pictures[name] = (images[:first], None if labels is None else labels[:first])
    return rows, pictures


def picture(pictures: dict, stem: Path, class_names) -> Path | None:
    """The first baseline's grid beside the 4-step student's (one row per class, same x_T)."""
    from ddpmkit import viz

    teacher = next(iter(pictures))
    student = next((name for name in pictures if name == "student, 4 steps"), None)
    if student is None:
        return None
    paths = []
    for k, name in enumerate((teacher, student)):
        images, labels = pictures[name]
        if labels is not None:  # sort by class: one row each
            order = torch.argsort(labels, stable=True)
            images, labels = images[order], labels[order]
        paths.append(stem.parent / f".{stem.name}-{k}.png")
        viz.save_grid(images, paths[-1], labels=labels, class_names=class_names)
    out = stem.parent / f"{stem.name}-grid.png"
    viz.montage(paths, out, titles=[teacher, student])
    for path in paths:
        path.unlink()
    return out


def report(result: dict) -> str:
    rows, timing = result["rows"], result["distillation"]
    ref = rows[0]["fd_dom"]
    lines = [
        f"# Distillation, {result['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        *([_measure.busy_warning(result["machine"]), ""] if _measure.busy_warning(result["machine"]) else []),
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
        f"{result['machine']['torch']}, {result['threads']} threads. Teacher: `{result['teacher']}`. "
        f"{result['n']} samples each (seed {result['seed']}, classes balanced), scored with "
        "ddpmkit.eval.domain.DomainMetrics against the test set's features.",
        "",
        f"Distillation: {timing['wall_s'] / 60:.1f} wall minutes, {timing['cpu_s'] / 60:.1f} CPU minutes "
        f"(user + system, all threads), `{' '.join(timing['command'])}`.",
        "",
        f"| model | sampler | NFE | FD_dom | vs {rows[0]['name']} | cond. accuracy | precision | recall "
        "| sampling s | distilled after (wall min) |",
        "|" + "---|" * 10,
    ]
    for row in rows:
        s = row["settings"]
        steps = s["steps"]
        written = timing["round_written_s"].get(steps) if row["name"].startswith("student") else None
        acc = "" if row["conditional_accuracy"] is None else f"{row['conditional_accuracy']:.3f}"
        lines.append(
            f"| {row['name']} | {s['sampler']} {s['spacing']}, guidance {s['guidance']:g} | {steps} "
            f"| {row['fd_dom']:.2f} | {row['fd_dom'] / ref:.2f}x | {acc} | {row['precision']:.3f} "
            f"| {row['recall']:.3f} | {row['sample_s']:.1f} | {'' if written is None else f'{written / 60:.1f}'} |"
        )
    lines += [
        "",
        "NFE: network evaluations per image (a guided step evaluates the conditional and null branches "
        "in one batched call, counted once). A student's 'distilled after' is the wall clock from the "
        "start of `ddpmkit distill` until its round ended.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Distil a run to 8, 4, 2 and 1 steps and score each student against its teacher. "
        "Flags not listed here go to `ddpmkit distill` (e.g. --from, --steps-per-round, --lr, --guidance)."
    )
    p.add_argument("run", help="the teacher: a run directory made by `ddpmkit train`")
    p.add_argument("--to", type=int, default=1, help="distil down to this many steps (1)")
    p.add_argument("--report", default="8,4,2,1", help="the students scored, by their steps (8,4,2,1)")
    p.add_argument(
        "--baselines", default="ddim:50:uniform,dpm++:10:karras", help="teacher samplers as NAME:STEPS[:SPACING],..."
    )
    p.add_argument("--n", type=int, default=1000, help="samples scored for each row (1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    p.add_argument("--out-dir", default=str(HERE / "_work"), help="work directory of the student run (bench/_work)")
    p.add_argument("--results-dir", default=str(HERE / "results"), help="where distill-<date>.{md,json} go")
    p.add_argument("--keep-run", action="store_true", help="keep the student run directory afterwards")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 2 steps of 8 images a round, 40 samples, results in --out-dir"
    )
    args, extra = p.parse_known_args(argv)
    args.report = [int(v) for v in args.report.split(",") if v.strip()]
    if args.quick:
        args.n, args.results_dir = min(args.n, 40), args.out_dir
    torch.set_num_threads(args.threads)
    machine = _measure.machine(args.threads)
    if _measure.busy_warning(machine):
        print(_measure.busy_warning(machine), file=sys.stderr)
    date = datetime.date.today().isoformat()
    work = Path(args.out_dir) / f"distill-{date}-{os.getpid()}"
    work.mkdir(parents=True)
    run, student = Path(args.run), work / "student"
    try:
        timing = distill(run, student, args, extra)
        rows, pictures = score_rows(run, student, args)
        from ddpmkit.run import checkpoint

        stem = Path(args.results_dir) / f"distill-{date}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        grid = picture(pictures, stem, checkpoint.load_config(run).class_names)
        command = "python bench/distill.py " + " ".join(sys.argv[1:] if argv is None else argv)
        result = {
            "date": date,
            "command": command.strip(),
            "machine": machine,
            "threads": args.threads,
            "teacher": str(run),
            "n": args.n,
            "seed": args.seed,
            "distillation": timing,
            "rows": rows,
            "grid": None if grid is None else str(grid),
        }
    finally:
        if not args.keep_run:
            shutil.rmtree(work, ignore_errors=True)
    _measure.write_report(stem, result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(_measure.run_main(main))
