"""Samplers: plain functions that run the reverse process with a Denoiser.

Every sampler has one signature:

    sampler(denoiser, x_T, timesteps, *, y=None, guidance=1.0, generator=None, callback=None) -> x0

`timesteps` is the decreasing list t_n > ... > t_1 >= 1 from `schedules.timesteps`; each sampler
steps t -> s through consecutive entries and finally to s = 0, where alpha_bar_0 = 1 and the
sample is the clean image. `callback(Step(...))` is called once per step, n times in all, whatever
the number of network evaluations (Heun makes two per step): with the iterate the step starts from
and the x0_hat of its first evaluation (animation, progress, tests). Randomness comes only from
`generator`, so a seed fixes the result. A sampler's own options are its keyword-only parameters
after the common ones (`sampler_options`).

Network evaluations (NFE) for n steps: n for every sampler but heun (2n - 1).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from ddpmkit.core.denoiser import Denoiser
from ddpmkit.core.schedules import KARRAS_SIGMA_MAX, sigma, step_at_sigma
from ddpmkit.core.schedules import timesteps as spaced_steps
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
        """Step i's (first) evaluation, reported to the callback."""
        pred = self.evaluate(t, x_t)
        if self.callback is not None:
            self.callback(Step(i, t, x_t, pred.x0))
        return pred

    def evaluate(self, t, x_t):
        """A further evaluation within a step (Heun's second), not reported."""
        pred = self.denoiser(x_t, t, self.y, self.guidance, x_self_cond=self.x0_prev)
        self.x0_prev = pred.x0
        return pred


def _abar(denoiser: Denoiser, t: int) -> float:
    return float(denoiser.schedule.alpha_bar[t])


def _lambda(denoiser: Denoiser, t: int) -> float:
    """lambda_t = log(alpha_t / sigma_t) = log(sqrt(abar_t) / sqrt(1 - abar_t)), half the log-SNR (t >= 1)."""
    a = _abar(denoiser, t)
    return 0.5 * math.log(a / (1 - a))


def _multistep_order(order: int, i: int, h: float, h_prev: float | None) -> int:
    """The order of multistep step i (0-based) of length h in lambda: it warms up from first order as
    estimates accumulate, and is first order where the step is more than twice the one before it: the
    extrapolation reaches h / 2 ahead from estimates h_prev apart, and past that it overshoots. Uniform
    spacing's last step t_2 -> t_1 is such a step (its h ~ log(T / n) / 2 does not shrink like 1/n)."""
    if i == 0 or h > 2 * h_prev:
        return 1
    return min(order, i + 1)


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
    D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev, r = h_prev / h, and D = x0_hat on first-order steps:
    the first (no previous estimate) and any step more than twice as long as the one before it
    (`_multistep_order`): with uniform spacing, the step into t_1. The step to t = 0 returns x0_hat.
    """
    run, x = _Runner(denoiser, y, guidance, callback), x_T
    x0_prev, h_prev = None, None
    for i, t, s in _pairs(timesteps):
        pred = run(i, t, x)
        if s == 0:  # sigma_0 = 0, lambda_0 = inf: the update reduces to x_0 = x0_hat
            return pred.x0
        a_t, a_s = _abar(denoiser, t), _abar(denoiser, s)
        h = _lambda(denoiser, s) - _lambda(denoiser, t)
        D = pred.x0
        if _multistep_order(2, i, h, h_prev) == 2:
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * pred.x0 - (1 / (2 * r)) * x0_prev  # D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev
        # x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D
        x = math.sqrt((1 - a_s) / (1 - a_t)) * x - math.sqrt(a_s) * math.expm1(-h) * D
        x0_prev, h_prev = pred.x0, h
    return x


@torch.inference_mode()
def dpm_solver_pp_2m_sde(
    denoiser: Denoiser, x_T, timesteps, *, y=None, guidance=1.0, generator=None, callback=None, s_noise: float = 1.0
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, DPM-Solver++: their multistep solver of the reverse SDE,
    as in their code and k-diffusion's dpmpp_2m_sde, midpoint form):

    x_s = (sigma_s / sigma_t) e^{-h} x_t + alpha_s (1 - e^{-2h}) D + s_noise sigma_s sqrt(1 - e^{-2h}) z,
    with h and D as in dpm_solver_pp_2m (the same first-order steps). A first-order step is exactly
    the DDPM posterior step with beta_tilde; the step to t = 0 returns x0_hat.
    """
    _check_s_noise(s_noise)
    run, x = _Runner(denoiser, y, guidance, callback), x_T
    x0_prev, h_prev = None, None
    for i, t, s in _pairs(timesteps):
        pred = run(i, t, x)
        if s == 0:
            return pred.x0
        a_t, a_s = _abar(denoiser, t), _abar(denoiser, s)
        h = _lambda(denoiser, s) - _lambda(denoiser, t)
        D = pred.x0
        if _multistep_order(2, i, h, h_prev) == 2:
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * pred.x0 - (1 / (2 * r)) * x0_prev
        # x_s = (sigma_s / sigma_t) e^{-h} x_t + alpha_s (1 - e^{-2h}) D + sigma_s sqrt(1 - e^{-2h}) z
        x = math.sqrt((1 - a_s) / (1 - a_t)) * math.exp(-h) * x - math.sqrt(a_s) * math.expm1(-2 * h) * D
        x = x + s_noise * math.sqrt((1 - a_s) * -math.expm1(-2 * h)) * _noise(x, generator)
        x0_prev, h_prev = pred.x0, h
    return x


def _check_s_noise(s_noise: float) -> None:
    if not 0.0 <= s_noise < math.inf:
        raise DdpmkitError(f"s_noise must be a finite number >= 0, got {s_noise}")


# ---- Karras et al. 2022 (EDM): x = x_t / sqrt(abar_t), sigma = sqrt((1 - abar_t) / abar_t) ----------
# The probability-flow ODE becomes dx/dsigma = (x - D(x; sigma)) / sigma with D = x0_hat (EDM eq. 4
# with sigma(t) = t, s(t) = 1); the network is asked at x_t = sqrt(abar_t) x and the integer step t.


def _to_x_t(denoiser: Denoiser, t: int, x):
    """x_t = sqrt(abar_t) x: from Karras et al.'s variable back to the diffusion's."""
    return math.sqrt(_abar(denoiser, t)) * x


@torch.inference_mode()
def euler(
    denoiser: Denoiser,
    x_T,
    timesteps,
    *,
    y=None,
    guidance=1.0,
    generator=None,
    callback=None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float | None = None,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler's method in sigma (Karras et al. 2022, Algorithm 2 without its second-order correction):
    first order, n evaluations. Without churn it takes exactly ddim's (eta = 0) steps."""
    churn = _Churn(s_churn, s_tmin, s_tmax, s_noise)
    return _karras_sampler(denoiser, x_T, timesteps, y, guidance, generator, callback, churn, heun=False)


@torch.inference_mode()
def heun(
    denoiser: Denoiser,
    x_T,
    timesteps,
    *,
    y=None,
    guidance=1.0,
    generator=None,
    callback=None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float | None = None,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Heun's second-order method in sigma (Karras et al. 2022, Algorithm 1; with s_churn > 0 their
    stochastic Algorithm 2) on their grid, sigma <= sigma_max = 80: 2n - 1 evaluations there, the last
    step to sigma = 0 being a plain Euler step. A step that starts above sigma_max (the entry from t = T,
    where the cosine schedule's sigma_T is ~2e4) is a plain Euler step too (`heun_corrects`)."""
    churn = _Churn(s_churn, s_tmin, s_tmax, s_noise)
    return _karras_sampler(denoiser, x_T, timesteps, y, guidance, generator, callback, churn, heun=True)


class _Churn(NamedTuple):
    """Algorithm 2's noise injection: gamma_i = min(S_churn / N, sqrt(2) - 1) while S_tmin <= sigma_i <= S_tmax
    (s_tmax None: no upper bound), else 0; the noise is scaled by S_noise."""

    s_churn: float
    s_tmin: float
    s_tmax: float | None
    s_noise: float

    def raised_step(self, denoiser: Denoiser, t: int, n: int) -> int:
        """The step t_hat >= t at sigma_hat = (1 + gamma) sigma_t, on the integer grid: the network takes
        integer steps only, so sigma_hat is rounded to the step with (about) the nearest log sigma."""
        sigma_t = sigma(denoiser.schedule, t)
        in_range = self.s_tmin <= sigma_t and (self.s_tmax is None or sigma_t <= self.s_tmax)
        gamma = min(self.s_churn / n, math.sqrt(2) - 1) if in_range else 0.0
        if gamma == 0.0:
            return t
        t_hat = round(float(step_at_sigma(denoiser.schedule, [(1 + gamma) * sigma_t])[0]))
        return min(denoiser.schedule.T, max(t, t_hat))


def _check_churn(churn: _Churn) -> None:
    for name in ("s_churn", "s_tmin"):
        if not 0.0 <= getattr(churn, name) < math.inf:
            raise DdpmkitError(f"{name} must be a finite number >= 0, got {getattr(churn, name)}")
    if churn.s_tmax is not None and not churn.s_tmin <= churn.s_tmax:
        raise DdpmkitError(f"s_tmax must be >= s_tmin ({churn.s_tmin}), got {churn.s_tmax}")
    _check_s_noise(churn.s_noise)


def heun_corrects(schedule, t: int, s: int) -> bool:
    """Whether Heun's step t -> s takes its second evaluation: on Karras et al.'s grid, ending above
    sigma = 0 and starting at or below their sigma_max (80). Above it, the step from t = T enters the
    grid: with the cosine schedule sigma falls 250-fold over it, and the trapezoid rule would multiply
    the change of x0_hat between its ends by ~125, where the Euler (= DDIM) step is exact while x0_hat
    barely changes, as it does at such noise (on a trained model Heun drew noise: FD_dom 143 against
    Euler's 27 at 15 evaluations, bench/results/samplers-2026-12-01.md)."""
    return s > 0 and sigma(schedule, t) <= KARRAS_SIGMA_MAX


def _karras_sampler(denoiser, x_T, timesteps, y, guidance, generator, callback, churn: _Churn, heun: bool):
    """Karras et al. 2022, Algorithm 2 (Algorithm 1 when S_churn = 0), on the steps `timesteps`."""
    _check_churn(churn)
    run, n, schedule = _Runner(denoiser, y, guidance, callback), len(timesteps), denoiser.schedule
    x = x_T / math.sqrt(_abar(denoiser, timesteps[0]))  # x = x_T / sqrt(abar_T) ~ N(0, (1 + sigma_T^2) I)
    for i, t, s in _pairs(timesteps):
        t_hat = churn.raised_step(denoiser, t, n)
        sigma_t, sigma_hat, sigma_s = sigma(schedule, t), sigma(schedule, t_hat), sigma(schedule, s)
        if t_hat > t:  # x_hat = x + sqrt(sigma_hat^2 - sigma^2) eps,  eps ~ N(0, S_noise^2 I)
            x = x + math.sqrt(sigma_hat**2 - sigma_t**2) * churn.s_noise * _noise(x, generator)
        x0_hat = run(i, t_hat, _to_x_t(denoiser, t_hat, x)).x0
        d = (x - x0_hat) / sigma_hat  # d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat
        x_next = x + (sigma_s - sigma_hat) * d  # Euler step: x_s = x_hat + (sigma_s - sigma_hat) d
        if heun and heun_corrects(schedule, t, s):
            x0_next = run.evaluate(s, _to_x_t(denoiser, s, x_next)).x0
            d_next = (x_next - x0_next) / sigma_s  # d' = (x_s - D(x_s; sigma_s)) / sigma_s
            x_next = x + (sigma_s - sigma_hat) * (d + d_next) / 2  # x_s = x_hat + (sigma_s - sigma_hat) (d + d') / 2
        x = x_next
    return x  # sigma_0 = 0 and abar_0 = 1: x is x_0


@torch.inference_mode()
def euler_ancestral(
    denoiser: Denoiser, x_T, timesteps, *, y=None, guidance=1.0, generator=None, callback=None, s_noise: float = 1.0
) -> torch.Tensor:
    """Euler ancestral (Crowson's k-diffusion): DDPM's ancestral step in Karras et al.'s variables, an
    Euler step down to sigma_down followed by fresh noise of sigma_up,

    sigma_up = sigma_s sqrt(1 - sigma_s^2 / sigma_t^2), sigma_down = sqrt(sigma_s^2 - sigma_up^2) = sigma_s^2 / sigma_t,
    x_s = x_t + (sigma_down - sigma_t) d + s_noise sigma_up z,  d = (x_t - x0_hat) / sigma_t.

    First order; with s_noise = 1 it draws the same x_s as ddim with eta = 1 and ddpm with beta_tilde.
    """
    _check_s_noise(s_noise)
    run, schedule = _Runner(denoiser, y, guidance, callback), denoiser.schedule
    x = x_T / math.sqrt(_abar(denoiser, timesteps[0]))
    for i, t, s in _pairs(timesteps):
        sigma_t, sigma_s = sigma(schedule, t), sigma(schedule, s)
        x0_hat = run(i, t, _to_x_t(denoiser, t, x)).x0
        sigma_down = sigma_s**2 / sigma_t  # sigma_down = sqrt(sigma_s^2 - sigma_up^2) = sigma_s^2 / sigma_t
        sigma_up = math.sqrt(sigma_s**2 - sigma_down**2)  # sigma_up = sigma_s sqrt(1 - sigma_s^2 / sigma_t^2)
        d = (x - x0_hat) / sigma_t
        x = x + (sigma_down - sigma_t) * d  # x_s = x_t + (sigma_down - sigma_t) d + s_noise sigma_up z
        if sigma_up > 0:
            x = x + s_noise * sigma_up * _noise(x, generator)
    return x


# ---- UniPC (Zhao et al. 2023): a predictor and a corrector from the same evaluations ---------------

UNIPC_ORDERS = (2, 3)


@torch.inference_mode()
def unipc(
    denoiser: Denoiser, x_T, timesteps, *, y=None, guidance=1.0, generator=None, callback=None, order: int = 2
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023) with data prediction and their B_2(h) ("bh2"); n evaluations.

    With h = lambda_s - lambda_t, the estimates m_0 = x0_hat(x_t, t) and m_k at the k-th previous step,
    r_k = (lambda_k - lambda_t) / h and D_k = (m_k - m_0) / r_k:
    UniP-p:  x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) m_0 - alpha_s B(h) sum_k rho_k D_k,
    over the p - 1 previous steps; the network then evaluates m_s = x0_hat(x_s, s) once, and
    UniC-p:  the same update with one more term, D_p = m_s - m_0 (r_p = 1), and rho^c for p terms,
    where B(h) = e^{-h} - 1 and sum_k rho_k r_k^(j-1) = -h j! phi_{j+1}(-h) / B(h) for j = 1, 2, ...
    (exact for polynomials of degree < p, resp. <= p, in lambda). Accuracy order p + 1 (UniC raises
    UniP-p by one). Orders warm up and drop to first order as in dpm_solver_pp_2m (`_multistep_order`);
    the corrector is skipped at t_1, whose x0_hat ends sampling.
    """
    if order not in UNIPC_ORDERS:
        raise DdpmkitError(f"unipc's order must be 2 or 3, got {order!r}")
    run, x = _Runner(denoiser, y, guidance, callback), x_T
    m = [run(0, timesteps[0], x).x0]  # x0_hat at the steps visited so far, newest last
    lambdas = [_lambda(denoiser, timesteps[0])]
    for i, t, s in _pairs(timesteps):
        if s == 0:  # lambda_0 = inf: the step to t = 0 is x_0 = x0_hat(x_{t_1})
            return m[-1]
        a_t, a_s = _abar(denoiser, t), _abar(denoiser, s)
        h = _lambda(denoiser, s) - lambdas[-1]
        p = _multistep_order(order, i, h, lambdas[-1] - lambdas[-2] if i > 0 else None)
        r = [(lambdas[-1 - k] - lambdas[-1]) / h for k in range(1, p)]  # r_k = (lambda_k - lambda_t) / h
        D = [(m[-1 - k] - m[-1]) / r_k for k, r_k in enumerate(r, start=1)]  # D_k = (m_k - m_0) / r_k
        B = math.expm1(-h)  # B_2(h) = e^{-h} - 1 (with data prediction's sign of h)
        # the first-order (DDIM) part: x = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) m_0
        x_first = math.sqrt((1 - a_s) / (1 - a_t)) * x - math.sqrt(a_s) * B * m[-1]
        # UniP-p: x_s = x_first - alpha_s B(h) sum_k rho_k D_k
        x_pred = x_first - math.sqrt(a_s) * B * _weighted_sum(_unipc_rho(r, h, B), D, x)
        m_s = run(i + 1, s, x_pred).x0
        if s == timesteps[-1]:  # the corrected x_{t_1} would not be evaluated again
            x = x_pred
        else:  # UniC-p: x_s = x_first - alpha_s B(h) (sum_k rho^c_k D_k + rho^c_p (m_s - m_0))
            x = x_first - math.sqrt(a_s) * B * _weighted_sum(_unipc_rho([*r, 1.0], h, B), [*D, m_s - m[-1]], x)
        m.append(m_s)
        lambdas.append(_lambda(denoiser, s))
    return x


def _weighted_sum(weights: list[float], terms: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return sum((w * term for w, term in zip(weights, terms)), torch.zeros_like(like))


def _unipc_rho(r: list[float], h: float, B: float) -> list[float]:
    """Solve sum_k rho_k r_k^(j-1) = -h j! phi_{j+1}(-h) / B for j = 1..len(r)."""
    if not r:
        return []
    R = torch.tensor([[r_k ** (j - 1) for r_k in r] for j in range(1, len(r) + 1)], dtype=torch.float64)
    b = torch.tensor([-h * math.factorial(j) * _phi(j + 1, -h) / B for j in range(1, len(r) + 1)], dtype=torch.float64)
    return torch.linalg.solve(R, b).tolist()


def _phi(k: int, z: float) -> float:
    """phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1 / k!) / z: the weights of exponential
    integrators, int_0^1 e^{(1 - u) z} u^(k-1) / (k-1)! du."""
    value = math.expm1(z) / z
    for j in range(1, k):
        value = (value - 1 / math.factorial(j)) / z
    return value


SAMPLERS: dict[str, Callable] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "dpm++": dpm_solver_pp_2m,
    "dpm++sde": dpm_solver_pp_2m_sde,
    "euler": euler,
    "heun": heun,
    "euler-a": euler_ancestral,
    "unipc": unipc,
}


# network evaluations of n steps, where they are not n
def _heun_nfe(n: int, schedule=None, spacing: str = "uniform") -> int:
    """2n - 1 on Karras et al.'s grid; given the schedule and spacing, the steps it visits are counted
    (one evaluation for a step that enters the grid from above sigma_max, see `heun_corrects`)."""
    if schedule is None:
        return 2 * n - 1
    steps = spaced_steps(schedule.T, n, spacing, schedule)
    return n + sum(heun_corrects(schedule, t, s) for _, t, s in _pairs(steps))


NFE = {"heun": _heun_nfe}  # samplers that evaluate the network other than once per step


def nfe(name: str, n: int, schedule=None, spacing: str = "uniform") -> int:
    """The number of network evaluations sampler `name` makes in n steps (guidance batches both branches)."""
    return NFE[name](n, schedule, spacing) if name in NFE else n


COMMON_OPTIONS = ("y", "guidance", "generator", "callback")  # every sampler's keyword arguments


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise DdpmkitError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_options(name: str) -> list[str]:
    """The keyword options of sampler `name` beyond the common signature (e.g. ["eta"] for ddim)."""
    parameters = inspect.signature(get_sampler(name)).parameters.values()
    return [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in COMMON_OPTIONS]
