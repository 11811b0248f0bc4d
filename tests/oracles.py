"""Known-answer fixtures: the exact denoiser of Gaussian data, and a tiny image dataset."""

from torch import nn

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
