"""Noise schedules and timestep spacings.

A `Schedule` holds the tensors of the forward process indexed by the paper's t, so that
`alpha_bar[t]` is the paper's alpha_bar_t for t = 1..T and index 0 is the clean data
(beta_0 = 0, alpha_bar_0 = 1). Samplers can therefore always step "to s = 0" and land on x0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddpmkit.errors import DdpmkitError

MAX_BETA = 0.999  # Nichol & Dhariwal clip beta_t at 0.999 to avoid a singularity at t = T
# The most L_T (bits/dim) a schedule may leave: x_T ~ q(x_T | x0) must be N(0, I), where samplers start,
# up to a trace. For x0 in [-1, 1], L_T = KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) per dimension is at
# most -log2(1 - abar_T) / 2 bits, so this bound means abar_T < 1.39e-3 (sqrt(abar_T) < 0.037: x_T's mean
# moves by under 4% of the noise's std) and an L_T 40x below the standard error of a bits/dim estimate
# on 1,000 images. cosine passes at every T (the clip leaves abar_T <= 1e-3), linear from T = 2 (~4e-5 from 10).
MAX_PRIOR_BPD = 1e-3


@dataclass(frozen=True)
class Schedule:
    """Tensors of length T + 1 (float64), index t = 0..T, built from beta_1..beta_T."""

    beta: torch.Tensor
    alpha: torch.Tensor
    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor
    beta_tilde: torch.Tensor
    name: str = "custom"

    @property
    def T(self) -> int:
        return self.beta.shape[0] - 1

    @staticmethod
    def from_betas(beta_1_to_T: torch.Tensor, name: str = "custom") -> Schedule:
        beta = torch.cat([torch.zeros(1, dtype=torch.float64), beta_1_to_T.double()])
        alpha = 1.0 - beta  # alpha_t = 1 - beta_t
        alpha_bar = torch.cumprod(alpha, 0)  # alpha_bar_t = prod_{s<=t} alpha_s
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        # beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t   (DDPM eq. 7)
        beta_tilde = torch.zeros_like(beta)
        beta_tilde[1:] = (1 - alpha_bar_prev[1:]) / (1 - alpha_bar[1:]) * beta[1:]
        return Schedule(beta, alpha, alpha_bar, alpha_bar_prev, beta_tilde, name)

    def at(self, name: str, t: torch.Tensor, ndim: int = 4, dtype=torch.float32) -> torch.Tensor:
        """Gather tensor `name` at integer steps t [B] and reshape to [B, 1, ..., 1] for broadcasting."""
        values = getattr(self, name).to(t.device)[t.long()]
        return values.to(dtype).reshape(-1, *([1] * (ndim - 1)))


def linear(T: int) -> Schedule:
    """Ho et al. 2020: beta_t linear from 1e-4 to 0.02 over T = 1000 steps.

    For other T both ends are scaled by 1000 / T (improved-diffusion's rule), so that sum_t beta_t and
    with it alpha_bar_T ~ exp(-sum beta_t) ~ 4e-5 stay what they are at T = 1000; beta_t is clipped
    at MAX_BETA, which only the first steps of a tiny T reach.
    """
    _check_T(T)
    scale = 1000 / T
    beta = torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64).clamp(max=MAX_BETA)
    return check_prior(Schedule.from_betas(beta, "linear"))


def cosine(T: int, s: float = 0.008) -> Schedule:
    """Nichol & Dhariwal 2021: alpha_bar_t = f(t) / f(0), f(t) = cos^2(pi/2 (t/T + s) / (1 + s))."""
    _check_T(T)
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    beta = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=MAX_BETA)  # beta_t = 1 - abar_t/abar_{t-1}
    return check_prior(Schedule.from_betas(beta, "cosine"))


SCHEDULES = {"linear": linear, "cosine": cosine}


def build_schedule(name: str, T: int) -> Schedule:
    if name not in SCHEDULES:
        raise DdpmkitError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](T)


def prior_bpd_bound(schedule: Schedule) -> float:
    """The largest L_T for data in [-1, 1], bits per dimension: -log2(1 - alpha_bar_T) / 2."""
    return -math.log2(1 - float(schedule.alpha_bar[-1])) / 2


def check_prior(schedule: Schedule) -> Schedule:
    """The schedule, if x_T is N(0, I) up to MAX_PRIOR_BPD; else one line saying what is wrong."""
    abar_T = float(schedule.alpha_bar[-1])
    if prior_bpd_bound(schedule) > MAX_PRIOR_BPD:
        raise DdpmkitError(
            f"the {schedule.name} schedule with T = {schedule.T} keeps alpha_bar_T = {abar_T:.3g} of the image "
            f"(sqrt = {math.sqrt(abar_T):.3g}) in x_T, but sampling starts from pure noise; "
            "use a larger T (--timesteps)"
        )
    return schedule


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 1:
        raise DdpmkitError(f"the number of diffusion steps T must be a positive integer, got {T!r}")


# ---- timestep spacings: which of 1..T a sampler visits, in decreasing order --------------------
# Each spacing is f(T, n, schedule) -> [t_n, ..., t_1]; only those that follow noise levels (karras)
# read the schedule.

KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5: rho = 7 spaces the sigmas for the smallest error
# Karras et al.'s sigma_max. The cosine schedule's clipped last step reaches sigma_T ~ 2e4, where x0_hat
# no longer changes; a rho = 7 schedule from there would put most steps within a few of t = T.
KARRAS_SIGMA_MAX = 80.0


def sigma(schedule: Schedule, t: int) -> float:
    """Karras et al.'s noise level of step t: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t); sigma_0 = 0."""
    alpha_bar = float(schedule.alpha_bar[t])
    return math.sqrt((1 - alpha_bar) / alpha_bar)


def step_at_sigma(schedule: Schedule, values) -> torch.Tensor:
    """The fractional steps t (float64 [k]) whose sigma_t are `values`, by
    linear interpolation in log sigma over t = 1..T (sigma_t increases with t); clamped to [1, T]."""
    abar = schedule.alpha_bar[1:]
    log_sigmas = 0.5 * torch.log((1 - abar) / abar)  # index i holds step t = i + 1
    log_values = torch.log(torch.as_tensor(values, dtype=torch.float64)).reshape(-1)
    i = torch.searchsorted(log_sigmas, log_values).clamp(1, schedule.T - 1)
    lo, hi = log_sigmas[i - 1], log_sigmas[i]  # steps i and i + 1
    return (i + (log_values - lo) / (hi - lo)).clamp(1, schedule.T)


def uniform(T: int, n: int, schedule: Schedule | None = None) -> list[int]:
    """n steps evenly spread over [1, T], both ends included."""
    return _strictly_decreasing([1 + (T - 1) * _fraction(i, n) for i in range(n)], T)


def quadratic(T: int, n: int, schedule: Schedule | None = None) -> list[int]:
    """From T down to 1 with t - 1 proportional to i^2 (i = n - 1 .. 0): denser near t = 1.

    Not quite the DDIM paper's quadratic spacing, which spans 0 .. 0.8 T and so starts its samplers at
    t = 0.8 T; this one starts at T, like the other spacings, where x_T really is N(0, I)."""
    return _strictly_decreasing([1 + (T - 1) * _fraction(i, n) ** 2 for i in range(n)], T)


def trailing(T: int, n: int, schedule: Schedule | None = None) -> list[int]:
    """Lin et al. 2024: start at T, step T/n, so the first step sees pure noise at t = T."""
    return _strictly_decreasing([T - i * T / n for i in range(n)], T)


def karras(T: int, n: int, schedule: Schedule | None = None) -> list[int]:
    """Karras et al. 2022, eq. 5 with rho = 7, from sigma_max = min(sigma_T, 80) down to sigma_min = sigma_1:
    sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho

    Each sigma_i goes to the integer step with (about) the nearest log sigma, pushed apart where they
    collide; the first step is t = T, where x_T ~ N(0, I) is exact, as in every spacing."""
    if schedule is None:
        raise DdpmkitError("the karras spacing follows the noise levels: give the schedule")
    sigma_max = min(sigma(schedule, T), KARRAS_SIGMA_MAX)
    lo, hi = sigma(schedule, 1) ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    sigmas = [(lo + (hi - lo) * _fraction(i, n)) ** KARRAS_RHO for i in range(n)]
    return _strictly_decreasing([T, *step_at_sigma(schedule, sigmas[1:]).tolist()], T)


SPACINGS = {"uniform": uniform, "quadratic": quadratic, "trailing": trailing, "karras": karras}


def check_steps(T: int, n: int, spacing: str) -> None:
    """Refuse an unknown spacing, or a step count that is not in 1..T."""
    if spacing not in SPACINGS:
        raise DdpmkitError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if not isinstance(n, int) or n < 1:
        raise DdpmkitError(f"the number of sampling steps must be a positive integer, got {n!r}")
    if n > T:
        raise DdpmkitError(f"cannot sample with {n} steps: the model has only T = {T} diffusion steps")


def timesteps(T: int, n: int, spacing: str = "uniform", schedule: Schedule | None = None) -> list[int]:
    """The decreasing steps t_n > ... > t_1 (>= 1) a sampler visits; it then steps to t = 0.

    `schedule` (with T steps) is needed by the spacings that follow noise levels (karras)."""
    check_steps(T, n, spacing)
    if schedule is not None and schedule.T != T:
        raise DdpmkitError(f"the schedule has T = {schedule.T} steps, not {T}")
    return SPACINGS[spacing](T, n, schedule)


def _fraction(i: int, n: int) -> float:
    """Position of step i of n on [0, 1], from 1 (first step, t = T) down to 0 (last, t = 1)."""
    return (n - 1 - i) / (n - 1) if n > 1 else 1.0


def _strictly_decreasing(values: list[float], T: int) -> list[int]:
    """Round to integers, keep position i within [n - i, T - i] and push collisions apart."""
    n = len(values)
    steps = [min(T - i, max(n - i, round(v))) for i, v in enumerate(values)]
    for i in range(1, n):
        steps[i] = min(steps[i], steps[i - 1] - 1)
    return steps
