"""What the speed benchmark measures, the same way for every implementation.

A Workload is one model at one batch size, seen through four callables: one training step
(forward, backward, optimizer step), one batch of samples, one network evaluation (for the
sampling FLOPs) and the parameter count. Everything here is timing, FLOP counting, memory and
the machine's description; nothing knows which library it is timing.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import statistics
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils import flop_counter

MIB = 1024 * 1024


class Workload(NamedTuple):
    params: int  # trainable parameters
    train_step: Callable[[], None]  # one forward + backward + optimizer step on one batch
    sample: Callable[[], torch.Tensor]  # one batch of samples with the benchmark's number of steps
    forward: Callable[[], None]  # one network evaluation on one batch, as a sampler makes it
    info: dict  # what was built, for the report


class Sizes(NamedTuple):
    """How long to measure: warm-up steps, timed windows of training steps, sampling repeats."""

    batch: int
    warmup: int
    windows: int
    steps_per_window: int
    sample_steps: int
    sample_repeats: int


# The sampler every speed and quality row samples with: DDIM, 50 steps, uniform spacing, as the
# references do (and ddpmkit's default until issue 14), so that rows stay comparable over time.
DDIM_50 = {"sampler": "ddim", "steps": 50, "spacing": "uniform"}
DDIM_50_FLAGS = [arg for key, value in DDIM_50.items() for arg in (f"--{key}", str(value))]  # for `ddpmkit eval`

FULL = Sizes(batch=64, warmup=3, windows=5, steps_per_window=4, sample_steps=50, sample_repeats=3)
QUICK = Sizes(batch=4, warmup=1, windows=2, steps_per_window=1, sample_steps=2, sample_repeats=1)


def run_main(main: Callable[[], int | None]) -> int:
    """Run a bench script's main so that `kill PID` (SIGTERM) stops the rows it started too.

    By default SIGTERM ends this process at once and leaves a row's `ddpmkit train` running on,
    busy on the cores the next measurement needs. Here it becomes SystemExit(143) instead: the
    `subprocess.run` waiting on the row kills it, and `finally` blocks clean up, as on Ctrl-C.
    """

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    return main() or 0


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def peak_rss_mib() -> float:
    """This process's peak resident set so far: VmHWM of /proc/self/status on Linux.

    Not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a worker started by a large
    parent would report at least the parent's size. VmHWM belongs to the process's own memory map."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024  # kB
    except (OSError, StopIteration):
        scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a host clock alone would time the launches)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_device_mib(device: str, reset: bool = False) -> float:
    """CUDA: the most memory the caching allocator held for tensors since the last reset; 0 on the CPU."""
    if torch.device(device).type != "cuda":
        return 0.0
    peak = torch.cuda.max_memory_allocated(device) / MIB
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak


def train_images_per_s(step: Callable[[], None], sizes: Sizes, device: str = "cpu") -> tuple[float, list[float]]:
    """Median images/s over timed windows of training steps, after `warmup` untimed steps."""
    for _ in range(sizes.warmup):
        step()
    rates = []
    for _ in range(sizes.windows):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(sizes.steps_per_window):
            step()
        synchronize(device)
        rates.append(sizes.steps_per_window * sizes.batch / (time.perf_counter() - start))
    return statistics.median(rates), rates


def sample_images_per_s(
    sample: Callable[[], torch.Tensor], forward: Callable[[], None], sizes: Sizes, device: str = "cpu"
) -> tuple[float, list[float]]:
    """Median images/s over whole sampling runs, after one untimed network evaluation."""
    forward()
    rates = []
    for _ in range(sizes.sample_repeats):
        synchronize(device)
        start = time.perf_counter()
        images = sample()
        synchronize(device)
        rates.append(len(images) / (time.perf_counter() - start))
    return statistics.median(rates), rates


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one that
# F.scaled_dot_product_attention runs here; without these, attention would count as free.
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


def count_flops(fn: Callable[[], None]) -> int:
    """Floating-point operations of one call (matmuls, convolutions, attention; both passes)."""
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    with counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(threads: int, n: int, seconds: float = 2.0, device: str = "cpu") -> dict:
    """GFLOP/s of an n x n @ n x n matmul in fp32 and bf16 (the best of repeated runs)."""
    set_threads(threads)
    from ddpmkit.core.precision import native_cpu_bf16

    out = {"n": n}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name == "bf16" and torch.device(device).type == "cpu" and not native_cpu_bf16():
            out[name] = None  # emulated bf16 is no peak
            continue
        a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
        a @ b  # warm-up: thread pool, kernel selection
        best, spent = 0.0, 0.0
        while spent < seconds or best == 0.0:
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
            elapsed = time.perf_counter() - start
            best, spent = max(best, 2 * n**3 / elapsed / 1e9), spent + elapsed
        out[name] = best
    return out


def conv_peak(threads: int, seconds: float = 2.0, device: str = "cpu") -> dict:
    """GFLOP/s of a 3x3 convolution (batch 64, 128 -> 128 channels, 28x28, padding 1), forward, in fp32 and,
    where the CPU computes it natively (or on a GPU), bf16: the rate the U-Nets' main operator can reach."""
    from ddpmkit.core.precision import native_cpu_bf16

    set_threads(threads)
    out = {"shape": "64x128x28x28, 3x3 -> 128"}
    flops = 2 * 64 * 128 * 128 * 9 * 28 * 28
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name == "bf16" and torch.device(device).type == "cpu" and not native_cpu_bf16():
            out[name] = None  # emulated bf16 is no peak
            continue
        x = torch.randn(64, 128, 28, 28, dtype=dtype, device=device)
        w = torch.randn(128, 128, 3, 3, dtype=dtype, device=device)
        torch.nn.functional.conv2d(x, w, padding=1)  # warm-up: oneDNN primitive creation
        best, spent = 0.0, 0.0
        while spent < seconds or best == 0.0:
            synchronize(device)
            start = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1)
            synchronize(device)
            elapsed = time.perf_counter() - start
            best, spent = max(best, flops / elapsed / 1e9), spent + elapsed
        out[name] = best
    return out


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
# --isa: a worker's environment. avx2 limits PyTorch's kernels (ATEN_CPU_CAPABILITY) and oneDNN's
# (ONEDNN_MAX_CPU_ISA) to AVX2 code, as an AVX2-only CPU runs them (and "auto" precision becomes fp32)
ISA_ENV = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def gpu(device: str) -> str:
    """The GPU's name, or "" for the CPU."""
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else ""


def machine(threads: int) -> dict:
    """The CPU, its core count, the torch build and the thread count the figures were taken with."""
    try:
        with open("/proc/cpuinfo") as f:  # one block per logical CPU, all alike
            info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
    except OSError:
        info = {}
    cpu, flags = info.get("model name", platform.processor() or "unknown"), info.get("flags", "").split()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": threads,
        "load_average_at_start": os.getloadavg()[0],
        "cpu_busy_at_start": cpu_busy_share(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "isa": [f for f in ISA_FLAGS if f in flags],  # what the CPU has
        "kernels": torch.backends.cpu.get_cpu_capability(),  # what this process's kernels use
        "isa_limit": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
        "python": platform.python_version(),
    }


def cpu_busy_share(seconds: float = 1.0, stat: str = "/proc/stat") -> float | None:
    """The share of all CPUs that other processes kept busy over `seconds` while this one sleeps, from
    the kernel's counters (None without /proc). Unlike the 1-minute load average, it does not count a
    benchmark that ended just before this one began: that load decays over minutes."""

    def counters() -> tuple[int, int]:  # (all jiffies, idle + iowait jiffies) since boot
        with open(stat) as f:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
        return user + nice + system + idle + iowait + irq + softirq + steal, idle + iowait

    try:
        total_0, idle_0 = counters()
        time.sleep(seconds)
        total_1, idle_1 = counters()
    except (OSError, ValueError):
        return None
    total = total_1 - total_0
    return (total - (idle_1 - idle_0)) / total if total > 0 else None


def busy_warning(info: dict) -> str:
    """A sentence when other work was running: with every core in use, OpenMP threads wait on each other
    at every operator, and a 2-thread step can take 20x longer than on a quiet machine. Judged by the
    CPUs' busy share when the benchmark began; reports from before it was recorded, by the load average."""
    busy = info.get("cpu_busy_at_start")
    if busy is not None:
        if busy < 0.25:  # a quarter of the CPUs: half a core on this project's 2
            return ""
        return (
            f"WARNING: other processes kept {busy:.0%} of the {info['cores']} CPUs busy as it began; "
            "these figures are not representative."
        )
    load = info.get("load_average_at_start", 0.0)
    if load < 0.25 * (info.get("cores") or 2):  # 0.5 on this project's 2 cores
        return ""
    return (
        f"WARNING: the machine was busy (1-minute load average {load:.1f} on {info['cores']} cores); "
        "these figures are not representative."
    )


def write_report(stem, result: dict, text: str) -> None:
    """STEM.json (the full record) and STEM.md (the table), each written atomically; the table on stdout."""
    from pathlib import Path

    from ddpmkit.fileio import atomic_write_text

    stem = Path(stem)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(result, indent=2, default=list) + "\n")
    atomic_write_text(stem.with_suffix(".md"), text)
    print(text)
    print(f"wrote {stem}.md and {stem}.json", file=sys.stderr)


def emit(record: dict) -> None:
    """A worker's result: one JSON line on stdout, marked so that library chatter cannot be mistaken for it."""
    print("BENCH-RESULT " + json.dumps(record), flush=True)


def parse_result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("BENCH-RESULT ")]
    if not lines:
        raise RuntimeError("the worker printed no result")
    return json.loads(lines[-1][len("BENCH-RESULT ") :])
