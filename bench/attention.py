"""Attention's kernels on the CPU: which computes softmax(q^T k / sqrt(d)) v fastest, at each shape.

    python bench/attention.py                 # this CPU's kernels, fp32 (and bf16 where native)
    python bench/attention.py --isa avx2      # as on an AVX2-only CPU

ddpmkit's Attention2d computes q, k, v with a 1x1 convolution, so they come as [B, heads, d, N].
Three ways to attend, all the same formula:
- `view`: SDPA on transposed views (d not at stride 1). It cannot use its fused (flash) CPU kernel and
  runs the unfused math path (bmm, softmax, and the masking checks around them). ddpmkit before 2026-12-02.
- `fused`: `models.layers.fused_attention`, q, k, v copied to [B, heads, N, d], then SDPA's flash kernel.
- `fused_fp32`: `models.layers.fused_fp32_attention`, the same on fp32 copies (differs from `fused`
  in bf16 only).
- `matmul`: `models.layers.matmul_attention`, two matmuls in the [B, heads, d, N] layout, scores and
  softmax in fp32, a few images at a time so that the scores stay in cache (since 2026-12-03, second
  session; before, the whole batch at once).
`full_attention` (what Attention2d runs) picks among the last three by positions, dtype and whether a
gradient is needed; the report marks its pick, and whether it was the fastest, for forward alone
(sampling) and forward + backward (training), at the attention shapes of the models bench/speed.py
measures (batch 64), each time the best of several windows.
A second table checks the forward-pass rule where it counts, in the model: the forward pass of each
network bench/speed.py measures at 1x28x28 (default, lucidrains- and diffusers-matched; batch 64,
no gradient), with full_attention's pick, with SDPA's fused kernel everywhere and with two matmuls
wherever a forward pass has at most MATMUL_FORWARD_MAX_POSITIONS (in fp32 too), in interleaved rounds
in one process (the machine's drift hits all alike), the best round of each. `--model-only` runs
only that table.
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

from ddpmkit.models.layers import (
    ATTENTION_KERNELS,
    MATMUL_FORWARD_MAX_POSITIONS,
    cpu_attention_kernel,
    is_training_pass,
    matmul_attention,
)

HERE = Path(__file__).resolve().parent
ISA_ENV = _measure.ISA_ENV
# (what has attention there, channels, heads, side): N = side^2 positions, d = channels / heads
SHAPES = [
    ("default model at 28x28 and 32x32: lowest level", 64, 4, 7),
    ("~ lucidrains at 28x28: 7x7", 120, 4, 7),
    ("~ diffusers at 28x28: 14x14", 72, 4, 14),
    ("~ diffusers at 28x28: 7x7", 144, 4, 7),
    ("colour 32x32, attention at 8x8", 64, 4, 8),
    ("colour 32x32, attention at 16x16", 64, 4, 16),
    ("colour 64x64, attention at 32x32", 64, 4, 32),
]


def view(q, k, v):
    """SDPA on transposed views of [B, heads, d, N]: the math path (ddpmkit before 2026-12-02)."""
    q, k, v = (z.transpose(-1, -2) for z in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(-1, -2)


KERNELS = {"view": view, **ATTENTION_KERNELS}  # the others: what full_attention picks from


def pick(x: torch.Tensor, grad: bool) -> str:
    """The kernel full_attention runs for q like x[:, 0], with or without a gradient."""
    return cpu_attention_kernel(x[:, 0].detach().requires_grad_(grad))


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
    for what, channels, heads, side in [] if spec.get("model_only") else SHAPES:
        qkv = 2 * torch.randn(spec["batch"], 3, heads, channels // heads, side * side)
        for dtype in spec["dtypes"]:
            row = {"what": what, "channels": channels, "heads": heads, "side": side, "dtype": dtype}
            x = qkv.to(getattr(torch, dtype))
            exact = matmul_attention(*x.double().unbind(1))
            row["pick_forward"], row["pick_train"] = pick(x, False), pick(x, True)
            for name, attend in KERNELS.items():
                out = attend(*x.unbind(1))
                row[f"{name}_rel_error"] = float((out.double() - exact).norm() / exact.norm())

                def forward(attend=attend, x=x):
                    with torch.no_grad():
                        attend(*x.unbind(1))

                def train(attend=attend, x=x):
                    leaf = x.detach().requires_grad_(True)
                    attend(*leaf.unbind(1)).float().sum().backward()

                row[f"{name}_forward_ms"] = time_ms(forward, spec["seconds"], spec["windows"])
                row[f"{name}_train_ms"] = time_ms(train, spec["seconds"], spec["windows"])
            rows.append(row)
    return {"rows": rows, "model_rows": model_rows(spec), "capability": torch.backends.cpu.get_cpu_capability()}


def forward_rule(picked, forward_kernel):
    """cpu_attention_kernel with forward passes (no gradient) sent to forward_kernel(q) instead."""

    def rule(q):
        return picked(q) if is_training_pass(q) else forward_kernel(q)

    return rule


FORWARD_RULES = {  # the in-model table's columns: full_attention's pick, and two rules for forward passes
    "pick": lambda picked: picked,
    "fused": lambda picked: forward_rule(picked, lambda q: "fused"),
    "matmul": lambda picked: forward_rule(
        picked, lambda q: "matmul" if q.shape[-1] <= MATMUL_FORWARD_MAX_POSITIONS else picked(q)
    ),
}


def model_rows(spec: dict) -> list[dict]:
    """Forward passes of the 1x28x28 networks under each of FORWARD_RULES, interleaved."""
    import speed

    from ddpmkit.models import layers
    from ddpmkit.run.build import net as build_net

    picked = layers.cpu_attention_kernel
    rows = []
    for name in ("default", "lucidrains", "diffusers"):
        if name == "default":
            model = speed.default_model(28)
        else:
            model = speed.reference_matched(name, speed.PARAMS_1X28[name])[0]
        net = build_net(speed.ddpmkit_config(model, False, "fp32", speed.QUICK)).eval()
        x, t = torch.randn(spec["batch"], 1, 28, 28), torch.randint(0, 1000, (spec["batch"],))
        for dtype in spec["dtypes"]:

            def forward(net=net, x=x, t=t, bf16=dtype == "bfloat16"):
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    net(x, t)

            times = {"pick": [], "fused": [], "matmul": []}
            for _ in range(spec["rounds"]):
                for kernel in times:
                    layers.cpu_attention_kernel = FORWARD_RULES[kernel](picked)
                    times[kernel].append(time_ms(forward, spec["seconds"], 1))
            layers.cpu_attention_kernel = picked
            rows.append({"model": name, "dtype": dtype, **{f"{k}_ms": min(v) for k, v in times.items()}})
    return rows


def cell(row: dict, kind: str) -> str:
    """Each kernel's milliseconds in KERNELS' order, full_attention's pick in bold."""
    return " / ".join(
        f"**{row[f'{k}_{kind}_ms']:.2f}**" if k == row[f"pick_{kind}"] else f"{row[f'{k}_{kind}_ms']:.2f}"
        for k in KERNELS
    )


def pick_speed(row: dict, kind: str) -> str:
    """How the pick compares with the fastest kernel: 'fastest', or the fastest's speed-up over it."""
    times = {k: row[f"{k}_{kind}_ms"] for k in KERNELS}
    best = min(times, key=times.get)
    return "fastest" if best == row[f"pick_{kind}"] else f"{best} {times[row[f'pick_{kind}']] / times[best]:.2f}x"


def report(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Attention's kernels on the CPU, {result['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        *([_measure.busy_warning(m), ""] if _measure.busy_warning(m) else []),
        f"Machine: {m['cpu']}, {m['cores']} cores, instruction sets {', '.join(m['isa'])}, torch {m['torch']}, "
        f"{result['threads']} threads; kernels: {result['capability']}. Batch {result['batch']}; each time the "
        f"best of {result['windows']} windows of {result['seconds']:g} s. Kernels (bench/attention.py's "
        "docstring): `view` SDPA on transposed views (its math path; ddpmkit before 2026-12-02), `fused` "
        "SDPA's flash kernel on contiguous q, k, v, `fused_fp32` the same on fp32 copies, `matmul` two matmuls "
        "with fp32 scores, a few images at a time. **Bold**: what "
        "`full_attention` runs. Error: relative to fp64, q, k, v ~ N(0, 4).",
    ]
    if result["rows"]:  # none with --model-only
        lines += [
            "",
            f"| attention at | C, heads, d | N | dtype | forward ms: {' / '.join(KERNELS)} | pick | "
            f"forward + backward ms: {' / '.join(KERNELS)} | pick | rel. error: {' / '.join(ATTENTION_KERNELS)} |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for r in result["rows"]:
        errors = " / ".join(f"{r[f'{k}_rel_error']:.1e}" for k in ATTENTION_KERNELS)
        lines.append(
            f"| {r['what']} | {r['channels']}, {r['heads']}, {r['channels'] // r['heads']} | {r['side'] ** 2} "
            f"| {r['dtype']} | {cell(r, 'forward')} | {pick_speed(r, 'forward')} | {cell(r, 'train')} "
            f"| {pick_speed(r, 'train')} | {errors} |"
        )
    lines += [
        "",
        f"In the model: one forward pass of bench/speed.py's 1x28x28 networks (batch {result['batch']}, no "
        f"gradient; bf16 as autocast), full_attention's pick against the fused kernel everywhere and "
        f"against two matmuls up to {MATMUL_FORWARD_MAX_POSITIONS} positions, {result['rounds']} interleaved rounds of "
        f"{result['seconds']:g} s, the best of each:",
        "",
        "| network | dtype | ms with the pick | ms with fused | "
        f"ms with matmul <= {MATMUL_FORWARD_MAX_POSITIONS} | pick vs fused | pick vs matmul |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result.get("model_rows", []):
        pick, fused, matmul = r["pick_ms"], r["fused_ms"], r["matmul_ms"]
        lines.append(
            f"| {r['model']} | {r['dtype']} | {pick:.1f} | {fused:.1f} | {matmul:.1f} | {fused / pick:.2f}x | "
            f"{matmul / pick:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Attention's kernels on the CPU: SDPA on views, fused (bf16 or fp32), two matmuls."
    )
    p.add_argument("--isa", choices=sorted(ISA_ENV), default="native", help="native, or avx2 (emulated)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=1.0, help="length of one timing window (1.0)")
    p.add_argument("--windows", type=int, default=3, help="timing windows; the best is kept (3)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the in-model table (4)")
    p.add_argument("--model-only", action="store_true", help="only the in-model table (a few minutes)")
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
        "rounds": args.rounds,
        "model_only": args.model_only,
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
    only = "-model-only" if args.model_only else ""  # never overwrites a full report
    stem = Path(args.results_dir) / f"attention-{date}-{result['capability'].lower()}{only}"
    _measure.write_report(stem, result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(_measure.run_main(main))
