"""Where a training step's and a sampling step's time goes, by kind of operator (torch.profiler).

    python bench/breakdown.py                          # default model, precision auto, this CPU
    python bench/breakdown.py --isa avx2 --precision fp32 --model lucidrains
                                                     # as on an AVX2-only CPU (see below)

`--isa avx2` runs the measurement in a process with ATEN_CPU_CAPABILITY=avx2 and
ONEDNN_MAX_CPU_ISA=AVX2: PyTorch's kernels and oneDNN's convolutions then use AVX2 code only, and
oneDNN reports no native bf16 (so precision "auto" resolves to fp32), as on an AVX2-only machine.
`--model lucidrains` is the ddpmkit U-Net matched in parameters to lucidrains' Unet(32, (1, 2, 4))
(bench/speed.py's matched row), `default` the model `ddpmkit train` builds. Writes
bench/results/breakdown-<date>-<isa>-<model>-<precision>.{md,json}.
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
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, "native": {}}
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
    from ddpmkit.run.build import ARCH_KEYS
    from ddpmkit.run.config import ModelConfig

    _measure.set_threads(spec["threads"])
    if spec["model"] == "default":
        model, conditional = {k: getattr(ModelConfig(), k) for k in ARCH_KEYS["unet"]}, True
    else:
        target = {"lucidrains": 2_607_681}[spec["model"]]
        model, _ = speed.reference_matched(spec["model"], target)
        conditional = False
    work = speed.ddpmkit_workload(model, conditional, spec["precision"], FULL)
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
    p.add_argument("--model", choices=("default", "lucidrains"), default="default")
    p.add_argument("--steps", type=int, default=5, help="profiled steps of each kind (5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results-dir", default=str(HERE / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _measure.emit(worker(json.loads(args.worker)))
        return 0
    machine = _measure.machine(args.threads)
    spec = {"model": args.model, "precision": args.precision, "steps": args.steps, "threads": args.threads}
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
        f"{result['precision']}. Model: {args.model} ({result['params'] / 1e6:.2f}M parameters), batch 64.",
        "",
    ]
    for name in ("train step", "sampling forward"):
        r = result[name]
        lines += [f"## {name}: {r['total_ms']:.1f} ms of operator time per call", "", "| kind | share |", "|---|---|"]
        lines += [f"| {k} | {100 * v:.1f}% |" for k, v in r["kinds"].items()]
        lines += ["", "| top operators | share | calls per step |", "|---|---|---|"]
        lines += [f"| `{t['op']}` | {100 * t['share']:.1f}% | {t['calls']} |" for t in r["top"]]
        lines.append("")
    stem = Path(args.results_dir) / f"breakdown-{date}-{args.isa}-{args.model}-{args.precision}"
    _measure.write_report(
        stem, {"date": date, "command": command.strip(), "machine": machine, **result}, "\n".join(lines)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
