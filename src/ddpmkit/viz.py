"""Pictures: sample grids, the reverse process as a GIF, the forward process, the noise schedules
and loss curves.

Images arrive as float tensors in [-1, 1], [N, C, H, W]; every file is written atomically. Plots use
matplotlib's object-oriented Figure (no pyplot, so no global backend is chosen for the caller).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from ddpmkit.core import diffusion
from ddpmkit.core.pixels import to_uint8
from ddpmkit.core.schedules import SCHEDULES, Schedule, build_schedule
from ddpmkit.errors import DdpmkitError
from ddpmkit.fileio import atomic_write

CAPTION_H = 12
HEADER_H = 2 * CAPTION_H + 2  # the white strip above a figure: two lines of column titles


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    """One [C, H, W] image in [-1, 1] -> a PIL image (L or RGB), optionally upscaled."""
    array = to_uint8(image).permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def grid_image(
    images: torch.Tensor,
    labels=None,
    class_names: Sequence[str] = (),
    ncol: int | None = None,
    scale: int = 2,
    pad: int = 2,
) -> Image.Image:
    """Tile images into a grid; when labels are given, each row whose labels agree gets a caption."""
    n = images.shape[0]
    if ncol is None:
        ncol = _row_length(labels) if labels is not None else math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    tiles = [to_pil(img, scale) for img in images]
    w, h = tiles[0].size
    label_w = caption_width(labels, class_names) if labels is not None else 0
    mode = "L" if tiles[0].mode == "L" else "RGB"
    canvas = white(mode, (label_w + ncol * (w + pad) + pad, nrow * (h + pad) + pad))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncol)
        canvas.paste(tile, (label_w + pad + c * (w + pad), pad + r * (h + pad)))
        if labels is not None and c == 0:
            draw.text((2, pad + r * (h + pad) + h // 2 - 5), caption(int(labels[i]), class_names), fill=0, font=font)
    return canvas


def white(mode: str, size: tuple[int, int]) -> Image.Image:
    """A blank white canvas, grayscale ("L") or RGB."""
    return Image.new(mode, size, 255 if mode == "L" else (255, 255, 255))


def caption(label: int, class_names: Sequence[str]) -> str:
    if label < 0:
        return ""
    if label >= len(class_names) or class_names[label] == str(label):
        return str(label)
    return f"{label} {class_names[label]}"


def _row_length(labels) -> int:
    """Images per row: the length of the first run of equal labels (one class per row)."""
    labels = [int(v) for v in labels]
    run = 1
    while run < len(labels) and labels[run] == labels[0]:
        run += 1
    return run if run < len(labels) else math.ceil(math.sqrt(len(labels)))


def caption_width(labels, class_names) -> int:
    longest = max((len(caption(int(v), class_names)) for v in labels), default=0)
    return 6 * longest + 6 if longest else 0


def save_png(image: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    atomic_write(Path(path), buf.getvalue())


def save_grid(images: torch.Tensor, path: Path, labels=None, class_names: Sequence[str] = (), **kwargs) -> None:
    save_png(grid_image(images, labels, class_names, **kwargs), path)


def loss_curve(metrics: list[dict], path: Path) -> None:
    """The training loss (log scale) against the step, with a moving average over the raw values."""
    if metrics:
        _save_figure(loss_figure(metrics), path)


def loss_figure(metrics: list[dict]) -> Figure:
    """The figure of `loss_curve`: logged losses and their moving average against the step."""
    steps = [m["step"] for m in metrics]
    losses = [m["loss"] for m in metrics]
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, losses, lw=1, alpha=0.4, label="logged loss")
    window = len(losses) // 20
    if window >= 2:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.8, label=f"moving average of {window} logs")
        ax.legend(frameon=False)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return fig


def schedule_plot(path: Path, T: int = 1000) -> None:
    """alpha_bar_t and log SNR(t) of every registered schedule (linear vs cosine) for t = 1..T."""
    fig = Figure(figsize=(9, 3.4), dpi=100)
    ax_abar, ax_snr = fig.subplots(1, 2)
    for name in SCHEDULES:
        alpha_bar = build_schedule(name, T).alpha_bar[1:].numpy()
        t = np.arange(1, T + 1)
        ax_abar.plot(t, alpha_bar, label=name)
        ax_snr.plot(t, np.log(alpha_bar / (1 - alpha_bar)), label=name)  # SNR = abar / (1 - abar)
    ax_abar.set_ylabel(r"$\bar\alpha_t$ (signal kept)")
    ax_snr.set_ylabel(r"$\log\,\mathrm{SNR}(t) = \log \frac{\bar\alpha_t}{1 - \bar\alpha_t}$")
    for ax in (ax_abar, ax_snr):
        ax.set_xlabel(f"t  (T = {T})")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    _save_figure(fig, path)


def _save_figure(fig: Figure, path: Path) -> None:
    atomic_write(Path(path), figure_png(fig))


def figure_png(fig: Figure) -> bytes:
    """A matplotlib figure as PNG bytes."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def montage(paths: Sequence[Path], out: Path, titles: Sequence[str] = (), gap: int = 8) -> None:
    """Pictures side by side on white, each under its title: comparison figures for the docs."""
    if titles and len(titles) != len(paths):
        raise DdpmkitError(f"give one title per picture: {len(paths)} pictures, {len(titles)} titles")
    images = [Image.open(path) for path in paths]
    mode = "L" if all(image.mode == "L" for image in images) else "RGB"
    panels = [
        _with_header(image.convert(mode), CAPTION_H + 2 if titles else 0, [(2, 1, titles[k])] if titles else [])
        for k, image in enumerate(images)
    ]
    width = sum(panel.width for panel in panels) + gap * (len(panels) - 1)
    canvas = white(mode, (width, max(panel.height for panel in panels)))
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + gap
    save_png(canvas, out)


# ---- the forward process: q(x_t | x0) at increasing t ------------------------------------------


def forward_process(
    schedule: Schedule, x0: torch.Tensor, steps: Sequence[int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """x_t ~ q(x_t | x0) for every image and every t in `steps`: [N, len(steps), C, H, W].

    Each image keeps one eps for all t, so a row shows the same noise growing as alpha_bar_t falls.
    """
    check_steps(steps, schedule.T)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    columns = [diffusion.q_sample(schedule, x0, torch.full((len(x0),), t), eps) for t in steps]
    return torch.stack(columns, dim=1)


def check_steps(steps: Sequence[int], T: int) -> None:
    if not steps:
        raise DdpmkitError("give at least one step t to show")
    bad = [t for t in steps if not 0 <= t <= T]
    if bad:
        raise DdpmkitError(f"step t = {bad[0]} is outside 0..T = {T}; lower it or raise --timesteps")


def forward_steps(T: int, num: int | None = None) -> list[int]:
    """num steps evenly spaced over 0..T, or by default 0, .05T, .1T, .25T, .5T, .75T and T."""
    if num is None:
        return sorted({round(f * T) for f in (0, 0.05, 0.1, 0.25, 0.5, 0.75, 1)})
    if num < 2:
        raise DdpmkitError(f"--num must be >= 2 (t = 0 and t = T at least), got {num}")
    return sorted({round(i * T / (num - 1)) for i in range(num)})


def one_per_class(labels: torch.Tensor, n: int) -> list[int]:
    """Indices of up to n examples taking the classes in turn (one per class first); unlabelled: the first n."""
    classes = sorted(set(labels[labels >= 0].tolist()))
    if not classes:
        return list(range(min(n, len(labels))))
    members = {c: (labels == c).nonzero().flatten().tolist() for c in classes}
    picks = [(classes[k % len(classes)], k // len(classes)) for k in range(n)]
    return [members[c][j] for c, j in picks if j < len(members[c])]


def forward_figure(
    schedule: Schedule,
    x0: torch.Tensor,
    steps: Sequence[int],
    *,
    labels=None,
    class_names: Sequence[str] = (),
    generator: torch.Generator | None = None,
    scale: int = 2,
    pad: int = 2,
) -> Image.Image:
    """One row per image, one column per t, each column titled with t and alpha_bar_t."""
    x_t = forward_process(schedule, x0, steps, generator)
    row_labels = None if labels is None else torch.as_tensor(labels).repeat_interleave(len(steps))
    grid = grid_image(x_t.flatten(0, 1), row_labels, class_names, ncol=len(steps), scale=scale, pad=pad)
    left = caption_width(row_labels, class_names) if labels is not None else 0
    tile_w = x0.shape[-1] * scale
    titles = []
    for c, t in enumerate(steps):
        x = left + pad + c * (tile_w + pad)
        abar = float(schedule.alpha_bar[t])
        titles += [(x, 1, f"t={t}"), (x, CAPTION_H + 1, f"abar={abar:.2f}" if abar >= 0.01 else f"abar={abar:.0e}")]
    return _with_header(grid, HEADER_H, titles)


def _with_header(image: Image.Image, height: int, texts: Sequence[tuple]) -> Image.Image:
    """`image` below a white strip of `height` pixels holding the (x, y, text) titles, widened to fit them."""
    font = ImageFont.load_default()
    width = max([image.width] + [math.ceil(x + font.getlength(text)) + 2 for x, _, text in texts])
    canvas = white(image.mode, (width, image.height + height))
    canvas.paste(image, (0, height))
    draw = ImageDraw.Draw(canvas)
    for x, y, text in texts:
        draw.text((x, y), text, fill=0, font=font)
    return canvas


# ---- the reverse process as an animated GIF ----------------------------------------------------

FRAMES = ("x_t", "x0_hat", "both")


def keep_every(n: int, every: int) -> list[int]:
    """Indices 0, K, 2K, ... of n frames, always ending with the last one (n - 1)."""
    if every < 1:
        raise DdpmkitError(f"--every must be >= 1, got {every}")
    kept = list(range(0, n, every))
    return kept if kept[-1] == n - 1 else kept + [n - 1]


def denoising_frames(
    trajectory,
    x0: torch.Tensor,
    frames: str = "x_t",
    every: int = 1,
    *,
    labels=None,
    class_names: Sequence[str] = (),
    scale: int = 2,
) -> list[Image.Image]:
    """Pictures of a recorded reverse process (samplers.Trajectory): t_n, ..., t_1, then x0 at t = 0.

    frames: "x_t" (the iterate), "x0_hat" (the denoiser's guess of the clean image) or "both",
    side by side; `every` keeps every K-th picture, always the first and the last.
    """
    if frames not in FRAMES:
        raise DdpmkitError(f"--frames must be one of {', '.join(FRAMES)}, got {frames!r}")
    ts = list(trajectory.t) + [0]
    series = {"x_t": list(trajectory.x_t) + [x0], "x0_hat": list(trajectory.x0_hat) + [x0]}
    shown = ("x_t", "x0_hat") if frames == "both" else (frames,)
    panels = [
        [_titled_grid(series[name][k], name, ts[k], labels, class_names, scale) for name in shown]
        for k in keep_every(len(ts), every)
    ]
    width = max(panel.width for row in panels for panel in row)  # one size for every frame of the GIF
    return [_side_by_side(row, width) for row in panels]


def step_picture(
    x_t: torch.Tensor, x0_hat: torch.Tensor, t: int, *, labels=None, class_names: Sequence[str] = (), scale: int = 2
) -> Image.Image:
    """One step of the reverse process: the iterate x_t beside the denoiser's estimate x0_hat."""
    panels = [_titled_grid(x, name, t, labels, class_names, scale) for name, x in (("x_t", x_t), ("x0_hat", x0_hat))]
    return _side_by_side(panels, max(panel.width for panel in panels))


def _titled_grid(images, name: str, t: int, labels, class_names, scale: int) -> Image.Image:
    grid = grid_image(images, labels, class_names, scale=scale)
    title = "x_0 (the sample)" if t == 0 else f"{name}  (t = {t})"
    left = caption_width(labels, class_names) if labels is not None else 0
    return _with_header(grid, CAPTION_H + 2, [(left + 2, 1, title)])


def _side_by_side(panels: Sequence[Image.Image], width: int) -> Image.Image:
    """The panels left to right, each in a white slot `width` pixels wide."""
    mode = panels[0].mode
    canvas = white(mode, (width * len(panels), panels[0].height))
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * width, 0))
    return canvas


def save_gif(pictures: Sequence[Image.Image], path: Path, fps: float = 10.0, hold_s: float = 2.0) -> None:
    """An animated GIF that loops forever, `fps` pictures a second, the last held `hold_s` seconds."""
    if not fps > 0:
        raise DdpmkitError(f"--fps must be > 0, got {fps}")
    frame_ms = max(20, round(1000 / fps))  # GIF delays are centiseconds; browsers clamp below 20 ms
    durations = [frame_ms] * (len(pictures) - 1) + [max(frame_ms, round(1000 * hold_s))]
    buf = io.BytesIO()
    pictures[0].save(
        buf, format="GIF", save_all=True, append_images=list(pictures[1:]), duration=durations, loop=0, optimize=False
    )
    atomic_write(Path(path), buf.getvalue())
