"""The forward process for learners: a dataset image x0 and its noised x_t ~ q(x_t | x0) at one t,
with alpha_bar_t, the signal-to-noise ratio and the equation, numbers filled in."""

from __future__ import annotations

import math

import torch
from PIL import Image

from ddpmkit import viz
from ddpmkit.core.diffusion import snr
from ddpmkit.errors import DdpmkitError
from ddpmkit.serve.requests import integer
from ddpmkit.serve.runs import ServedRun

SHOWN_PIXELS = 168  # each picture is scaled up to about this width


def forward_view(run: ServedRun, example, t) -> tuple[Image.Image, str]:
    """(x0 beside x_t, the text) for the example image named `example` at step t in 0..T.

    Each example keeps one eps for every t, so moving t shows the same noise growing.
    """
    if run.examples is None:
        raise DdpmkitError(run.examples_problem or "this run has no dataset images to show")
    if example not in run.examples.names:
        raise DdpmkitError(f"unknown image {example!r}; choose one of the list")
    k, t = run.examples.names.index(example), integer(t, "t")
    if not 0 <= t <= run.T:
        raise DdpmkitError(f"t must be 0 to T = {run.T}, got {t}")
    picture = viz.forward_figure(
        run.denoiser.schedule,
        run.examples.images[k : k + 1],
        [0, t] if t > 0 else [0],
        generator=torch.Generator().manual_seed(k),
        scale=max(1, SHOWN_PIXELS // run.config.image_size),
    )
    return picture, forward_text(run, t)


def forward_text(run: ServedRun, t: int) -> str:
    """alpha_bar_t, SNR(t) and x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps at t (Markdown, LaTeX)."""
    schedule = run.denoiser.schedule
    alpha_bar = float(schedule.alpha_bar[t])
    ratio = float(snr(schedule, torch.tensor([t]))[0]) if t > 0 else math.inf
    db = f"{10 * math.log10(ratio):.1f}" if 0 < ratio < math.inf else ("\\infty" if ratio > 0 else "-\\infty")
    ratio_text = f"{ratio:.4g}" if ratio < math.inf else "\\infty"
    return "\n\n".join(
        [
            f"**t = {t}** of T = {run.T} ({schedule.name} schedule)",
            "$$\\bar\\alpha_t = \\prod_{s=1}^{t} (1 - \\beta_s) = " + f"{alpha_bar:.4g}$$",
            "$$\\mathrm{SNR}(t) = \\frac{\\bar\\alpha_t}{1 - \\bar\\alpha_t} = "
            + f"{ratio_text} \\;\\; ({db}\\ \\mathrm{{dB}})$$",
            "$$x_t = \\sqrt{\\bar\\alpha_t}\\, x_0 + \\sqrt{1 - \\bar\\alpha_t}\\, \\epsilon = "
            + f"{math.sqrt(alpha_bar):.3f}\\, x_0 + {math.sqrt(1 - alpha_bar):.3f}\\, \\epsilon, "
            + "\\quad \\epsilon \\sim \\mathcal{N}(0, I)$$",
        ]
    )
