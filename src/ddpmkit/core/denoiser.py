"""The Denoiser: a network plus its schedule and objective, seen by samplers as (eps_hat, x0_hat).

Samplers and the likelihood never look at the network's raw output; whatever the training
objective (eps, x0 or v), the Denoiser returns both predictions. It alone knows the layout of the
network's output channels ([prediction] or, with learned variances, [prediction, v]) and how the
objective's prediction converts to x0 and eps; the losses ask it (`network_output`, `x0_eps`).
Classifier-free guidance lives here, once, for every sampler.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ddpmkit.core import diffusion
from ddpmkit.core.precision import autocast
from ddpmkit.core.schedules import Schedule
from ddpmkit.errors import DdpmkitError


class Prediction(NamedTuple):
    eps: torch.Tensor  # eps_hat(x_t, t)
    x0: torch.Tensor  # x0_hat(x_t, t)
    var_frac: torch.Tensor | None = None  # learned-variance interpolation in [0, 1], or None


class NetOutput(NamedTuple):
    """The network's output split by channel: the objective's prediction and, with learned
    variances, the interpolation v in [0, 1] between log beta_tilde (0) and log beta (1)."""

    pred: torch.Tensor
    var_frac: torch.Tensor | None


class Denoiser(nn.Module):
    """Wraps `net(x_t, t, y, x_self_cond)`; `num_classes` = 0 for an unconditional net.

    null_class_trained: whether a conditional net was trained with label dropout, so that its null
    class (index num_classes) is the unconditional model. Only then may it be asked for y = None or
    guided (guidance != 1); otherwise those are refused rather than answered by an untrained class.
    clip_x0: clamp x0_hat to the data range [-1, 1] and recompute eps_hat from it, as
    improved-diffusion does when sampling (turn it off for exact-maths tests).
    precision: the autocast the network runs under here ("fp32": none of its own, so an enclosing
    autocast, as the trainer's, applies).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule,
        objective: str = "eps",
        *,
        num_classes: int = 0,
        null_class_trained: bool = True,
        learn_sigma: bool = False,
        self_condition: bool = False,
        clip_x0: bool = True,
        precision: str = "fp32",
    ):
        super().__init__()
        if objective not in diffusion.OBJECTIVES:
            raise DdpmkitError(f"unknown objective {objective!r}; choose one of {', '.join(diffusion.OBJECTIVES)}")
        self.net, self.schedule, self.objective = net, schedule, objective
        self.num_classes, self.learn_sigma, self.clip_x0 = num_classes, learn_sigma, clip_x0
        self.null_class_trained = null_class_trained
        self.self_condition, self.precision = self_condition, precision
        self.guidance_interval: tuple[float, float] | None = None  # (LO, HI): guide only where LO < sigma_t <= HI

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(
        self,
        x_t: torch.Tensor,
        t,
        y: torch.Tensor | None = None,
        guidance: float = 1.0,
        x_self_cond: torch.Tensor | None = None,
    ) -> Prediction:
        t = _as_steps(t, x_t)
        if guidance != 1.0 and not self.guides_at(int(t[0])):
            guidance = 1.0  # outside the guidance interval: the plain conditional model, one branch
        if y is None or guidance == 1.0:  # y = None: the unconditional model, which guidance leaves as it is
            if y is None:
                self._check_null_class("y = None (the unconditional model)")
            return self._predict(x_t, t, y, x_self_cond)
        if self.num_classes == 0:
            raise DdpmkitError("guidance needs a class-conditional model; this one is unconditional")
        self._check_null_class(f"guidance {guidance:g}")
        null = torch.full_like(y, self.null_class)
        if guidance == 0.0:
            return self._predict(x_t, t, null, x_self_cond)
        # conditional and null branches in one batched forward pass
        both = self._raw(
            torch.cat([x_t, x_t]),
            torch.cat([t, t]),
            torch.cat([y, null]),
            None if x_self_cond is None else torch.cat([x_self_cond, x_self_cond]),
        )
        out_cond, out_null = (self.split(out) for out in both.chunk(2))
        eps_cond = self.x0_eps(x_t, t, out_cond.pred)[1]
        eps_null = self.x0_eps(x_t, t, out_null.pred)[1]
        eps = (1 - guidance) * eps_null + guidance * eps_cond  # eps_hat = (1 - w) eps_null + w eps_cond
        return self._finish(x_t, t, diffusion.x0_from_eps(self.schedule, x_t, t, eps), eps, out_cond.var_frac)

    def guides_at(self, t: int) -> bool:
        """Whether step t lies in the guidance interval, LO < sigma_t <= HI, where sigma_t =
        sqrt((1 - alpha_bar_t) / alpha_bar_t) is Karras et al.'s noise level of x_t / sqrt(alpha_bar_t)
        (Kynkaanniemi et al. 2024 guide only there: at high noise guidance costs diversity, at low noise
        it does little). Every step when no interval is set."""
        if self.guidance_interval is None:
            return True
        lo, hi = self.guidance_interval
        alpha_bar = float(self.schedule.alpha_bar[t])
        sigma = math.sqrt((1 - alpha_bar) / alpha_bar) if alpha_bar > 0 else math.inf
        return lo < sigma <= hi

    def _check_null_class(self, asked: str) -> None:
        """Refuse what would need the null class of a conditional net that never trained it."""
        if self.num_classes > 0 and not self.null_class_trained:
            raise DdpmkitError(
                f"{asked} needs the null class, but this conditional model was trained without label "
                "dropout; give class labels with guidance 1, or retrain with --label-dropout 0.1"
            )

    def network_output(self, x_t: torch.Tensor, t, y=None, x_self_cond=None) -> NetOutput:
        """The network's raw output at (x_t, t, y), in float32, split by channel (what losses train)."""
        t = _as_steps(t, x_t)
        if y is None and self.num_classes > 0:
            y = torch.full((x_t.shape[0],), self.null_class, dtype=torch.long, device=x_t.device)
        return self.split(self._raw(x_t, t, y, x_self_cond))

    def split(self, out: torch.Tensor) -> NetOutput:
        """[prediction] or [prediction, v] along channels; v in [-1, 1] -> var_frac = (v + 1) / 2 in [0, 1]."""
        if not self.learn_sigma:
            return NetOutput(out, None)
        pred, v = out.chunk(2, dim=1)
        return NetOutput(pred, (v + 1) / 2)

    def x0_eps(self, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from the objective's prediction, exactly (no clipping)."""
        return diffusion.to_x0_eps(self.objective, self.schedule, x_t, t, pred)

    def _predict(self, x_t, t, y, x_self_cond) -> Prediction:
        out = self.network_output(x_t, t, y, x_self_cond)
        x0, eps = self.x0_eps(x_t, t, out.pred)
        return self._finish(x_t, t, x0, eps, out.var_frac)

    def _raw(self, x_t, t, y, x_self_cond) -> torch.Tensor:
        if self.num_classes == 0:
            y = None
        if not self.self_condition:
            x_self_cond = None
        with autocast(x_t.device, self.precision):  # the net may run in bf16; the maths stays fp32
            out = self.net(x_t, t, y, x_self_cond)
        return out if out.dtype == torch.float64 else out.float()  # (or fp64, as exact-maths tests run)

    def _finish(self, x_t, t, x0, eps, var_frac) -> Prediction:
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = diffusion.eps_from_x0(self.schedule, x_t, t, x0)
        return Prediction(eps, x0, var_frac)


def _as_steps(t, x_t: torch.Tensor) -> torch.Tensor:
    """An int or a [B] tensor of steps -> a long tensor [B] on x_t's device."""
    t = torch.as_tensor(t, device=x_t.device, dtype=torch.long)
    return t.expand(x_t.shape[0]) if t.ndim == 0 else t
