"""Speed of ddpmkit against the reference implementations, in one run on one machine.

    python bench/speed.py                  # the full comparison; writes bench/results/speed-<date>.{md,json}
    python bench/speed.py --channels 3 --size 32   # colour: bench/results/speed-<date>-3x32x32.{md,json}
    python bench/speed.py --quick          # tiny sizes, a smoke run (writes under bench/_work/)

Every row runs in a fresh subprocess with the same thread count and the same input (1x28x28
images by default, --channels and --size for others; batch 64): training images/s (forward +
backward + optimizer step, median of timed windows after a warm-up), sampling images/s (50 DDIM
steps for one batch), peak resident memory over an idle `import torch` process, and achieved
FLOP/s against a measured matmul peak.
ddpmkit is matched in parameter count to each reference (within 5%) and also shown at its
default model; its rows run with the precision a user gets ("auto") and in fp32.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _measure
import torch
from _measure import FULL, QUICK, Sizes, Workload

HERE = Path(__file__).resolve().parent
ISA_ENV = _measure.ISA_ENV
TOLERANCE = 0.05  # matched parameter counts: |ours / reference - 1| <= 5%
REFERENCES = {  # the reference's width multipliers and the levels (0 = full size) where it has full attention
    "lucidrains": {"channel_mults": (1, 2, 4), "attn_levels": (2,)},  # 7x7 at 28, 8x8 at 32, 16x16 at 64
    "diffusers": {"channel_mults": (1, 2, 4), "attn_levels": (1, 2)},  # 14 and 7 at 28, 16 and 8 at 32
}
FASHION = (1, 28)  # (channels, size) of the default input
# _refs.lucidrains_params() and _refs.diffusers_params() at 1x28x28, for benches that match a model
# without the references installed (bench/variants.py, bench/attention.py)
PARAMS_1X28 = {"lucidrains": 2_607_681, "diffusers": 4_023_233}


def attention_sizes(levels: tuple, size: int) -> tuple:
    """The feature-map sizes of the given U-Net levels for images of `size` (each level halves it)."""
    return tuple(size // 2**level for level in levels)


def default_model(size: int) -> dict:
    """ddpmkit's default U-Net at this image size, as `ddpmkit train` builds it: run.config's defaults
    with the ones that follow the image size (channel multipliers, attention) resolved."""
    from ddpmkit.run.build import ARCH_KEYS
    from ddpmkit.run.config import RunConfig, resolve

    model = resolve(RunConfig(image_size=size)).model
    return {k: getattr(model, k) for k in ARCH_KEYS["unet"]}


# ---- ddpmkit ----------------------------------------------------------------------------------


def ddpmkit_config(
    model: dict, conditional: bool, precision: str, sizes: Sizes, compile: bool = False, shape: tuple = FASHION
):
    """A RunConfig with the defaults except the model overrides, batch, precision, compile and sampling
    steps, for images of shape (channels, size) with Fashion-MNIST's ten classes."""
    from ddpmkit.data import DATASETS
    from ddpmkit.run.config import RunConfig, apply_overrides

    config = apply_overrides(
        RunConfig(),
        {
            "model": model,
            "data": {"conditional": conditional},
            "train": {"batch_size": sizes.batch, "precision": precision, "compile": compile},
            "sample": {**_measure.DDIM_50, "steps": sizes.sample_steps, "precision": precision, "compile": compile},
        },
    )
    info = DATASETS["fashion-mnist"]
    config.in_channels, config.image_size = shape
    config.num_classes, config.class_names = info.num_classes, info.class_names
    return config


def ddpmkit_params(model: dict, conditional: bool, shape: tuple = FASHION) -> int:
    """Parameters of the ddpmkit network a row builds (counted on the meta device: no memory)."""
    from ddpmkit.run.build import net as build_net

    with torch.device("meta"):
        net = build_net(ddpmkit_config(model, conditional, "fp32", QUICK, shape=shape))
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def reference_matched(ref: str, target: int, shape: tuple = FASHION) -> tuple:
    """matched_model with the reference's width multipliers and attention levels (`target`: its parameters)."""
    mults, levels = REFERENCES[ref]["channel_mults"], REFERENCES[ref]["attn_levels"]
    return matched_model(target, mults, attention_sizes(levels, shape[1]), shape)


def matched_model(target: int, channel_mults: tuple, attn_resolutions: tuple, shape: tuple = FASHION) -> tuple:
    """The unconditional ddpmkit UNet closest in parameters to `target` (within 5%): base_channels (even
    numbers whose attention widths the 4 heads divide) with ddpmkit's depth of one residual block per
    level, else two, then three; with the reference's width multipliers, or, if none is within 5%, with
    ddpmkit's default multipliers, then (1, 2, 3). Attention stays where the reference has full attention."""
    from ddpmkit.errors import DdpmkitError
    from ddpmkit.run.config import RunConfig, resolve

    best = None
    for mults in (tuple(channel_mults), resolve(RunConfig()).model.channel_mults, (1, 2, 3)):
        for blocks in (1, 2, 3):  # ddpmkit's depth (1) first: widen before deepening
            for base in range(16, 132, 2):  # the count grows with base: stop once past the target
                model = {
                    "base_channels": base,
                    "channel_mults": mults,
                    "num_res_blocks": blocks,
                    "attn_resolutions": tuple(attn_resolutions),
                }
                try:
                    params = ddpmkit_params(model, conditional=False, shape=shape)
                except DdpmkitError:  # e.g. the heads do not divide an attention width
                    continue
                if best is None or abs(params / target - 1) < abs(best[1] / target - 1):
                    best = (model, params)
                if params > target:
                    break
            if best is not None and abs(best[1] / target - 1) <= TOLERANCE:
                return best
    return best


def synthetic_images(n: int, shape: tuple = FASHION) -> torch.Tensor:
    """n random uint8 images of shape (channels, size): the one input every row trains on (speed
    ignores the pixels)."""
    channels, size = shape
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


def synthetic_data(n: int, shape: tuple = FASHION):
    """synthetic_images with labels 0..9, as ddpmkit's Trainer takes them."""
    import dataclasses

    from ddpmkit.data import DATASETS, ImageData

    info = dataclasses.replace(DATASETS["fashion-mnist"], channels=shape[0], image_size=shape[1])
    return ImageData(synthetic_images(n, shape), torch.arange(n) % 10, info)


def ddpmkit_workload(
    model: dict,
    conditional: bool,
    precision: str,
    sizes: Sizes,
    device: str = "cpu",
    compile: bool = False,
    shape: tuple = FASHION,
) -> Workload:
    """Training: Trainer.train_step as `ddpmkit train` runs it (autocast, clipping, EMA update).
    Sampling: sampling.generate with DDIM (eta 0, uniform spacing), as the references sample."""
    from ddpmkit.run.build import denoiser as denoiser_for
    from ddpmkit.run.sampling import default_labels, generate
    from ddpmkit.train import Trainer

    config = ddpmkit_config(model, conditional, precision, sizes, compile, shape)
    data = synthetic_data(4 * sizes.batch, shape)
    trainer = Trainer(config, Path(tempfile.gettempdir()) / "ddpmkit-bench-unused", data, device)
    denoiser = denoiser_for(config, trainer.ema, trainer.schedule)
    labels = default_labels(config, sizes.batch, None)
    labels = labels if labels is None else labels.to(device)
    shape = (config.in_channels, config.image_size, config.image_size)

    def train_step():
        trainer.train_step()
        trainer.step += 1

    def sample():
        return generate(
            denoiser, sizes.batch, shape, labels=labels, settings=config.sample, batch_size=sizes.batch, device=device
        )

    def forward():
        x = torch.randn(sizes.batch, *shape, device=device)
        with torch.inference_mode():
            denoiser(x, 500, labels)

    info = {
        "library": "ddpmkit",
        "model": {**config.model.__dict__},
        "conditional": conditional,
        "precision": precision,
        "sampler": config.sample.sampler,
        "compile": compile,
    }
    params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return Workload(params, train_step, sample, forward, info)


# ---- one row, in its own process --------------------------------------------------------------


def build(spec: dict, sizes: Sizes) -> Workload:
    device, shape = spec.get("device", "cpu"), tuple(spec.get("shape", FASHION))
    if spec["impl"] == "ddpmkit":
        return ddpmkit_workload(
            spec["model"], spec["conditional"], spec["precision"], sizes, device, spec.get("compile", False), shape
        )
    import _refs  # the reference rows import no ddpmkit: their memory is their own

    images = synthetic_images(sizes.batch, shape).to(device)
    if spec["impl"] == "lucidrains":
        return _refs.lucidrains_workload(images.float() / 255, sizes.sample_steps)
    return _refs.diffusers_workload(images.float() / 127.5 - 1, sizes.sample_steps)


def worker(spec: dict) -> dict:
    """Measure one row: sampling first (its peak memory is then its own), then training, then FLOPs."""
    _measure.set_threads(spec["threads"])
    if spec["impl"] == "baseline":
        return {"rss_mib": _measure.peak_rss_mib()}
    device = spec.get("device", "cpu")
    if spec["impl"] == "peak":  # this machine's limits, as the rows' processes see it (kernels, ISA limit)
        matmul = _measure.matmul_peak(spec["threads"], spec["n"], spec["seconds"], device)
        conv = _measure.conv_peak(spec["threads"], spec["seconds"], device)
        return {**matmul, "conv": conv, "kernels": torch.backends.cpu.get_cpu_capability()}
    sizes = Sizes(**spec["sizes"])
    workload = build(spec, sizes)
    rss_built = _measure.peak_rss_mib()
    _measure.peak_device_mib(device, reset=True)
    sample_rate, sample_rates = _measure.sample_images_per_s(workload.sample, workload.forward, sizes, device)
    rss_sample, gpu_sample = _measure.peak_rss_mib(), _measure.peak_device_mib(device, reset=True)
    train_rate, train_rates = _measure.train_images_per_s(workload.train_step, sizes, device)
    rss_train, gpu_train = _measure.peak_rss_mib(), _measure.peak_device_mib(device)
    from ddpmkit.core.precision import resolve_precision

    precision = spec.get("precision", "fp32")
    return {
        "params": workload.params,
        "info": workload.info,
        # ddpmkit's "auto" as this process resolves it (an ISA limit can make it fp32); the references run fp32
        "resolved_precision": resolve_precision(precision, device) if spec["impl"] == "ddpmkit" else "fp32",
        "gpu_sample_mib": gpu_sample,
        "gpu_train_mib": gpu_train,
        "train_images_per_s": train_rate,
        "train_windows": train_rates,
        "sample_images_per_s": sample_rate,
        "sample_runs": sample_rates,
        "rss_built_mib": rss_built,
        "rss_sample_mib": rss_sample,
        "rss_train_mib": rss_train,
        "train_step_flops": _measure.count_flops(workload.train_step),
        "forward_flops": _measure.count_flops(workload.forward),
    }


def run_worker(spec: dict, timeout: float = 1800) -> dict:
    """Run `worker(spec)` in a fresh interpreter with the thread count fixed in its environment."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(spec["threads"]),
        "MKL_NUM_THREADS": str(spec["threads"]),
        "TQDM_DISABLE": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec.get('name', spec['impl'])} failed:\n{proc.stderr[-3000:]}")
    return _measure.parse_result(proc.stdout)


# ---- the plan and the report ------------------------------------------------------------------


def plan(references: list[str], default: dict, compile: bool = False, shape: tuple = FASHION) -> list[dict]:
    """Rows: each reference, ddpmkit matched to it (auto and fp32), ddpmkit's default model (and compiled)."""
    import _refs

    counts = {"lucidrains": _refs.lucidrains_params, "diffusers": _refs.diffusers_params}
    rows = []
    for ref in references:
        rows.append({"name": ref, "impl": ref, "precision": "fp32"})
        model, _ = reference_matched(ref, counts[ref](*shape), shape)
        for precision in ("auto", "fp32"):
            rows.append(
                {
                    "name": f"ddpmkit ~ {ref}",
                    "impl": "ddpmkit",
                    "model": model,
                    "conditional": False,
                    "precision": precision,
                    "matched_to": ref,
                }
            )
    for precision in ("auto", "fp32"):
        rows.append(
            {
                "name": "ddpmkit default",
                "impl": "ddpmkit",
                "model": default,
                "conditional": True,
                "precision": precision,
            }
        )
    if compile:
        rows.append(
            {
                "name": "ddpmkit default --compile",
                "impl": "ddpmkit",
                "model": default,
                "conditional": True,
                "precision": "auto",
                "compile": True,
            }
        )
    return rows


def measure(
    rows: list[dict], sizes: Sizes, threads: int, quick: bool, device: str = "cpu", shape: tuple = FASHION
) -> dict:
    """Run the baseline, the matmul peak and every row, each in its own process; collect the records."""
    base = {"threads": threads, "device": device, "shape": list(shape)}
    baseline = run_worker({**base, "impl": "baseline"})["rss_mib"]
    n = (512 if quick else 2048) * (4 if device.startswith("cuda") else 1)
    peak = run_worker({**base, "impl": "peak", "n": n, "seconds": 0.5 if quick else 3.0})
    records = []
    for row in rows:
        print(f"measuring {row['name']} ({row['precision']}) ...", file=sys.stderr, flush=True)
        record = run_worker({**base, **row, "sizes": sizes._asdict()})
        records.append(
            {
                **row,
                **record,
                "batch": sizes.batch,
                "sample_steps": sizes.sample_steps,
                "train_mib": record["rss_train_mib"] - baseline,
                "sample_mib": record["rss_sample_mib"] - baseline,
                "built_mib": record["rss_built_mib"] - baseline,
            }
        )
    for r in records:
        _add_derived(r, records, peak, device)
    return {"idle_torch_rss_mib": baseline, "matmul_peak_gflops": peak, "rows": records}


def _add_derived(r: dict, records: list[dict], peak: dict, device: str = "cpu") -> None:
    """Achieved GFLOP/s against the matmul peak of the row's precision; ratios to its reference."""
    from ddpmkit.core.precision import resolve_precision

    r.setdefault("resolved_precision", resolve_precision(r["precision"], device))
    steps_per_s = r["train_images_per_s"] / r["batch"]
    r["train_gflops"] = r["train_step_flops"] * steps_per_s / 1e9
    forwards_per_s = r["sample_steps"] * r["sample_images_per_s"] / r["batch"]
    r["sample_gflops"] = r["forward_flops"] * forwards_per_s / 1e9
    for kind, peaks in (("", peak), ("conv_", peak.get("conv", {}))):  # fractions of the matmul and conv peaks
        top = peaks.get(r["resolved_precision"])
        r[f"train_{kind}peak_fraction"] = r["train_gflops"] / top if top else None
        r[f"sample_{kind}peak_fraction"] = r["sample_gflops"] / top if top else None
    ref = next((x for x in records if x["impl"] == r.get("matched_to")), None)
    if ref is not None:
        keys = (
            "train_images_per_s",
            "sample_images_per_s",
            "train_mib",
            "sample_mib",
            "gpu_train_mib",
            "gpu_sample_mib",
        )
        r["ratio"] = {k: r[k] / ref[k] if ref[k] > 0 else None for k in keys}


def _fmt_ratio(r: dict, key: str) -> str:
    value = r.get("ratio", {}).get(key)
    return "" if value is None else f"{value:.2f}x"


def _gflops(value) -> str:
    return "-" if value is None else f"{value:.1f} GFLOP/s"


def _rate_of_peaks(r: dict, kind: str) -> str:
    """GFLOP/s and its fractions of the matmul and the convolution peaks."""
    return (
        f"{r[kind + '_gflops']:.1f} ({_pct(r[kind + '_peak_fraction'])}, {_pct(r.get(kind + '_conv_peak_fraction'))})"
    )


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _shape_name(result: dict) -> str:
    channels, size = result.get("shape", FASHION)
    return f"{channels}x{size}x{size}"


def table(result: dict) -> str:
    """The markdown report: machine and versions, the matched configurations, the measurements."""
    m, peak = result["machine"], result["matmul_peak_gflops"]
    on_gpu = bool(m.get("gpu"))
    mem = "gpu_" if on_gpu else ""  # CUDA: peak allocated GPU memory; CPU: peak resident memory
    lines = [
        f"# Speed, {result['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        *([_measure.busy_warning(m), ""] if _measure.busy_warning(m) else []),
        (
            f"Device: {m['gpu']} (CUDA; host {m['cpu']}, torch {m['torch']}). "
            if on_gpu
            else f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads; "
            f"instruction sets {', '.join(m.get('isa', []))}; kernels used: {peak.get('kernels', '?')}"
            + (
                f" (limited by {', '.join(f'{k}={v}' for k, v in m['isa_limit'].items())})"
                if m.get("isa_limit")
                else ""
            )
            + ". "
        )
        + f"Peaks: matmul ({peak['n']}x{peak['n']}) fp32 {_gflops(peak['fp32'])}, bf16 {_gflops(peak['bf16'])}; "
        f"3x3 convolution ({peak.get('conv', {}).get('shape', '?')}) fp32 {_gflops(peak.get('conv', {}).get('fp32'))}, "
        f"bf16 {_gflops(peak.get('conv', {}).get('bf16'))} (bf16: only where the hardware computes it).",
        "",
        "References: " + (", ".join(f"{k} {v}" for k, v in result["references"].items()) or "none"),
        *[f"Skipped {k}: {v}" for k, v in result["skipped"].items()],
        "",
        f"Batch {result['sizes']['batch']} of {_shape_name(result)}; "
        f"sampling {result['sizes']['sample_steps']} DDIM steps; "
        + (
            "memory columns: peak GPU memory allocated."
            if on_gpu
            else f"idle `import torch` process {result['idle_torch_rss_mib']:.0f} MiB "
            "(subtracted from the memory columns)."
        ),
        "",
        "| row | precision | params | train img/s | vs ref | sample img/s | vs ref | train MiB | sample MiB "
        "| train GFLOP/s (% matmul, % conv peak) | sample GFLOP/s (% matmul, % conv peak) |",
        "|" + "---|" * 11,
    ]
    for r in result["rows"]:
        precision = r["precision"] + (f" ({r['resolved_precision']})" if r["precision"] == "auto" else "")
        lines.append(
            f"| {r['name']} | {precision} | {r['params'] / 1e6:.3f}M | {r['train_images_per_s']:.1f} | "
            f"{_fmt_ratio(r, 'train_images_per_s')} | {r['sample_images_per_s']:.2f} | "
            f"{_fmt_ratio(r, 'sample_images_per_s')} | {r[mem + 'train_mib']:.0f} | {r[mem + 'sample_mib']:.0f} | "
            f"{_rate_of_peaks(r, 'train')} | {_rate_of_peaks(r, 'sample')} |"
        )
    lines += ["", "Matched ddpmkit models (unconditional; other settings are run.config.ModelConfig defaults):", ""]
    for r in result["rows"]:
        if r.get("matched_to") and r["precision"] == "auto":
            ref = next(x for x in result["rows"] if x["impl"] == r["matched_to"])
            lines.append(
                f"- ~ {r['matched_to']} ({ref['params']:,} params): {json.dumps(r['model'])} -> "
                f"{r['params']:,} params ({100 * (r['params'] / ref['params'] - 1):+.1f}%)"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Speed of ddpmkit against the reference implementations.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every row (2)")
    parser.add_argument("--skip-references", action="store_true", help="measure the ddpmkit rows only")
    parser.add_argument(
        "--results-dir", help="where speed-<date>.{md,json} go (bench/results; bench/_work with --quick)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    parser.add_argument("--batch", type=int, help="images per step and per sampling batch (64)")
    parser.add_argument(
        "--references",
        default="lucidrains,diffusers",
        help="comma-separated references to measure, each with ddpmkit matched to it (lucidrains,diffusers)",
    )
    parser.add_argument("--compile", action="store_true", help="add a row: the default model with --compile")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1, help="image channels (1)")
    parser.add_argument("--size", type=int, default=28, help="image size (28); a multiple of 4 for the references")
    parser.add_argument(
        "--isa",
        choices=sorted(ISA_ENV),
        default="native",
        help="native kernels, or avx2: every row as on an AVX2-only CPU (ATEN_CPU_CAPABILITY and "
        "ONEDNN_MAX_CPU_ISA limit PyTorch's and oneDNN's kernels; precision auto is then fp32)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _measure.emit(worker(json.loads(args.worker)))
        return 0
    chosen = [r for r in args.references.split(",") if r]
    if not chosen or set(chosen) - {"lucidrains", "diffusers"}:
        parser.error(f"--references takes lucidrains and/or diffusers, got {args.references!r}")
    machine = _measure.machine(args.threads)  # first: the load average before we add to it
    os.environ.update(ISA_ENV[args.isa])  # the rows' processes inherit it
    machine["isa_limit"] = ISA_ENV[args.isa]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    if args.size < 8 or args.size % 4:
        parser.error(f"--size must be a multiple of 4 and at least 8 (three U-Net levels), got {args.size}")
    shape = (args.channels, args.size)
    machine["gpu"] = _measure.gpu(args.device)
    if _measure.busy_warning(machine):
        print(_measure.busy_warning(machine), file=sys.stderr)
    import _refs

    sizes = QUICK if args.quick else FULL
    if args.batch:
        sizes = sizes._replace(batch=args.batch)
    references, skipped = [], {}
    for ref in chosen:
        ok, why = (False, "--skip-references") if args.skip_references else _refs.available(ref)
        if ok:
            references.append(ref)
        else:
            skipped[ref] = why
            print(f"skipping {ref}: {why}", file=sys.stderr)
    command = "python bench/speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        "date": datetime.date.today().isoformat(),
        "command": command.strip(),
        "machine": machine,
        "sizes": sizes._asdict(),
        "shape": list(shape),
        "quick": args.quick,
        "references": {ref: _refs.version(ref) for ref in references},
        "skipped": skipped,
    }
    result["device"] = args.device
    rows = plan(references, default_model(args.size), args.compile, shape)
    result.update(measure(rows, sizes, args.threads, args.quick, args.device, shape))
    report = table(result)
    out = Path(args.results_dir) if args.results_dir else HERE / ("_work" if args.quick else "results")
    suffix = "" if shape == FASHION else f"-{_shape_name(result)}"
    suffix += f"-{args.device.split(':')[0]}" if args.device != "cpu" else ""
    suffix += "" if len(chosen) == 2 else f"-{chosen[0]}"
    stem = out / f"speed-{result['date']}{suffix}"
    _measure.write_report(stem, result, report)
    return 0


if __name__ == "__main__":
    sys.exit(_measure.run_main(main))
