"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): a student learns to take in one DDIM
step what its teacher takes in two.

With alpha_t = sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t), a deterministic DDIM step
t -> s from x_t with the estimate x0_hat (and eps_hat = (x_t - alpha_t x0_hat) / sigma_t) is

    x_s = alpha_s x0_hat + sigma_s eps_hat = alpha_s x0_hat + (sigma_s / sigma_t) (x_t - alpha_t x0_hat).

On the student's grid of N steps, t -> t'' is one student step; the teacher's grid of 2N steps puts
t' between them. The teacher takes t -> t' -> t''; the target x~ is the x0_hat whose single step
t -> t'' lands on the teacher's x_t'' (solve the line above for x0_hat):

    x~ = (x_t'' - (sigma_t'' / sigma_t) x_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),

and the student minimises max(SNR_t, 1) ||x~ - x0_hat_student(x_t)||^2 ("truncated SNR" weighting:
the larger of the x0 error and the eps error). At t'' = 0 (sigma = 0, alpha = 1), x~ is the
teacher's x_0 itself. Both grids come from one spacing (`trailing` by default: its grid of 2N steps
contains its grid of N steps, and its first step is at t = T, where x_T is nearly pure noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddpmkit.core import diffusion
from ddpmkit.core.denoiser import Denoiser
from ddpmkit.core.losses import Noise, loss_per_example
from ddpmkit.core.schedules import Schedule, timesteps
from ddpmkit.errors import DdpmkitError


def halvings(start: int, to: int) -> list[int]:
    """The students' step counts, round after round: start/2, start/4, ..., to (one round each)."""
    ratio = start // to if isinstance(to, int) and to >= 1 and start % to == 0 else 0
    if ratio < 2 or ratio & (ratio - 1):
        raise DdpmkitError(
            f"cannot halve {start} steps down to {to}: the start must be the final step count times 2, 4, 8, ..."
        )
    counts, n = [], start
    while n > to:
        n //= 2
        counts.append(n)
    return counts


def ddim_step(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, y=None, guidance=1.0):
    """One deterministic DDIM step per example, t -> s (long tensors [B]); returns (x_s, x0_hat).

    x_s = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s) eps_hat       (DDIM eq. 12, eta = 0)
    """
    pred = denoiser(x_t, t, y, guidance)
    alpha_bar_s = denoiser.schedule.at("alpha_bar", s, x_t.ndim, x_t.dtype)
    return alpha_bar_s.sqrt() * pred.x0 + (1 - alpha_bar_s).sqrt() * pred.eps, pred.x0


def x0_target(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, x_s: torch.Tensor, s: torch.Tensor):
    """x~ = (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t): the x0_hat whose
    DDIM step t -> s from x_t lands on x_s."""
    alpha_bar_t = schedule.at("alpha_bar", t, x_t.ndim, x_t.dtype)
    alpha_bar_s = schedule.at("alpha_bar", s, x_t.ndim, x_t.dtype)
    ratio = ((1 - alpha_bar_s) / (1 - alpha_bar_t)).sqrt()  # sigma_s / sigma_t
    return (x_s - ratio * x_t) / (alpha_bar_s.sqrt() - ratio * alpha_bar_t.sqrt())


def truncated_snr_weight(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """w(t) = max(SNR_t, 1) on the x0 error: max(||x - x_hat||^2, ||eps - eps_hat||^2) (Salimans & Ho, sec. 4)."""
    return diffusion.snr(schedule, t).clamp(min=1.0)


class Grids:
    """The student's N steps and, for each of them, the teacher's two steps t -> t' -> t''.

    `student` holds t_1 < ... < t_N (the steps `ddpmkit sample` visits with N steps and this spacing);
    `mid[t]` and `next[t]` give t' and t'' for each of them (t'' = 0 after t_1)."""

    def __init__(self, T: int, n: int, spacing: str = "trailing"):
        teacher = timesteps(T, 2 * n, spacing) + [0]  # tau_2n > ... > tau_1 > 0
        student = timesteps(T, n, spacing)
        if teacher[:-1:2] != student:
            raise DdpmkitError(
                f"the {spacing} spacing of {2 * n} steps does not contain its own {n} steps at T = {T}; "
                "use the trailing spacing"
            )
        self.n, self.spacing = n, spacing
        self.student = torch.tensor(student[::-1])
        self.mid = torch.zeros(T + 1, dtype=torch.long)
        self.next = torch.zeros(T + 1, dtype=torch.long)
        for k, t in enumerate(student):
            self.mid[t], self.next[t] = teacher[2 * k + 1], teacher[2 * k + 2]

    def steps(self, i: torch.Tensor) -> torch.Tensor:
        """The student's step t_i for indices i in 1..N (Algorithm 2: t = i / N)."""
        return self.student.to(i.device)[i - 1]


@dataclass(frozen=True)
class DistillLoss:
    """max(SNR_t, 1) ||x~ - x0_hat_student(x_t, t)||^2 per example [B], called as the trainer calls
    every loss: `loss(student, x0, y, noise)`, with noise.t on the student's grid.

    The teacher runs without gradient and without clipping x0_hat (the exact DDIM steps), with
    classifier-free guidance `guidance` folded into the target when it is not 1."""

    teacher: Denoiser
    grids: Grids
    guidance: float = 1.0

    def target(self, x_t: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        """x~ from two teacher DDIM steps t -> t' -> t''."""
        mid, nxt = self.grids.mid.to(t.device)[t], self.grids.next.to(t.device)[t]
        with torch.no_grad():
            x_mid, _ = ddim_step(self.teacher, x_t, t, mid, y, self.guidance)
            x_next, _ = ddim_step(self.teacher, x_mid, mid, nxt, y, self.guidance)
        return x0_target(self.teacher.schedule, x_t, t, x_next, nxt)

    def __call__(self, student: Denoiser, x0: torch.Tensor, y=None, noise: Noise | None = None) -> torch.Tensor:
        schedule = student.schedule
        if noise is None:
            i = torch.randint(1, self.grids.n + 1, (x0.shape[0],), device=x0.device)
            noise = Noise(self.grids.steps(i), torch.randn_like(x0), torch.rand(x0.shape[0], 2, device=x0.device))
        t, eps = noise.t, noise.eps
        x_t = diffusion.q_sample(schedule, x0, t, eps)  # x_t ~ q(x_t | x0)
        x_tilde = self.target(x_t, t, y)
        x0_hat, _ = student.x0_eps(x_t, t, student.network_output(x_t, t, y).pred)
        return truncated_snr_weight(schedule, t) * loss_per_example(x0_hat, x_tilde)
