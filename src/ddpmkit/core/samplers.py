"""Samplers: plain functions that run the reverse process with a Denoiser.

Every sampler has one signature:

    sampler(denoiser, x_T, timesteps, *, y=None, guidance=1.0, generator=None, callback=None) -> x0

`timesteps` is the decreasing list t_n > ... > t_1 >= 1 from `schedules.timesteps`; each sampler
steps t -> s through consecutive entries and finally to s = 0, where alpha_bar_0 = 1 and the
sample is the clean image. `callback(Step(...))` is called once per step (animation, progress,
tests). Randomness comes only from `generator`, so a seed fixes the result.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from ddpmkit.core.denoiser import Denoiser
from ddpmkit.errors import DdpmkitError


class Step(NamedTuple):
    i: int  # 0-based index of the step
    t: int  # the step being left
    x_t: torch.Tensor  # the iterate at t
    x0_hat: torch.Tensor  # the denoiser's estimate of x0 from x_t


class Trajectory:
    """A callback that records every step: `traj.x_t[i]`, `traj.x0_hat[i]`, `traj.t[i]` (on CPU)."""

    def __init__(self):
        self.t, self.x_t, self.x0_hat = [], [], []

    def __call__(self, step: Step) -> None:
        self.t.append(step.t)
        self.x_t.append(step.x_t.detach().cpu())
        self.x0_hat.append(step.x0_hat.detach().cpu())


def _pairs(timesteps):
    """(i, t, s): consecutive steps t -> s, ending with s = 0."""
    steps = list(timesteps) + [0]
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise DdpmkitError(f"timesteps must be strictly decreasing positive integers, got {list(timesteps)}")
    return [(i, steps[i], steps[i + 1]) for i in range(len(steps) - 1)]


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class _Runner:
    """Calls the denoiser with self-conditioning on the previous x0_hat, and reports each step."""

    def __init__(self, denoiser, y, guidance, callback):
        self.denoiser, self.y, self.guidance, self.callback = denoiser, y, guidance, callback
        self.x0_prev = None

    def __call__(self, i, t, x_t):
        pred = self.denoiser(x_t, t, self.y, self.guidance, x_self_cond=self.x0_prev)
        self.x0_prev = pred.x0
        if self.callback is not None:
            self.callback(Step(i, t, x_t, pred.x0))
        return pred


def _abar(denoiser: Denoiser, t: int) -> float:
    return float(denoiser.schedule.alpha_bar[t])


@torch.inference_mode()
def ddim(
    denoiser: Denoiser, x_T, timesteps, *, y=None, guidance=1.0, generator=None, callback=None, eta: float = 0.0
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12); eta = 0 deterministic, eta = 1 matches DDPM's posterior noise.

    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)
    """
    if not 0.0 <= eta <= 1.0:
        raise DdpmkitError(f"eta must be in [0, 1], got {eta}")
    run, x = _Runner(denoiser, y, guidance, callback), x_T
    for i, t, s in _pairs(timesteps):
        pred = run(i, t, x)
        a_t, a_s = _abar(denoiser, t), _abar(denoiser, s)
        sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
        x = math.sqrt(a_s) * pred.x0 + math.sqrt(max(1 - a_s - sigma**2, 0.0)) * pred.eps
        if sigma > 0:
            x = x + sigma * _noise(x, generator)
    return x


@torch.inference_mode()
def ddpm(
    denoiser: Denoiser,
    x_T,
    timesteps,
    *,
    y=None,
    guidance=1.0,
    generator=None,
    callback=None,
    variance: str = "beta_tilde",
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) on any subsequence of steps.

    x_s = mu_tilde(x_t, x0_hat) + sigma z, with sigma^2 = beta_{t|s} ("beta", the upper bound),
    beta_tilde_{t|s} ("beta_tilde", the posterior variance), or the learned interpolation of
    their logs when the model was trained with learned variances. No noise is added at s = 0.
    """
    if variance not in ("beta", "beta_tilde"):
        raise DdpmkitError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
    run, x = _Runner(denoiser, y, guidance, callback), x_T
    for i, t, s in _pairs(timesteps):
        pred = run(i, t, x)
        a_t, a_s = _abar(denoiser, t), _abar(denoiser, s)
        beta_ts = 1 - a_t / a_s  # beta_{t|s} = 1 - abar_t / abar_s
        beta_tilde_ts = (1 - a_s) / (1 - a_t) * beta_ts
        # mu_tilde = sqrt(abar_s) beta_ts / (1 - abar_t) x0 + sqrt(alpha_ts) (1 - abar_s) / (1 - abar_t) x_t
        x = (math.sqrt(a_s) * beta_ts * pred.x0 + math.sqrt(a_t / a_s) * (1 - a_s) * x) / (1 - a_t)
        if s > 0:
            x = x + _ddpm_sigma(pred, beta_ts, beta_tilde_ts, variance) * _noise(x, generator)
    return x


def _ddpm_sigma(pred, beta_ts: float, beta_tilde_ts: float, variance: str):
    if pred.var_frac is not None:  # Nichol & Dhariwal eq. 15: log var = v log beta + (1 - v) log beta_tilde
        log_var = pred.var_frac * math.log(beta_ts) + (1 - pred.var_frac) * math.log(beta_tilde_ts)
        return (0.5 * log_var).exp()
    return math.sqrt(beta_ts if variance == "beta" else beta_tilde_ts)


@torch.inference_mode()
def dpm_solver_pp_2m(
    denoiser: Denoiser, x_T, timesteps, *, y=None, guidance=1.0, generator=None, callback=None
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep, second order, data prediction.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma), h = lambda_s - lambda_t:
    x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D,
    D = x0_hat on the first step and on the last step before t = 0 (where h is largest and the
    extrapolation would overshoot; "lower order final" in the paper's code),
    else D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev, r = h_prev / h.
    """
    run, x = _Runner(denoiser, y, guidance, callback), x_T
    x0_prev, h_prev, last = None, None, timesteps[-1]
    for i, t, s in _pairs(timesteps):
        pred = run(i, t, x)
        if s == 0:  # sigma_0 = 0, lambda_0 = inf: the update reduces to x_0 = x0_hat
            return pred.x0
        a_t, a_s = _abar(denoiser, t), _abar(denoiser, s)
        lam_t, lam_s = 0.5 * math.log(a_t / (1 - a_t)), 0.5 * math.log(a_s / (1 - a_s))
        h = lam_s - lam_t
        D = pred.x0
        if x0_prev is not None and s != last:
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * pred.x0 - (1 / (2 * r)) * x0_prev
        x = math.sqrt((1 - a_s) / (1 - a_t)) * x - math.sqrt(a_s) * math.expm1(-h) * D
        x0_prev, h_prev = pred.x0, h
    return x


SAMPLERS: dict[str, Callable] = {"ddpm": ddpm, "ddim": ddim, "dpm++": dpm_solver_pp_2m}


COMMON_OPTIONS = ("y", "guidance", "generator", "callback")  # every sampler's keyword arguments


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise DdpmkitError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_options(name: str) -> list[str]:
    """The keyword options of sampler `name` beyond the common signature (e.g. ["eta"] for ddim)."""
    parameters = inspect.signature(get_sampler(name)).parameters.values()
    return [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in COMMON_OPTIONS]
