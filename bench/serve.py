"""`ddpmkit serve` as a browser sees it: end-to-end time and time to the first streamed frame.

    python bench/serve.py RUN                  # 16 images, DPM-Solver++ 15 steps, 2 cores, 20 timed requests
    python bench/serve.py RUN --quick          # smoke test of the harness: 3 requests of 2 images, 2 steps

Starts `ddpmkit serve RUN` on a free loopback port in a process pinned to --threads cores, and sends
requests one at a time through gradio_client, as the page's Generate button does. For each request:
the time to the first streamed picture of x_t and x0_hat, fetched (what the page shows first), and the
time to the final grid, fetched (end to end); the server's own sampling time from the page's line.
Issue #13 asks, on 2 cores with the default Fashion-MNIST model: end to end <= 3 s, first frame <= 1 s.
Writes bench/results/serve-<date>.{md,json} (--quick: bench/_work/).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import _measure

from ddpmkit.run import checkpoint
from ddpmkit.serve.requests import EVERY_CLASS, UNCONDITIONAL, option_names
from ddpmkit.serve.runs import run_names

HERE = Path(__file__).resolve().parent
TARGETS = {"end_to_end_s": 3.0, "first_frame_s": 1.0}  # issue #13, p50 and p95 alike


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="End-to-end and first-frame times of `ddpmkit serve`.")
    p.add_argument("run_dir", help="a run directory (the lead's: the default Fashion-MNIST model)")
    p.add_argument("--n", type=int, default=16, help="images per request (16)")
    p.add_argument("--sampler", default="dpm++", help="the sampler (dpm++)")
    p.add_argument("--steps", type=int, default=15, help="sampling steps (15)")
    p.add_argument("--requests", type=int, default=20, help="timed requests (20), after 2 untimed")
    p.add_argument("--threads", type=int, default=2, help="cores the server may use (2)")
    p.add_argument("--quick", action="store_true", help="a smoke test: 3 requests of 2 images with 2 steps")
    p.add_argument("--results-dir", help="where to write (bench/results; --quick: bench/_work)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.steps, args.requests = 2, 2, 3
    out_dir = Path(args.results_dir or HERE / ("_work" if args.quick else "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = _measure.machine(args.threads)
    config = checkpoint.load_config(Path(args.run_dir))
    with tempfile.TemporaryDirectory() as scratch, Server(Path(args.run_dir), args.threads, Path(scratch)) as server:
        from gradio_client import Client

        client = Client(server.url, verbose=False, download_files=False)
        request = endpoint_args(Path(args.run_dir), config, args.n, args.sampler, args.steps)
        for seed in range(2):  # warm-up: first calls load kernels, fill caches
            time_one(client, request, seed)
        rows = [time_one(client, request, 1000 + k) for k in range(args.requests)]
        server_rss = server.rss_mib()
    summary = {key: percentiles([row[key] for row in rows]) for key in ("end_to_end_s", "first_frame_s", "sampling_s")}
    date = datetime.date.today().isoformat()
    command = "python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(summary, machine, args, config, command, server_rss)
    result = {"date": date, "command": command, "machine": machine, "summary": summary, "rows": rows}
    result["server_rss_mib"], result["targets"] = server_rss, TARGETS
    _measure.write_report(out_dir / f"serve-{date}", result, text)
    return 0


class Server:
    """`ddpmkit serve RUN` on a free loopback port, on the first `threads` cores, until the block ends."""

    def __init__(self, run_dir: Path, threads: int, scratch: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.log = f"http://127.0.0.1:{self.port}/", scratch / "server.log"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TMPDIR": str(scratch)}
        cores = sorted(os.sched_getaffinity(0))[:threads]
        command = [sys.executable, "-m", "ddpmkit", "serve", str(run_dir), "--port", str(self.port), "--device", "cpu"]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=lambda: os.sched_setaffinity(0, cores),
            )

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while self.url not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"the server did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024


def endpoint_args(run_dir: Path, config, n: int, sampler: str, steps: int) -> list:
    """/generate's inputs: the run's page name, every class (or none), guidance 1, the run's other defaults."""
    s = config.sample
    cls = EVERY_CLASS if config.data.conditional else UNCONDITIONAL
    return [run_names([run_dir])[0], cls, 1.0, sampler, steps, s.spacing, 0, n] + [
        getattr(s, name) for name in option_names()
    ]


def time_one(client, request: list, seed: int) -> dict:
    """One request: seconds to the first streamed picture and to the grid, both fetched."""
    args = list(request)
    args[6] = seed
    start = time.perf_counter()
    job = client.submit(*args, api_name="/generate")
    first_frame = None
    for out in job:
        if first_frame is None and isinstance(out[0], dict) and "url" in out[0]:
            fetch(out[0]["url"])
            first_frame = time.perf_counter() - start
    final = job.outputs()[-1]
    if not (isinstance(final[1], dict) and "url" in final[1]):
        raise RuntimeError(f"the request failed: {final[-1]}")
    fetch(final[1]["url"])
    end = time.perf_counter() - start
    sampling = float(re.search(r" in ([0-9.]+) s,", final[2]).group(1))
    return {"seed": seed, "first_frame_s": first_frame or end, "end_to_end_s": end, "sampling_s": sampling}


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": statistics.median(ordered), "p95": p95, "min": ordered[0], "max": ordered[-1]}


def report(summary: dict, machine: dict, args, config, command: str, rss: float) -> str:
    model = f"{config.data.dataset} {config.image_size}x{config.image_size}, T = {config.diffusion.timesteps}"
    lines = [
        f"# `ddpmkit serve`: {args.n} images, {args.sampler} {args.steps} steps, {args.threads} cores",
        "",
        f"`{command}` on {datetime.date.today().isoformat()}; run: {args.run_dir} ({model}); "
        f"{args.requests} timed requests one at a time through gradio_client, after 2 untimed.",
        "",
    ]
    warning = _measure.busy_warning(machine)
    lines += [warning, ""] if warning else []
    lines += ["| seconds | p50 | p95 | target |", "|---|---|---|---|"]
    names = {"first_frame_s": "first streamed frame", "end_to_end_s": "end to end (grid shown)"}
    names["sampling_s"] = "sampling alone (server)"
    for key, name in names.items():
        target = f"<= {TARGETS[key]:g}" if key in TARGETS else ""
        lines.append(f"| {name} | {summary[key]['p50']:.3f} | {summary[key]['p95']:.3f} | {target} |")
    lines += [
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, server on "
        f"{args.threads} cores; server memory after the requests: {rss:.0f} MiB.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(_measure.run_main(main))
