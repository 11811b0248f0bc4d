"""Speed variants of one model, one process each: what a speed choice is worth on this machine.

    python bench/variants.py                                  # the default model, precision auto, native kernels
    python bench/variants.py --isa avx2 --precision fp32      # as on an AVX2-only CPU (see bench/breakdown.py)
    python bench/variants.py --model lucidrains --rows default,channels_last
    python bench/variants.py --model diffusers --rows default,fused_forward_attention,default,fused_forward_attention

Each row builds `ddpmkit.train.Trainer` on synthetic data (batch 64) and times Trainer.train_step
like bench/speed.py (median of timed windows after a warm-up), then sampling with the run's default
sampler (DDIM 50, batch 64); one thing changes per row. `compile` rows run in a fresh Inductor cache
(cold: the compile time is in "first step") and again in the same cache (warm). Writes
bench/results/variants-<date>-<isa>-<model>-<precision>[-rows-<rows>].{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _measure
import speed
import torch
from _measure import FULL

HERE = Path(__file__).resolve().parent
ISA_ENV = _measure.ISA_ENV
VARIANTS = {  # row -> what changes
    "default": "the defaults (fused AdamW)",
    "foreach": "foreach AdamW instead of fused",
    "channels_last": "model weights and activations in channels_last memory format",
    "compile_cold": "--compile (torch.compile of the training network and of the sampling network), empty cache",
    "compile_warm": "--compile, the cache the cold row left",
    "frozen_cold": "sampling only: torch.compile with freezing (weights as constants, convolutions prepacked)",
    "frozen_warm": "sampling only, frozen compile, the cache the cold row left",
    "l_simple": "--min-snr-gamma off (L_simple): the weighting's cost",
    "fused_forward_attention": "bf16 forward passes attend by SDPA's fused kernel (ddpmkit until 2026-12-03) "
    "instead of two matmuls a few images at a time",
}


def worker(spec: dict) -> dict:
    from ddpmkit.run import build
    from ddpmkit.run.config import resolve
    from ddpmkit.run.sampling import default_labels, generate
    from ddpmkit.train import Trainer

    torch.set_num_threads(spec["threads"])
    variant = spec["variant"]
    if variant == "fused_forward_attention":
        import attention

        from ddpmkit.models import layers

        layers.cpu_attention_kernel = attention.FORWARD_RULES["fused"](layers.cpu_attention_kernel)
    if spec["model"] == "default":
        model, conditional = speed.default_model(28), True
    else:
        model, _ = speed.reference_matched(spec["model"], spec["target"])
        conditional = False
    compiled, frozen = variant.startswith("compile"), variant.startswith("frozen")
    config = speed.ddpmkit_config(model, conditional, spec["precision"], FULL, compile=compiled)
    if variant == "l_simple":
        config.diffusion.min_snr_gamma = None
    config = resolve(config)
    trainer = Trainer(config, Path(tempfile.gettempdir()) / "ddpmkit-bench-unused", speed.synthetic_data(256))
    if variant == "foreach":
        trainer.optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=config.train.lr, foreach=True)
    if variant == "channels_last":
        trainer.model.to(memory_format=torch.channels_last)
        trainer.ema.to(memory_format=torch.channels_last)
    denoiser = build.denoiser(config, trainer.ema, trainer.schedule)
    if compiled or frozen:
        denoiser.net = build.compiled(trainer.ema, "cpu", frozen=frozen)

    def step():
        trainer.train_step()
        trainer.step += 1

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    rate, rates = _measure.train_images_per_s(step, FULL)
    labels = default_labels(config, FULL.batch, None)
    shape = (config.in_channels, config.image_size, config.image_size)

    def sample():
        return generate(denoiser, FULL.batch, shape, labels=labels, settings=config.sample, batch_size=FULL.batch)

    start = time.perf_counter()
    sample()  # warm-up (with compile: the sampling network's compilation)
    first_sample = time.perf_counter() - start
    sample_rate, sample_rates = _measure.sample_images_per_s(sample, lambda: None, FULL)
    return {
        "train_images_per_s": rate,
        "windows": rates,
        "first_step_s": first,
        "sample_images_per_s": sample_rate,
        "sample_runs": sample_rates,
        "first_sample_s": first_sample,
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Speed variants of one model.")
    p.add_argument("--isa", choices=sorted(ISA_ENV), default="native", help="native, or avx2 (emulated)")
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16 (auto)")
    p.add_argument("--model", choices=("default", "lucidrains", "diffusers"), default="default")
    p.add_argument("--rows", help=f"a comma-separated subset of {', '.join(VARIANTS)} (a row named twice runs twice)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results-dir", default=str(HERE / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import json

        _measure.emit(worker(json.loads(args.worker)))
        return 0
    import json

    rows_wanted = args.rows.split(",") if args.rows else list(VARIANTS)
    unknown = sorted(set(rows_wanted) - set(VARIANTS))
    if unknown:
        p.error(f"unknown rows: {', '.join(unknown)}")
    machine = _measure.machine(args.threads)
    cache = tempfile.mkdtemp(prefix="ddpmkit-inductor-")  # the compile rows' own cache: cold, then warm
    env = {
        **os.environ,
        **ISA_ENV[args.isa],
        "OMP_NUM_THREADS": str(args.threads),
        "TQDM_DISABLE": "1",
        "TORCHINDUCTOR_CACHE_DIR": cache,
    }
    rows = []
    for name in rows_wanted:
        spec = {
            "variant": name,
            "threads": args.threads,
            "precision": args.precision,
            "model": args.model,
            "target": speed.PARAMS_1X28.get(args.model),
        }
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            cwd=HERE,
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"row {name} failed")
        rows.append({"name": name, "what": VARIANTS[name], **_measure.parse_result(proc.stdout)})
    base = rows[0]
    date = datetime.date.today().isoformat()
    command = "python bench/variants.py " + " ".join(sys.argv[1:] if argv is None else argv)
    flags = ", ".join(machine.get("isa", []))
    lines = [
        f"# Speed variants, {date}",
        "",
        f"Command: `{command.strip()}`",
        "",
        *([_measure.busy_warning(machine), ""] if _measure.busy_warning(machine) else []),
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({flags}), torch {machine['torch']}, "
        f"{args.threads} threads; kernels {base['capability']} (--isa {args.isa}); precision {args.precision}; "
        f"model {args.model} ({base['params'] / 1e6:.2f}M parameters), batch 64; sampling DDIM 50.",
        "",
        "| row | what changes | train img/s | vs first | sample img/s | vs first | first step (s) "
        "| first sampling (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['what']} | {r['train_images_per_s']:.1f} | "
            f"{r['train_images_per_s'] / base['train_images_per_s']:.2f}x | {r['sample_images_per_s']:.2f} | "
            f"{r['sample_images_per_s'] / base['sample_images_per_s']:.2f}x | {r['first_step_s']:.1f} | "
            f"{r['first_sample_s']:.1f} |"
        )
    subset = "" if not args.rows else "-rows-" + "-".join(rows_wanted)  # a subset never overwrites a full run
    stem = Path(args.results_dir) / f"variants-{date}-{args.isa}-{args.model}-{args.precision}{subset}"
    _measure.write_report(
        stem, {"date": date, "command": command.strip(), "machine": machine, "rows": rows}, "\n".join(lines) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(_measure.run_main(main))
