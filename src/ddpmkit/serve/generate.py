"""Drawing images for the page: the reverse process streamed as pictures, then the grid and its files.

`stream` samples in a worker thread and yields a picture of x_t beside the model's x0_hat every few
steps while the sampler runs, then the Result: the images, the grid, the wall time and the number of
network evaluations (NFE). `downloads` writes the grid (PNG), the recorded steps as an animation
(GIF) and the arrays (NPZ); `compare` draws the same request through several sampler settings.
"""

from __future__ import annotations

import math
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ddpmkit import viz
from ddpmkit.core.samplers import Step, Trajectory
from ddpmkit.fileio import atomic_write
from ddpmkit.run.sampling import generate, npz_bytes
from ddpmkit.serve.requests import Request
from ddpmkit.serve.runs import ServedRun
from ddpmkit.serve.settings import DEFAULT_LIMITS, Limits

KEEP_DOWNLOADS = 32  # the newest requests whose files stay on disk for the page to fetch
SHOWN_PIXELS = 96  # images are scaled up by whole factors to about this size (28x28: x3; 64x64: x1)


@dataclass
class Frame:
    """The picture of the reverse process at the (0-based) step `i`, which leaves step t."""

    picture: Image.Image
    i: int
    t: int


@dataclass
class Result:
    request: Request
    images: torch.Tensor  # [N, C, H, W] in [-1, 1]
    grid: Image.Image
    seconds: float  # wall time of the sampling
    nfe: int  # network evaluations (a guided step batches its two branches into one)
    trajectory: Trajectory  # the streamed steps, for the GIF


class _Stopped(Exception):
    """Raised in the sampler by its callback when the request's reader has gone."""


def frame_every(steps: int, limits: Limits) -> int:
    """Keep every K-th step (and the last) so that a request streams about limits.max_frames pictures."""
    return max(1, math.ceil(steps / limits.max_frames))


def stream(run: ServedRun, request: Request, limits: Limits = DEFAULT_LIMITS) -> Iterator[Frame | Result]:
    """Frames while the sampler runs (the newest one when the reader falls behind, and always the
    last step), then the Result. Closing the iterator early (the browser went away) stops the sampler
    at its next step."""
    every, last = frame_every(request.settings.steps, limits), request.settings.steps - 1
    kept, kept_i = Trajectory(), []  # the kept steps (for the GIF) and their indices
    news: queue.Queue = queue.Queue()  # ("step", index into kept) ..., then ("done", Result) or ("error", e)
    stop = threading.Event()

    def on_step(step: Step) -> None:
        if stop.is_set():
            raise _Stopped
        if step.i % every == 0 or step.i == last:
            kept.t.append(step.t)
            kept.x_t.append(step.x_t.detach().float().cpu().clone())
            kept.x0_hat.append(step.x0_hat.detach().float().cpu().clone())
            kept_i.append(step.i)
            news.put(("step", len(kept.t) - 1))

    def work() -> None:
        try:
            news.put(("done", draw(run, request, on_step, kept)))
        except _Stopped:
            pass
        except Exception as e:  # handed to the reader, which raises it in the request's thread
            news.put(("error", e))

    def frame(k: int) -> Frame:
        return Frame(_step_picture(run, request, kept, k), kept_i[k], kept.t[k])

    threading.Thread(target=work, name=f"ddpmkit-sample-{run.name}", daemon=True).start()
    shown = -1
    try:
        while True:
            kind, value = _newest(news)
            if kind == "error":
                raise value
            if kind == "done":
                if shown < len(kept.t) - 1:  # the last step, which a reader behind has skipped
                    yield frame(len(kept.t) - 1)
                yield value
                return
            shown = value
            yield frame(value)
    finally:
        stop.set()


def _newest(news: queue.Queue) -> tuple:
    """The next message, skipping steps that a newer step or the end already replaces."""
    message = news.get()
    while message[0] == "step":
        try:
            message = news.get_nowait()
        except queue.Empty:
            break
    return message


def _step_picture(run: ServedRun, request: Request, kept: Trajectory, k: int) -> Image.Image:
    return viz.step_picture(
        kept.x_t[k],
        kept.x0_hat[k],
        kept.t[k],
        labels=request.labels,
        class_names=run.config.class_names,
        scale=scale(run),
    )


def scale(run: ServedRun) -> int:
    return max(1, SHOWN_PIXELS // run.config.image_size)


def draw(run: ServedRun, request: Request, callback=None, trajectory: Trajectory | None = None) -> Result:
    """Sample the request in the calling thread: the images, their grid, wall time and NFE."""
    run.counter.reset()
    started = time.perf_counter()
    images = generate(
        run.denoiser,
        request.n,
        run.shape,
        labels=request.labels,
        settings=request.settings,
        seed=request.seed,
        batch_size=request.n,  # one batch: the callback sees every image at every step
        device=run.device,
        callback=callback,
    )
    seconds, nfe = time.perf_counter() - started, run.counter.calls
    grid = viz.grid_image(images, request.labels, run.config.class_names, scale=scale(run))
    return Result(request, images, grid, seconds, nfe, trajectory or Trajectory())


def describe(result: Result) -> str:
    """One line: how many images, how long, how many network evaluations, with which settings."""
    s, r = result.request.settings, result.request
    guidance = f", guidance {s.guidance:g}" if r.labels is not None else ""
    return (
        f"{r.n} image{'s' if r.n > 1 else ''} in {result.seconds:.2f} s, {result.nfe} network evaluations "
        f"({s.sampler}, {s.steps} steps, {s.spacing} spacing{guidance}, seed {r.seed})"
    )


def compare(run: ServedRun, requests: list[Request]) -> Iterator[list[Result]]:
    """The results so far, after each request: the same seed and labels through each setting."""
    results = []
    for request in requests:
        results.append(draw(run, request))
        yield list(results)


# ---- downloads --------------------------------------------------------------------------------


def downloads(run: ServedRun, result: Result, root: Path) -> tuple[Path, Path, Path]:
    """The grid (PNG), the streamed steps and the sample (GIF) and the arrays (NPZ) in a new
    directory under `root`; the directories of older requests beyond KEEP_DOWNLOADS are removed."""
    root.mkdir(parents=True, exist_ok=True)
    prune(root, KEEP_DOWNLOADS - 1)
    directory = Path(tempfile.mkdtemp(prefix=f"{time.time_ns():020d}-", dir=root))
    s, r = result.request.settings, result.request
    stem = _safe(f"{run.name}-{s.sampler}-{s.steps}-steps-seed-{r.seed}")
    png, gif, npz = (directory / f"{stem}.{ext}" for ext in ("png", "gif", "npz"))
    viz.save_png(result.grid, png)
    frames = viz.denoising_frames(
        result.trajectory, result.images, "both", labels=r.labels, class_names=run.config.class_names, scale=scale(run)
    )
    viz.save_gif(frames, gif)
    atomic_write(npz, npz_bytes(result.images, r.labels))
    return png, gif, npz


def prune(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` request directories under root (their names start with the time)."""
    directories = sorted(p for p in root.iterdir() if p.is_dir())
    for old in directories[: max(0, len(directories) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def _safe(name: str) -> str:
    """A file name of letters, digits, dots, dashes and underscores."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "ddpmkit"
