"""Where a training step's and a sampling step's time goes, by kind of operator (torch.profiler).

    python bench/breakdown.py                          # default model, precision auto, this CPU
    python bench/breakdown.py --isa avx2 --precision fp32 --model lucidrains
                                                     # as on an AVX2-only CPU (see below)
    python bench/breakdown.py --model diffusers --channels 3 --size 32   # colour, ~ diffusers

`--isa avx2` runs the measurement in a process with ATEN_CPU_CAPABILITY=avx2 and
ONEDNN_MAX_CPU_ISA=AVX2: PyTorch's kernels and oneDNN's convolutions then use AVX2 code only, and
oneDNN reports no native bf16 (so precision "auto" resolves to fp32), as on an AVX2-only machine.
`--model lucidrains` / `diffusers` is the ddpmkit U-Net matched in parameters to that reference at
the input's shape (bench/speed.py's matched rows; the reference must be importable to count its
parameters), `default` the model `ddpmkit train` builds for that shape. `--channels`/`--size` set
the input (1x28x28, Fashion-MNIST's, by default). Writes
bench/results/breakdown-<date>-<isa>-<model>-<precision>[-CxSxS].{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import _measure
import torch
from _measure import FULL

HERE = Path(__file__).resolve().parent
ISA_ENV = _measure.ISA_ENV
# operator name fragments -> the kind reported (first match wins)
KINDS = [
    ("convolution", ("conv", "mkldnn_convolution")),
    ("group norm", ("group_norm",)),
    ("attention", ("scaled_dot_product", "attention", "softmax", "bmm", "baddbmm")),
    ("linear / matmul", ("addmm", "mm", "linear", "matmul")),
    ("activation (SiLU, GELU)", ("silu", "gelu", "sigmoid")),
    ("optimizer (AdamW, EMA, clipping)", ("adam", "_foreach", "lerp", "norm", "clip")),
    (
        "copies, casts, concatenation",
        ("copy", "to", "cat", "contiguous", "clone", "_to_copy", "empty", "fill", "zero", "pad", "upsample", "pixel"),
    ),
    ("elementwise (add, mul, ...)", ("add", "mul", "sub", "div", "where", "exp", "sqrt", "pow", "mean", "sum")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def worker(spec: dict) -> dict:
    """Profile `steps` training steps and `steps` sampling network evaluations of the model."""
    import speed
    from torch.profiler import ProfilerActivity, profile

    from ddpmkit.core.precision import resolve_precision

    _measure.set_threads(spec["threads"])
    shape = tuple(spec.get("shape", speed.FASHION))
    if spec["model"] == "default":
        model, conditional = speed.default_model(shape[1]), True
    else:
        import _refs

        target = {"lucidrains": _refs.lucidrains_params, "diffusers": _refs.diffusers_params}[spec["model"]]
        model, _ = speed.reference_matched(spec["model"], target(*shape), shape)
        conditional = False
    work = speed.ddpmkit_workload(model, conditional, spec["precision"], FULL, shape=shape)
    for _ in range(3):  # warm-up: allocator, oneDNN primitive caches
        work.train_step()
        work.forward()
    out = {
        "precision": resolve_precision(spec["precision"], "cpu"),
        "model": model,
        "params": work.params,
        "capability": torch.backends.cpu.get_cpu_capability(),
    }
    for name, fn in (("train step", work.train_step), ("sampling forward", work.forward)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(spec["steps"]):
                fn()
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        by_kind, top = defaultdict(float), []
        for e in events:
            by_kind[kind_of(e.key)] += e.self_cpu_time_total
            top.append((e.key, e.self_cpu_time_total, e.count))
        top.sort(key=lambda x: -x[1])
        out[name] = {
            "total_ms": total / 1e3 / spec["steps"],
            "kinds": {k: v / total for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [{"op": k, "share": v / total, "calls": c // spec["steps"]} for k, v, c in top[:12]],
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Where the time of a training and a sampling step goes.")
    p.add_argument("--isa", choices=sorted(ISA_ENV), default="native", help="native, or avx2 (emulated)")
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16 (auto)")
    p.add_argument("--model", choices=("default", "lucidrains", "diffusers"), default="default")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="image channels (1)")
    p.add_argument("--size", type=int, default=28, help="image size (28)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps of each kind (5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results-dir", default=str(HERE / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _measure.emit(worker(json.loads(args.worker)))
        return 0
    machine = _measure.machine(args.threads)
    if args.model != "default":
        import _refs

        ok, why = _refs.available(args.model)
        if not ok:
            p.error(why)
    shape = (args.channels, args.size)
    spec = {
        "model": args.model,
        "precision": args.precision,
        "steps": args.steps,
        "threads": args.threads,
        "shape": list(shape),
    }
    env = {**os.environ, **ISA_ENV[args.isa], "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE,
    )
    result = _measure.parse_result(proc.stdout)
    date = datetime.date.today().isoformat()
    command = "python bench/breakdown.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# Profile, {date}",
        "",
        f"Command: `{command.strip()}`",
        "",
        *([_measure.busy_warning(machine), ""] if _measure.busy_warning(machine) else []),
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {args.threads} threads; "
        f"kernels: {result['capability']} (--isa {args.isa}); precision {args.precision} -> "
        f"{result['precision']}. Model: {args.model} ({result['params'] / 1e6:.2f}M parameters: "
        f"{json.dumps(result['model'])}), batch 64 of {shape[0]}x{shape[1]}x{shape[1]}.",
        "",
    ]
    for name in ("train step", "sampling forward"):
        r = result[name]
        lines += [f"## {name}: {r['total_ms']:.1f} ms of operator time per call", "", "| kind | share |", "|---|---|"]
        lines += [f"| {k} | {100 * v:.1f}% |" for k, v in r["kinds"].items()]
        lines += ["", "| top operators | share | calls per step |", "|---|---|---|"]
        lines += [f"| `{t['op']}` | {100 * t['share']:.1f}% | {t['calls']} |" for t in r["top"]]
        lines.append("")
    suffix = "" if shape == (1, 28) else f"-{shape[0]}x{shape[1]}x{shape[1]}"
    stem = Path(args.results_dir) / f"breakdown-{date}-{args.isa}-{args.model}-{args.precision}{suffix}"
    _measure.write_report(
        stem, {"date": date, "command": command.strip(), "machine": machine, **result}, "\n".join(lines)
    )
    return 0


if __name__ == "__main__":
    sys.exit(_measure.run_main(main))
