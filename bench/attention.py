"""Attention's memory layout on the CPU: SDPA on transposed views against contiguous [B, heads, N, d].

    python bench/attention.py                 # this CPU's kernels, fp32 (and bf16 where native)
    python bench/attention.py --isa avx2      # as on an AVX2-only CPU

ddpmkit's Attention2d computes q, k, v with a 1x1 convolution, so they come as [B, heads, d, N].
`F.scaled_dot_product_attention` takes [B, heads, N, d]; given transposed views (d not at stride 1)
it cannot use its fused (flash) CPU kernel and runs the unfused math path (bmm, softmax, and the
masking checks around them). `models.layers.full_attention` makes them contiguous first. This script
times both layouts, forward alone (sampling) and forward + backward (training), at the attention
shapes of the models bench/speed.py measures (batch 64), each the best of several windows.
Writes bench/results/attention-<date>-<kernels>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _measure
import torch
import torch.nn.functional as F

from ddpmkit.models.layers import full_attention

HERE = Path(__file__).resolve().parent
ISA_ENV = _measure.ISA_ENV
# (what has attention there, channels, heads, side): N = side^2 positions, d = channels / heads
SHAPES = [
    ("default model at 28x28 and 32x32: lowest level", 64, 4, 7),
    ("~ lucidrains at 28x28: 7x7", 120, 4, 7),
    ("~ diffusers at 28x28: 14x14", 72, 4, 14),
    ("~ diffusers at 28x28: 7x7", 144, 4, 7),
    ("colour 32x32, attention at 16x16", 64, 4, 16),
    ("colour 64x64, attention at 32x32", 64, 4, 32),
]


def view(q, k, v):
    """SDPA on transposed views of [B, heads, d, N]: the math path (ddpmkit before the change)."""
    q, k, v = (z.transpose(-1, -2) for z in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(-1, -2)


LAYOUTS = {"view": view, "contiguous": full_attention}  # the second: what Attention2d runs now


def time_ms(fn, seconds: float, windows: int) -> float:
    """The best of `windows` windows of about `seconds` each: milliseconds per call."""
    fn()
    best = float("inf")
    for _ in range(windows):
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            fn()
            n += 1
        best = min(best, (time.perf_counter() - start) / n * 1e3)
    return best


def worker(spec: dict) -> dict:
    _measure.set_threads(spec["threads"])
    torch.manual_seed(0)
    rows = []
    for what, channels, heads, side in SHAPES:
        qkv = torch.randn(spec["batch"], 3, heads, channels // heads, side * side)
        for dtype in spec["dtypes"]:
            row = {"what": what, "channels": channels, "heads": heads, "side": side, "dtype": dtype}
            ref = None
            for name, attend in LAYOUTS.items():
                x = qkv.to(getattr(torch, dtype))
                out = attend(*x.unbind(1))
                ref = out if ref is None else ref
                row[f"{name}_max_abs_diff"] = float((out.float() - ref.float()).abs().max())

                def forward(attend=attend, x=x):
                    with torch.no_grad():
                        attend(*x.unbind(1))

                def train(attend=attend, x=x):
                    leaf = x.detach().requires_grad_(True)
                    attend(*leaf.unbind(1)).sum().backward()

                row[f"{name}_forward_ms"] = time_ms(forward, spec["seconds"], spec["windows"])
                row[f"{name}_train_ms"] = time_ms(train, spec["seconds"], spec["windows"])
            rows.append(row)
    return {"rows": rows, "capability": torch.backends.cpu.get_cpu_capability()}


def report(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Attention's layout on the CPU, {result['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        *([_measure.busy_warning(m), ""] if _measure.busy_warning(m) else []),
        f"Machine: {m['cpu']}, {m['cores']} cores, instruction sets {', '.join(m['isa'])}, torch {m['torch']}, "
        f"{result['threads']} threads; kernels: {result['capability']}. Batch {result['batch']}; each time the "
        f"best of {result['windows']} windows of {result['seconds']:g} s. `view`: SDPA on transposed views "
        "(ddpmkit before this change); `contiguous`: q, k, v copied to [B, heads, N, d] first (now).",
        "",
        "| attention at | C, heads, d | N | dtype | forward ms: view / contiguous | speed-up | "
        "forward + backward ms: view / contiguous | speed-up | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        f, t = (r["view_forward_ms"], r["contiguous_forward_ms"]), (r["view_train_ms"], r["contiguous_train_ms"])
        lines.append(
            f"| {r['what']} | {r['channels']}, {r['heads']}, {r['channels'] // r['heads']} | {r['side'] ** 2} "
            f"| {r['dtype']} | {f[0]:.2f} / {f[1]:.2f} | {f[0] / f[1]:.2f}x | {t[0]:.2f} / {t[1]:.2f} "
            f"| {t[0] / t[1]:.2f}x | {r['contiguous_max_abs_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="SDPA on transposed views against contiguous q, k, v (CPU).")
    p.add_argument("--isa", choices=sorted(ISA_ENV), default="native", help="native, or avx2 (emulated)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=1.0, help="length of one timing window (1.0)")
    p.add_argument("--windows", type=int, default=3, help="timing windows; the best is kept (3)")
    p.add_argument("--results-dir", default=str(HERE / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _measure.emit(worker(json.loads(args.worker)))
        return 0
    machine = _measure.machine(args.threads)
    env = {**os.environ, **ISA_ENV[args.isa], "OMP_NUM_THREADS": str(args.threads)}
    probe = subprocess.run(  # bf16 only where the worker's kernels compute it natively
        [sys.executable, "-c", "from ddpmkit.core.precision import native_cpu_bf16; print(native_cpu_bf16())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    dtypes = ["float32"] + (["bfloat16"] if probe.stdout.strip() == "True" else [])
    spec = {
        "threads": args.threads,
        "batch": args.batch,
        "seconds": args.seconds,
        "windows": args.windows,
        "dtypes": dtypes,
    }
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    date = datetime.date.today().isoformat()
    result = {
        "date": date,
        "command": ("python bench/attention.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip(),
        "machine": machine,
        **spec,
        **_measure.parse_result(proc.stdout),
    }
    stem = Path(args.results_dir) / f"attention-{date}-{result['capability'].lower()}"
    _measure.write_report(stem, result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
