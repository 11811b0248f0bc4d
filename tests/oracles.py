"""Known-answer fixtures: the exact denoiser of Gaussian data, its ODE solution and output laws."""

from unittest.mock import patch

import torch
from torch import nn

from ddpmkit.core import samplers
from ddpmkit.core.schedules import Schedule


class GaussianEpsNet(nn.Module):
    """For data x0 ~ N(mu, s^2) per pixel, the exact eps-prediction E[eps | x_t] at every t.

    E[x0 | x_t] = mu + sqrt(abar) s^2 / (abar s^2 + 1 - abar) (x_t - sqrt(abar) mu)
    eps = (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar)
    """

    def __init__(self, schedule: Schedule, mu: float, s: float):
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s
        self.calls = 0

    def forward(self, x_t, t, y=None, x_self_cond=None):
        self.calls += 1
        abar = self.schedule.alpha_bar.to(x_t.device)[t.long()].to(x_t.dtype).reshape(-1, 1, 1, 1)
        x0 = self.mu + abar.sqrt() * self.s**2 / (abar * self.s**2 + 1 - abar) * (x_t - abar.sqrt() * self.mu)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def exact_ode_solution(schedule: Schedule, x_T, mu: float, s: float):
    """Where the probability-flow ODE takes x_T for Gaussian data: the standardised value is kept."""
    abar_T = float(schedule.alpha_bar[-1])
    z = (x_T - abar_T**0.5 * mu) / (abar_T * s**2 + 1 - abar_T) ** 0.5
    return mu + s * z


def log_snr_linear(T: int, lam_max: float = 5.0, lam_min: float = -5.0) -> Schedule:
    """A schedule whose lambda_t = log(sqrt(abar_t) / sqrt(1 - abar_t)) falls linearly from lam_max at t = 1
    to lam_min at t = T: every spacing then refines every step in lambda as n grows, which the cosine
    and linear schedules do not near t = 0 (there lambda ~ -log(t) / 2, so the last steps of uniform
    and trailing spacing stay about log(T / n) / 2 and log(2) / 2 long, whatever n)."""
    t = torch.arange(1, T + 1, dtype=torch.float64)
    lam = lam_max - (lam_max - lam_min) * (t - 1) / (T - 1)
    alpha_bar = torch.cat(
        [torch.ones(1, dtype=torch.float64), torch.sigmoid(2 * lam)]
    )  # abar = 1 / (1 + e^{-2 lambda})
    return Schedule.from_betas(1 - alpha_bar[1:] / alpha_bar[:-1], "log-snr-linear")


def marginal(schedule: Schedule, t: int, mu: float, s: float) -> tuple[float, float]:
    """Mean and standard deviation of x_t = sqrt(abar) x0 + sqrt(1 - abar) eps for x0 ~ N(mu, s^2)."""
    abar = float(schedule.alpha_bar[t])
    return abar**0.5 * mu, (abar * s**2 + 1 - abar) ** 0.5


def exact_ode_at(schedule: Schedule, x_T, t: int, mu: float, s: float):
    """Where the probability-flow ODE takes x_T (at step T) by step t: the standardised value is kept."""
    (m_T, sd_T), (m_t, sd_t) = marginal(schedule, schedule.T, mu, s), marginal(schedule, t, mu, s)
    return m_t + sd_t * (x_T - m_T) / sd_T


def final_law(schedule: Schedule, t: int, mu: float, s: float) -> tuple[float, float]:
    """Mean and variance of x0_hat(x_t, t) over the exact marginal of x_t: what a sampler whose last
    network evaluation is at step t draws when every step before it is exact. x0_hat = mu + k (x_t -
    sqrt(abar) mu) with k = sqrt(abar) s^2 / (abar s^2 + 1 - abar), so the variance is k^2 (abar s^2 + 1 - abar)."""
    abar = float(schedule.alpha_bar[t])
    return mu, abar * s**4 / (abar * s**2 + 1 - abar)


def output_law(sampler, denoiser, steps, mu: float, s: float, max_draws: int, **options) -> tuple[float, float]:
    """The exact mean and variance of a sampler's output for the Gaussian oracle, x_T drawn from its exact
    marginal. Every step is affine in x_T and in the noise it draws, so x_0 = a x_T + sum_j b_j z_j + c:
    one batch gives c (x_T = 0, no noise), a (x_T = 1) and each b_j (only draw j puts a 1, on its own
    example); then mean = c + a m_T and variance = a^2 sd_T^2 + sum_j b_j^2."""
    draws = []

    def one_hot_noise(x, generator):
        if len(draws) == max_draws:
            raise AssertionError(f"the sampler drew noise more than {max_draws} times")
        z = torch.zeros_like(x)
        z[2 + len(draws)] = 1.0
        draws.append(z)
        return z

    x_T = torch.zeros(2 + max_draws, 1, 1, 1, dtype=torch.float64)
    x_T[1] = 1.0
    with patch.object(samplers, "_noise", one_hot_noise):
        out = sampler(denoiser, x_T, steps, **options).reshape(-1)
    c, a, b = out[0], out[1] - out[0], out[2 : 2 + len(draws)] - out[0]
    m_T, sd_T = marginal(denoiser.schedule, denoiser.schedule.T, mu, s)
    return float(c + a * m_T), float(a**2 * sd_T**2 + (b**2).sum())
