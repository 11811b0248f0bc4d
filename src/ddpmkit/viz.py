"""Pictures and progress: sample grids with captions, loss curves, progress bars.

Images arrive as float tensors in [-1, 1], [N, C, H, W]; every file is written atomically.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from .fileio import atomic_write
from .data import to_uint8

CAPTION_H = 12


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    """One [C, H, W] image in [-1, 1] -> a PIL image (L or RGB), optionally upscaled."""
    array = to_uint8(image).permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def grid_image(images: torch.Tensor, labels=None, class_names: Sequence[str] = (), ncol: Optional[int] = None,
               scale: int = 2, pad: int = 2) -> Image.Image:
    """Tile images into a grid; when labels are given, each row whose labels agree gets a caption."""
    n = images.shape[0]
    if ncol is None:
        ncol = _row_length(labels) if labels is not None else math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    tiles = [to_pil(img, scale) for img in images]
    w, h = tiles[0].size
    label_w = _caption_width(labels, class_names) if labels is not None else 0
    mode = "L" if tiles[0].mode == "L" else "RGB"
    canvas = Image.new(mode, (label_w + ncol * (w + pad) + pad, nrow * (h + pad) + pad), 255 if mode == "L" else (255,) * 3)
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncol)
        canvas.paste(tile, (label_w + pad + c * (w + pad), pad + r * (h + pad)))
        if labels is not None and c == 0:
            draw.text((2, pad + r * (h + pad) + h // 2 - 5), caption(int(labels[i]), class_names), fill=0, font=font)
    return canvas


def caption(label: int, class_names: Sequence[str]) -> str:
    if label < 0:
        return ""
    return f"{label} {class_names[label]}" if label < len(class_names) else str(label)


def _row_length(labels) -> int:
    """Images per row: the length of the first run of equal labels (one class per row)."""
    labels = [int(v) for v in labels]
    run = 1
    while run < len(labels) and labels[run] == labels[0]:
        run += 1
    return run if run < len(labels) else math.ceil(math.sqrt(len(labels)))


def _caption_width(labels, class_names) -> int:
    longest = max((len(caption(int(v), class_names)) for v in labels), default=0)
    return 6 * longest + 6 if longest else 0


def save_png(image: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    atomic_write(Path(path), buf.getvalue())


def save_grid(images: torch.Tensor, path: Path, labels=None, class_names: Sequence[str] = (), **kwargs) -> None:
    save_png(grid_image(images, labels, class_names, **kwargs), path)


def loss_curve(metrics: list[dict], path: Path) -> None:
    """The training loss (log scale) against the step, written as a PNG."""
    if not metrics:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(Path(path), buf.getvalue())


# ---- progress --------------------------------------------------------------------------------


def maybe_tqdm(iterable, enabled: bool, desc: str):
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True) if enabled else iterable


class progress_bar:
    """A tqdm bar over steps (or minutes) showing loss, images/s and the time left."""

    def __init__(self, step: int, total_steps: Optional[int], minutes: Optional[float], enabled: bool):
        self.enabled, self.minutes, self.t0 = enabled, minutes, time.monotonic()
        self.bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not enabled) if enabled else None

    def update_to(self, step: int, row: dict) -> None:
        if not self.bar:
            return
        self.bar.update(step - self.bar.n)
        post = {"loss": f"{row['loss']:.4f}", "img/s": f"{row['images_per_s']:.0f}"}
        if self.minutes:
            post["left"] = f"{max(0.0, self.minutes - (time.monotonic() - self.t0) / 60):.1f}min"
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
