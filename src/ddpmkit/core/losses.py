"""Training losses: small objects called as `loss(denoiser, x0, y)` -> one value per example [B].

    L_simple = E_{t, x0, eps} w(t) || target - net(x_t, t) ||^2   (DDPM eq. 14, in the objective's space;
                                                               w = 1, or Hang et al.'s min-SNR weight)
    L_hybrid = L_simple + lambda L_vlb                         (Nichol & Dhariwal 2021, eq. 16)

A loss draws t ~ U{1..T} and eps ~ N(0, I) itself, or takes them as `noise` (the trainer draws one
`Noise` per global batch from a seeded generator, so that every rank and every resume sees the same).
The loss sees the network only through the Denoiser, which knows the objective and the output layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ddpmkit.core import diffusion
from ddpmkit.core.denoiser import Denoiser
from ddpmkit.core.likelihood import vlb_term_of_output
from ddpmkit.core.schedules import Schedule
from ddpmkit.errors import DdpmkitError


class Noise(NamedTuple):
    """The randomness of one batch: steps t [B], noise eps [B, C, H, W], coins u [B, 2] in [0, 1)
    (u[:, 0]: label dropout; u[0, 1]: whether this batch is self-conditioned)."""

    t: torch.Tensor
    eps: torch.Tensor
    u: torch.Tensor


def sample_t(batch: int, T: int, device, generator=None) -> torch.Tensor:
    """t ~ Uniform{1, ..., T}   (DDPM Algorithm 1, line 3)."""
    return torch.randint(1, T + 1, (batch,), device=device, generator=generator)


def lognormal_t(schedule: Schedule, mean: float = -1.2, std: float = 1.2):
    """Karras et al. 2022 (EDM): ln sigma ~ N(mean, std^2), sigma = sqrt((1 - alpha_bar) / alpha_bar), mapped
    to the step t in 1..T whose sigma_t is nearest in log: the noise levels that matter most for images are
    drawn most often (the uniform t of DDPM spends many draws where x_t is nearly pure noise).
    Returns a sampler (batch, device, generator) -> t [B]."""
    log_sigma = 0.5 * (torch.log1p(-schedule.alpha_bar[1:]) - torch.log(schedule.alpha_bar[1:]))  # increasing in t

    def draw(batch: int, device, generator=None) -> torch.Tensor:
        z = torch.randn(batch, generator=generator, device=device, dtype=torch.float64)
        target = (mean + std * z).to(log_sigma.device)  # ln sigma ~ N(mean, std^2)
        i = torch.searchsorted(log_sigma, target).clamp(1, len(log_sigma) - 1)
        nearer_below = (target - log_sigma[i - 1]) < (log_sigma[i] - target)
        return (i - nearer_below.long() + 1).to(device)  # index i of log_sigma is t = i + 1

    return draw


# how t is drawn in training: name -> schedule -> sampler (None: t ~ U{1..T})
T_SAMPLING = {"uniform": lambda schedule: None, "lognormal": lognormal_t}


def draw_noise(shape, T: int, device, generator: torch.Generator | None = None, t_sampler=None) -> Noise:
    """t, eps and the coins for a batch of `shape` [B, C, H, W], in this order from `generator`.
    t_sampler(batch, device, generator) -> t replaces t ~ U{1..T} (e.g. lognormal_t)."""
    t = sample_t(shape[0], T, device, generator) if t_sampler is None else t_sampler(shape[0], device, generator)
    eps = torch.randn(shape, generator=generator, device=device)  # eps ~ N(0, I)
    u = torch.rand(shape[0], 2, generator=generator, device=device)
    return Noise(t, eps, u)


def loss_per_example(net_out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """|| target - net(x_t, t) ||^2 averaged over pixels: one value per example [B] (L_simple)."""
    return (net_out.float() - tgt.float()).pow(2).flatten(1).mean(1)


def min_snr_weight(objective: str, schedule: Schedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Hang et al. 2023: weight min(SNR, gamma) on the x0-error, expressed for each objective."""
    ratio = diffusion.snr(schedule, t)
    clipped = ratio.clamp(max=gamma)
    if objective == "x0":
        return clipped
    if objective == "eps":
        return clipped / ratio  # ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2
    if objective == "v":
        return clipped / (ratio + 1)  # ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2
    raise DdpmkitError(f"unknown objective {objective!r}; choose one of {', '.join(diffusion.OBJECTIVES)}")


@dataclass(frozen=True)
class SimpleLoss:
    """L_simple in the objective's space, min-SNR weighted unless `min_snr_gamma` is None.

    label_dropout: probability that a label becomes the null class (classifier-free guidance).
    Self-conditioning (Chen et al., Analog Bits) follows the denoiser: on half of the batches the
    network first estimates x0 without gradient and gets it back as input; zeros on the other half.
    """

    min_snr_gamma: float | None = None
    label_dropout: float = 0.0
    t_sampling: str = "uniform"  # a name in T_SAMPLING: how the noise level of each example is drawn

    def draw(self, schedule: Schedule, shape, device, generator: torch.Generator | None = None) -> Noise:
        """The randomness of one batch, with t drawn as `t_sampling` says."""
        return draw_noise(shape, schedule.T, device, generator, T_SAMPLING[self.t_sampling](schedule))

    def __call__(
        self, denoiser: Denoiser, x0: torch.Tensor, y: torch.Tensor | None = None, noise: Noise | None = None
    ) -> torch.Tensor:
        schedule = denoiser.schedule
        t, eps, u = noise if noise is not None else self.draw(schedule, x0.shape, x0.device)
        y = self._drop_labels(denoiser, y, u)
        x_t = diffusion.q_sample(schedule, x0, t, eps)  # x_t ~ q(x_t | x0)
        out = denoiser.network_output(x_t, t, y, self._self_condition(denoiser, x_t, t, y, u))
        loss = loss_per_example(out.pred, diffusion.target(denoiser.objective, schedule, x0, t, eps))
        return self._weighted(denoiser, loss, t) + self._extra(denoiser, x0, x_t, t, out)

    def _weighted(self, denoiser: Denoiser, loss: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.min_snr_gamma:
            return loss
        return loss * min_snr_weight(denoiser.objective, denoiser.schedule, t, self.min_snr_gamma)

    def _extra(self, denoiser, x0, x_t, t, out) -> torch.Tensor | float:
        return 0.0

    def _drop_labels(self, denoiser: Denoiser, y, u):
        """y -> null with probability label_dropout, for classifier-free guidance."""
        if y is None or self.label_dropout <= 0:
            return y
        return torch.where(u[:, 0] < self.label_dropout, torch.full_like(y, denoiser.null_class), y)

    @staticmethod
    def _self_condition(denoiser: Denoiser, x_t, t, y, u) -> torch.Tensor | None:
        if not denoiser.self_condition:
            return None
        if bool(u[0, 1] >= 0.5):  # one coin for the whole (global) batch
            return torch.zeros_like(x_t)
        with torch.no_grad():
            out = denoiser.network_output(x_t, t, y, torch.zeros_like(x_t))
            x0_hat, _ = denoiser.x0_eps(x_t, t, out.pred)
        return x0_hat.clamp(-1, 1).to(x_t.dtype)


@dataclass(frozen=True)
class HybridLoss(SimpleLoss):
    """L_hybrid = L_simple + lambda L_vlb per example [B] (Nichol & Dhariwal 2021, eq. 16).

    L_vlb sees the prediction only through a stop-gradient, so it trains the variance alone;
    it is estimated by T L_t at the sampled t, in bits per dimension, as improved-diffusion does.
    min_snr_gamma weights the L_simple part only (it trains the mean), as Hang et al.'s own code does
    with learned variances (guided-diffusion's hybrid loss); L_vlb stays the unweighted bound.
    """

    vlb_weight: float = 0.001  # lambda

    def _extra(self, denoiser, x0, x_t, t, out) -> torch.Tensor:
        x0_hat, _ = denoiser.x0_eps(x_t, t, out.pred.detach())  # stop-gradient on the mean
        l_vlb_bpd = vlb_term_of_output(denoiser.schedule, x0, x_t, t, x0_hat, out.var_frac)
        return self.vlb_weight * l_vlb_bpd.float()
