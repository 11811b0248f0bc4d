"""The variational bound of Ho et al. 2020 (eq. 5) in bits per dimension.

    -log p(x0) <= L_T + sum_{t>1} L_{t-1} + L_0
    L_T     = KL(q(x_T | x0) || N(0, I))                         (the prior term, no parameters)
    L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))          t = 2..T
    L_0     = -log p(x0 | x_1)   (the discretized Gaussian decoder, eq. 13)

p(x_{t-1} | x_t) = N(mu_tilde(x_t, x0_hat), sigma_t^2): its mean is the posterior mean with the
denoiser's x0_hat plugged in. Its variance, the choice this module makes:
  * a model trained with learned variances (Prediction.var_frac = v) uses Nichol & Dhariwal's
    log sigma_t^2 = v log beta_t + (1 - v) log beta_tilde_t   (their eq. 15);
  * otherwise sigma_t^2 = beta_tilde_t, the true posterior variance ("fixed small" in DDPM).
beta_tilde_1 = 0 would make the decoder a point mass, so, as improved-diffusion does, the log of
beta_tilde_1 is replaced by that of beta_tilde_2 everywhere here. Samplers: `ddpm` uses the learned
variance through var_frac; `ddim` and `dpm++` fix their own noise (eta, or none) by definition.

Everything is in nats per example until `nll_bpd` divides by D ln 2.
"""

from __future__ import annotations

import math

import torch

from ddpmkit.core import diffusion
from ddpmkit.core.pixels import to_model_range, to_uint8
from ddpmkit.core.schedules import Schedule
from ddpmkit.errors import DdpmkitError
from ddpmkit.progress import maybe_tqdm

BIN_HALF_WIDTH = 1.0 / 255  # 8-bit data in [-1, 1]: bins of width 2/255 around each level


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats.

    = 1/2 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^(-logvar2) - 1)
    """
    logvar1, logvar2 = torch.as_tensor(logvar1), torch.as_tensor(logvar2)
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _log_normal_mass(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for standardised a < b, accurate in both tails; a may be -inf or b +inf.

    log Phi(b) + log(1 - Phi(a) / Phi(b)), mirrored to (-b, -a) above the mean so that Phi is only
    ever taken where it is not close to 1. Open ends get finite stand-ins in the branches that do not
    use them, so that no gradient meets an infinity.
    """
    log_ndtr = torch.special.log_ndtr
    a_open, b_open = torch.isneginf(a), torch.isposinf(b)
    a_fin = torch.where(a_open, b - 1, a)
    b_fin = torch.where(b_open, a_fin + 1, b)
    above = a_fin > 0
    lo, hi = torch.where(above, -b_fin, a_fin), torch.where(above, -a_fin, b_fin)
    closed = log_ndtr(hi) + torch.log(-torch.expm1(log_ndtr(lo) - log_ndtr(hi)))
    return torch.where(
        a_open,
        log_ndtr(torch.where(a_open, b, 0.0)),
        torch.where(b_open, log_ndtr(-torch.where(b_open, a, 0.0)), closed),
    )


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) elementwise for x on the 256-level grid of [-1, 1] under N(mean, e^(2 log_scale)).

    P(x) = integral of the density over [x - 1/255, x + 1/255], with the outer edges open:
    the bin of -1 starts at -inf and the bin of 1 ends at +inf (DDPM eq. 13).
    """
    inv_scale = torch.exp(-log_scale)
    upper = torch.where(x > 1 - BIN_HALF_WIDTH, torch.full_like(x, math.inf), (x - mean + BIN_HALF_WIDTH) * inv_scale)
    lower = torch.where(x < -1 + BIN_HALF_WIDTH, torch.full_like(x, -math.inf), (x - mean - BIN_HALF_WIDTH) * inv_scale)
    return _log_normal_mass(lower, upper)


# ---- the terms --------------------------------------------------------------------------------


def clipped_log_beta_tilde(schedule: Schedule) -> torch.Tensor:
    """log beta_tilde_t for t = 0..T with the zero at t = 1 replaced by beta_tilde_2 (float64)."""
    beta_tilde = schedule.beta_tilde.clone()
    beta_tilde[1] = beta_tilde[2] if schedule.T >= 2 else schedule.beta[1]
    beta_tilde[0] = beta_tilde[1]
    return beta_tilde.log()


def p_log_variance(schedule: Schedule, t: torch.Tensor, var_frac: torch.Tensor | None, like: torch.Tensor):
    """log sigma_t^2 of p(x_{t-1} | x_t): beta_tilde_t, or v log beta_t + (1 - v) log beta_tilde_t."""
    log_bt = clipped_log_beta_tilde(schedule).to(t.device)[t].to(like.dtype).reshape(-1, *[1] * (like.ndim - 1))
    if var_frac is None:
        return log_bt
    log_beta = schedule.beta.log().to(t.device)[t].to(like.dtype).reshape(log_bt.shape)
    return var_frac * log_beta + (1 - var_frac) * log_bt


def _terms(schedule: Schedule, x0, x_t, t, x0_hat, var_frac) -> torch.Tensor:
    """L_{t-1} (t > 1) or L_0 (t = 1) in nats per example [B], given the denoiser's x0_hat and v."""
    x0, x_t, x0_hat = x0.double(), x_t.double(), x0_hat.double()
    var_frac = None if var_frac is None else var_frac.double()
    mean_q, _ = diffusion.q_posterior(schedule, x0, x_t, t)
    mean_p, _ = diffusion.q_posterior(schedule, x0_hat, x_t, t)  # mu_theta = mu_tilde(x_t, x0_hat)
    logvar_q = p_log_variance(schedule, t, None, x0)
    logvar_p = p_log_variance(schedule, t, var_frac, x0)
    kl = normal_kl(mean_q, logvar_q, mean_p, logvar_p).flatten(1).sum(1)
    decoder = -discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * logvar_p).flatten(1).sum(1)
    return torch.where(t == 1, decoder, kl)


def vlb_terms(denoiser, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, y=None) -> torch.Tensor:
    """L_{t-1} for t > 1 and L_0 for t = 1, in nats per example [B], with x_t = q_sample(x0, t, eps)."""
    t = torch.as_tensor(t, device=x0.device, dtype=torch.long).expand(x0.shape[0])
    x_t = diffusion.q_sample(denoiser.schedule, x0, t, eps)
    pred = denoiser(x_t, t, y)
    return _terms(denoiser.schedule, x0, x_t, t, pred.x0, pred.var_frac)


def prior_nats(schedule: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) summed over dimensions, nats [B]."""
    abar_T = schedule.alpha_bar[-1].item()
    mean = math.sqrt(abar_T) * x0.double()
    logvar_T = torch.tensor(math.log(1 - abar_T), dtype=torch.float64)
    return normal_kl(mean, logvar_T, torch.zeros_like(mean), torch.zeros_like(logvar_T)).flatten(1).sum(1)


def prior_bpd(schedule: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T in bits per dimension [B]."""
    return prior_nats(schedule, x0) / (x0[0].numel() * math.log(2))


# ---- training: the L_vlb part of L_hybrid ------------------------------------------------------


def vlb_term_of_output(schedule: Schedule, x0, x_t, t, x0_hat, var_frac) -> torch.Tensor:
    """T L_t per example [B] in bits per dimension: the one-sample estimate of L_vlb = sum_t L_t at the
    sampled t that L_hybrid adds (the mean x0_hat should come through a stop-gradient)."""
    l_t = _terms(schedule, x0, x_t, t, x0_hat, var_frac)
    return schedule.T * l_t / (x0[0].numel() * math.log(2))


# ---- evaluation: bits per dimension -------------------------------------------------------------


def kl_blocks(T: int, stride: int) -> list[tuple[int, int]]:
    """(first t, length) of consecutive blocks of `stride` steps covering the KL terms t = 2..T."""
    return [(start, min(stride, T + 1 - start)) for start in range(2, T + 1, stride)]


def bound_blocks(T: int, stride: int) -> list[tuple[int, int]]:
    """The blocks nll_bpd evaluates one network pass per image for: L_0 (t = 1) alone, then kl_blocks."""
    return [(1, 1)] + kl_blocks(T, stride)


def as_grid_images(x0: torch.Tensor) -> torch.Tensor:
    """uint8 images, or floats in [-1, 1] already on the 8-bit grid -> floats in [-1, 1] (exactly on the grid)."""
    if x0.dtype == torch.uint8:
        return to_model_range(x0)
    on_grid = to_model_range(to_uint8(x0))
    if x0.numel() and (on_grid - x0).abs().max() > 1e-3:
        raise DdpmkitError("bits/dim needs 8-bit images: uint8, or floats in [-1, 1] on the 256-level grid")
    return on_grid


@torch.inference_mode()
def nll_bpd(
    denoiser,
    x0: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    stride: int = 1,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> dict:
    """The variational bound on -log2 p(x0) per dimension, averaged over the images.

    stride 1 evaluates every term (one draw of x_t per image and t). stride k splits t = 2..T into
    blocks of k steps and evaluates, per image, one t drawn uniformly in each block, weighted by the
    block's length: stratified sampling, an unbiased estimate of the sum. L_T and L_0 are always exact.
    The noise comes from `generator` (a CPU generator).
    """
    if stride < 1:
        raise DdpmkitError(f"the bits/dim stride must be >= 1, got {stride}")
    schedule, device = denoiser.schedule, next(denoiser.parameters(), torch.empty(0)).device
    x0 = as_grid_images(x0)
    blocks = bound_blocks(schedule.T, stride)
    dims_ln2 = x0[0].numel() * math.log(2)
    prior, decoder, kl, per_block = [], [], [], torch.zeros(len(blocks), dtype=torch.float64)
    for start in maybe_tqdm(range(0, len(x0), batch_size), progress, "bits/dim"):
        xb = x0[start : start + batch_size].to(device)
        yb = None if y is None else y[start : start + batch_size].to(device)
        prior.append(prior_nats(schedule, xb).cpu())
        batch_kl = torch.zeros(len(xb), dtype=torch.float64)
        for i, (first, length) in enumerate(blocks):
            t = first + torch.randint(0, length, (len(xb),), generator=generator)
            eps = torch.randn(xb.shape, generator=generator)
            term = vlb_terms(denoiser, xb, t.to(device), eps.to(device), yb).cpu()
            per_block[i] += term.sum()
            if first == 1:
                decoder.append(term)
            else:
                batch_kl += length * term
        kl.append(batch_kl)
    return _summary(torch.cat(prior), torch.cat(decoder), torch.cat(kl), per_block / len(x0), blocks, dims_ln2, stride)


def _summary(prior, decoder, kl, per_block, blocks, dims_ln2, stride) -> dict:
    total = (prior + decoder + kl) / dims_ln2
    n = len(total)
    return {
        "bpd": total.mean().item(),
        "bpd_sem": (total.std() / math.sqrt(n)).item() if n > 1 else float("nan"),
        "prior_bpd": (prior.mean() / dims_ln2).item(),
        "decoder_bpd": (decoder.mean() / dims_ln2).item(),
        "kl_bpd": (kl.mean() / dims_ln2).item(),
        "n": n,
        "stride": stride,
        "t": [first for first, _ in blocks],  # each block's first step, and its mean term:
        "term_bpd": (per_block / dims_ln2).tolist(),
    }
