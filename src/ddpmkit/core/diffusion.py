"""The forward process q, its posterior and the three parameterisations (eps, x0, v).

Every function takes per-example steps t (long tensor [B], the paper's t in 1..T) and a
`Schedule`; coefficients are gathered at t and broadcast over the image dimensions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ddpmkit.core.schedules import Schedule
from ddpmkit.errors import DdpmkitError

OBJECTIVES = ("eps", "x0", "v")


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps  ~ q(x_t | x0)   (DDPM eq. 4)."""
    alpha_bar = schedule.at("alpha_bar", t, x0.ndim, x0.dtype)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps


class Posterior(NamedTuple):
    mean: torch.Tensor
    variance: torch.Tensor


def q_posterior(schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s=None) -> Posterior:
    """q(x_s | x_t, x0) for s < t (s = t - 1 by default): DDPM eq. 6-7 for any pair of steps.

    With alpha_{t|s} = alpha_bar_t / alpha_bar_s and beta_{t|s} = 1 - alpha_{t|s}:
    mean = sqrt(alpha_bar_s) beta_{t|s} / (1 - alpha_bar_t) x0
           + sqrt(alpha_{t|s}) (1 - alpha_bar_s) / (1 - alpha_bar_t) x_t
    variance = (1 - alpha_bar_s) / (1 - alpha_bar_t) beta_{t|s}
    """
    s = t - 1 if s is None else s
    ndim, dtype = x0.ndim, x0.dtype
    alpha_bar_t = schedule.at("alpha_bar", t, ndim, dtype)
    alpha_bar_s = schedule.at("alpha_bar", s, ndim, dtype)
    alpha_ts = alpha_bar_t / alpha_bar_s
    beta_ts = 1 - alpha_ts
    mean = (alpha_bar_s.sqrt() * beta_ts * x0 + alpha_ts.sqrt() * (1 - alpha_bar_s) * x_t) / (1 - alpha_bar_t)
    variance = (1 - alpha_bar_s) / (1 - alpha_bar_t) * beta_ts
    return Posterior(mean, variance)


# ---- eps <-> x0 <-> v, given x_t (all exact; Salimans & Ho 2022 for v) -------------------------


def _coefs(schedule, t, like):
    alpha_bar = schedule.at("alpha_bar", t, like.ndim, like.dtype)
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def x0_from_eps(schedule, x_t, t, eps):
    a, b = _coefs(schedule, t, x_t)
    return (x_t - b * eps) / a  # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)


def eps_from_x0(schedule, x_t, t, x0):
    a, b = _coefs(schedule, t, x_t)
    return (x_t - a * x0) / b  # eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)


def v_from(schedule, t, x0, eps):
    a, b = _coefs(schedule, t, x0)
    return a * eps - b * x0  # v = sqrt(abar) eps - sqrt(1 - abar) x0


def x0_from_v(schedule, x_t, t, v):
    a, b = _coefs(schedule, t, x_t)
    return a * x_t - b * v  # x0 = sqrt(abar) x_t - sqrt(1 - abar) v


def eps_from_v(schedule, x_t, t, v):
    a, b = _coefs(schedule, t, x_t)
    return b * x_t + a * v  # eps = sqrt(1 - abar) x_t + sqrt(abar) v


def target(objective: str, schedule: Schedule, x0, t, eps) -> torch.Tensor:
    """What the network is trained to output under each objective."""
    if objective == "eps":
        return eps
    if objective == "x0":
        return x0
    if objective == "v":
        return v_from(schedule, t, x0, eps)
    raise DdpmkitError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def to_x0_eps(objective: str, schedule: Schedule, x_t, t, out) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the network's output under `objective` into (x0_hat, eps_hat)."""
    if objective == "eps":
        return x0_from_eps(schedule, x_t, t, out), out
    if objective == "x0":
        return out, eps_from_x0(schedule, x_t, t, out)
    if objective == "v":
        return x0_from_v(schedule, x_t, t, out), eps_from_v(schedule, x_t, t, out)
    raise DdpmkitError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def snr(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), per example [B]."""
    alpha_bar = schedule.alpha_bar.to(t.device)[t]
    return (alpha_bar / (1 - alpha_bar)).float()
