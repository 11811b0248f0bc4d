"""The Denoiser: a network plus its schedule and objective, seen by samplers as (eps_hat, x0_hat).

Samplers and the likelihood never look at the network's raw output; whatever the training
objective (eps, x0 or v), the Denoiser returns both predictions. Classifier-free guidance
lives here, once, for every sampler.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from . import diffusion
from .errors import DdpmkitError
from .precision import autocast
from .schedules import Schedule


class Prediction(NamedTuple):
    eps: torch.Tensor  # eps_hat(x_t, t)
    x0: torch.Tensor  # x0_hat(x_t, t)
    var_frac: Optional[torch.Tensor] = None  # learned-variance interpolation in [0, 1], or None


class Denoiser(nn.Module):
    """Wraps `net(x_t, t, y, x_self_cond)`; `num_classes` = 0 for an unconditional net.

    clip_x0: clamp x0_hat to the data range [-1, 1] and recompute eps_hat from it, as
    improved-diffusion does when sampling (turn it off for exact-maths tests).
    """

    def __init__(self, net: nn.Module, schedule: Schedule, objective: str = "eps", *,
                 num_classes: int = 0, learn_sigma: bool = False, self_condition: bool = False,
                 clip_x0: bool = True, precision: str = "fp32"):
        super().__init__()
        if objective not in diffusion.OBJECTIVES:
            raise DdpmkitError(f"unknown objective {objective!r}; choose one of {', '.join(diffusion.OBJECTIVES)}")
        self.net, self.schedule, self.objective = net, schedule, objective
        self.num_classes, self.learn_sigma, self.clip_x0 = num_classes, learn_sigma, clip_x0
        self.self_condition, self.precision = self_condition, precision

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, x_t: torch.Tensor, t, y: Optional[torch.Tensor] = None, guidance: float = 1.0,
                x_self_cond: Optional[torch.Tensor] = None) -> Prediction:
        t = _as_steps(t, x_t)
        if y is None or guidance == 1.0:
            return self._predict(x_t, t, y, x_self_cond)
        if self.num_classes == 0:
            raise DdpmkitError("guidance needs a class-conditional model; this one is unconditional")
        null = torch.full_like(y, self.null_class)
        if guidance == 0.0:
            return self._predict(x_t, t, null, x_self_cond)
        # conditional and null branches in one batched forward pass
        both = self._raw(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]),
                         None if x_self_cond is None else torch.cat([x_self_cond, x_self_cond]))
        out_cond, out_null = both.chunk(2)
        out, var_frac = self._split(out_cond)
        eps_cond = diffusion.to_x0_eps(self.objective, self.schedule, x_t, t, out)[1]
        eps_null = diffusion.to_x0_eps(self.objective, self.schedule, x_t, t, self._split(out_null)[0])[1]
        eps = (1 - guidance) * eps_null + guidance * eps_cond  # eps_hat = (1 - w) eps_null + w eps_cond
        return self._finish(x_t, t, diffusion.x0_from_eps(self.schedule, x_t, t, eps), eps, var_frac)

    def _predict(self, x_t, t, y, x_self_cond) -> Prediction:
        if y is None and self.num_classes > 0:
            y = torch.full((x_t.shape[0],), self.null_class, dtype=torch.long, device=x_t.device)
        out, var_frac = self._split(self._raw(x_t, t, y, x_self_cond))
        x0, eps = diffusion.to_x0_eps(self.objective, self.schedule, x_t, t, out)
        return self._finish(x_t, t, x0, eps, var_frac)

    def _raw(self, x_t, t, y, x_self_cond) -> torch.Tensor:
        if self.num_classes == 0:
            y = None
        if not self.self_condition:
            x_self_cond = None
        with autocast(x_t.device, self.precision):  # the net may run in bf16; the maths stays fp32
            return self.net(x_t, t, y, x_self_cond).float()

    def _split(self, out: torch.Tensor):
        """With learned variances the second half of the channels is v in [-1, 1] -> frac in [0, 1]."""
        if not self.learn_sigma:
            return out, None
        out, v = out.chunk(2, dim=1)
        return out, (v + 1) / 2

    def _finish(self, x_t, t, x0, eps, var_frac) -> Prediction:
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = diffusion.eps_from_x0(self.schedule, x_t, t, x0)
        return Prediction(eps, x0, var_frac)


def _as_steps(t, x_t: torch.Tensor) -> torch.Tensor:
    """An int or a [B] tensor of steps -> a long tensor [B] on x_t's device."""
    t = torch.as_tensor(t, device=x_t.device, dtype=torch.long)
    return t.expand(x_t.shape[0]) if t.ndim == 0 else t
