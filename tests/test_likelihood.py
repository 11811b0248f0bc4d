"""The variational bound: its pieces against closed forms and numerical integration, L_hybrid's
stop-gradient, and --learn-sigma end to end through the CLI."""

import json
import math

import pytest
import torch
from conftest import FAST, TINY_MODEL
from oracles import GaussianEpsNet

from ddpmkit.cli import main
from ddpmkit.core import samplers
from ddpmkit.core.denoiser import Denoiser
from ddpmkit.core.likelihood import (
    discretized_gaussian_log_likelihood,
    kl_blocks,
    nll_bpd,
    normal_kl,
    p_log_variance,
    prior_nats,
    vlb_terms,
)
from ddpmkit.core.losses import HybridLoss, Noise
from ddpmkit.core.schedules import cosine, linear

GRID = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 8-bit levels in [-1, 1]


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), expected, atol=1e-12)
    assert torch.allclose(normal_kl(m1, lv1, m1, lv1), torch.zeros(50, dtype=torch.float64))


def _bin_mass_by_trapezoid(x, mean, sigma, points=20001):
    """The N(mean, sigma^2) mass of x's bin, integrating the density with the trapezoid rule;
    the open end bins at -1 and 1 are integrated out to 12 sigma beyond the mean."""
    lo = x - 1 / 255 if x > -1 + 1e-9 else min(x, mean) - 12 * sigma
    hi = x + 1 / 255 if x < 1 - 1e-9 else max(x, mean) + 12 * sigma
    u = torch.linspace(lo, hi, points, dtype=torch.float64)
    density = torch.exp(-0.5 * ((u - mean) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return torch.trapezoid(density, u).item()


@pytest.mark.parametrize("mean,sigma", [(0.0, 0.02), (0.3, 0.004), (-0.97, 0.05), (0.999, 0.01), (0.5, 0.3)])
def test_discretized_likelihood_is_the_bin_integral(mean, sigma):
    levels = [0, 1, 2, 64, 127, 128, 130, 191, 253, 254, 255]
    x = GRID[levels]
    log_p = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(sigma)))
    for value, lp in zip(x.tolist(), log_p.tolist()):
        expected = _bin_mass_by_trapezoid(value, mean, sigma)
        if expected > 1e-200:
            assert lp == pytest.approx(math.log(expected), rel=1e-6, abs=1e-8), value


@pytest.mark.parametrize("mean,sigma", [(0.0, 1e-3), (0.42, 0.01), (-1.3, 0.2), (0.9, 2.0)])
def test_the_256_bins_sum_to_one(mean, sigma):
    log_p = discretized_gaussian_log_likelihood(
        GRID, torch.full_like(GRID, mean), torch.full_like(GRID, math.log(sigma))
    )
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_is_accurate_far_in_the_tails():
    """Bins 40 sigma away still get a finite log-probability (no log(0)) with a finite gradient."""
    x = GRID[[0, 128, 255]]
    mean = torch.full_like(x, 0.0).requires_grad_()
    log_scale = torch.full_like(x, math.log(0.02)).requires_grad_()
    log_p = discretized_gaussian_log_likelihood(x, mean, log_scale)
    assert torch.isfinite(log_p).all() and log_p[0] < -1000
    log_p.sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()


def test_p_variance_is_beta_tilde_or_the_learned_interpolation():
    s = cosine(20)
    t = torch.tensor([1, 2, 10, 20])
    like = torch.zeros(4, 1, 1, 1, dtype=torch.float64)
    fixed = p_log_variance(s, t, None, like).flatten()
    expected = s.beta_tilde[[2, 2, 10, 20]].log()  # beta_tilde_1 = 0 is replaced by beta_tilde_2
    assert torch.allclose(fixed, expected)
    top = p_log_variance(s, t, torch.ones_like(like), like).flatten()
    assert torch.allclose(top, s.beta[t].log())
    half = p_log_variance(s, t, torch.full_like(like, 0.5), like).flatten()
    assert torch.allclose(half, 0.5 * (fixed + top))


# ---- the exact denoiser of Gaussian data: closed forms for every term ---------------------------

MU, S = 0.05, 0.25


def _gaussian_denoiser(schedule):
    return Denoiser(GaussianEpsNet(schedule, MU, S), schedule, "eps", clip_x0=False)


def _expected_kl_per_dim(schedule, t):
    """E[L_{t-1}] per dimension for x0 ~ N(MU, S^2) and the exact denoiser, t >= 2.

    q and p share the variance beta_tilde_t, so KL = (mu_q - mu_p)^2 / (2 beta_tilde_t), and
    mu_q - mu_p = c (x0 - x0_hat) with c = sqrt(abar_{t-1}) beta_t / (1 - abar_t). For Gaussian data
    x0_hat = E[x0 | x_t], so E[(x0 - x0_hat)^2] = Var(x0 | x_t) = S^2 (1 - abar_t) / (abar_t S^2 + 1 - abar_t).
    """
    abar, abar_prev, beta = (float(v[t]) for v in (schedule.alpha_bar, schedule.alpha_bar_prev, schedule.beta))
    c = math.sqrt(abar_prev) * beta / (1 - abar)
    var_post = S**2 * (1 - abar) / (abar * S**2 + 1 - abar)
    return c**2 * var_post / (2 * float(schedule.beta_tilde[t]))


def _expected_prior_per_dim(schedule):
    """E[KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1))] = (-log(1 - abar_T) + (1 - abar_T) + abar_T E[x0^2] - 1) / 2."""
    abar = float(schedule.alpha_bar[-1])
    return 0.5 * (-math.log(1 - abar) + (1 - abar) + abar * (MU**2 + S**2) - 1)


def _expected_decoder_per_dim(schedule):
    """E[L_0] per dimension, by quadrature. At t = 1 the posterior mean with x0_hat is x0_hat itself
    (abar_0 = 1), so p(x0 | x_1) = N(x0_hat, beta_tilde_2) with error e = x0_hat - x0 ~ N(0, Var(x0 | x_1)),
    independent of x0; far from the edges -log P(bin) = -log(Phi((d - |e|)/sigma) - Phi((-d - |e|)/sigma)),
    d = 1/255. Integrated over e with the trapezoid rule, Phi(z) = erfc(-z / sqrt 2) / 2 (exact in the tail)."""
    abar = float(schedule.alpha_bar[1])
    v = S**2 * (1 - abar) / (abar * S**2 + 1 - abar)
    sigma = math.sqrt(float(schedule.beta_tilde[2]))
    e = torch.linspace(-8 * math.sqrt(v), 8 * math.sqrt(v), 20001, dtype=torch.float64)
    hi, lo = (1 / 255 - e.abs()) / sigma, (-1 / 255 - e.abs()) / sigma
    mass = 0.5 * (torch.erfc(-hi / math.sqrt(2)) - torch.erfc(-lo / math.sqrt(2)))
    weight = torch.exp(-0.5 * e**2 / v) / math.sqrt(2 * math.pi * v)
    return torch.trapezoid(-mass.log() * weight, e).item()


def _gaussian_grid_data(n, generator):
    """x0 ~ N(MU, S^2) rounded to the 8-bit grid (4 sigma from the edges: clipping never matters)."""
    x = MU + S * torch.randn(n, 1, 8, 8, generator=generator, dtype=torch.float64)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def test_each_kl_term_of_the_exact_denoiser_matches_its_closed_form():
    schedule = cosine(20)
    den = _gaussian_denoiser(schedule)
    g = torch.Generator().manual_seed(1)
    x0 = MU + S * torch.randn(512, 1, 8, 8, generator=g, dtype=torch.float64)
    for t in range(2, 21):
        terms = vlb_terms(den, x0, torch.tensor(t), torch.randn(x0.shape, generator=g, dtype=torch.float64)) / 64
        sem = terms.std().item() / math.sqrt(len(terms))
        assert terms.mean().item() == pytest.approx(_expected_kl_per_dim(schedule, t), abs=5 * sem), t
    prior = prior_nats(schedule, x0) / 64
    assert prior.mean().item() == pytest.approx(_expected_prior_per_dim(schedule), abs=5 * prior.std().item() / 22.6)


def test_bits_per_dim_of_the_exact_denoiser_matches_the_analytic_bound():
    """nll_bpd on grid data near N(MU, S^2) against prior + sum of KL terms + decoder, all analytic."""
    schedule = cosine(20)
    den = _gaussian_denoiser(schedule)
    x0 = _gaussian_grid_data(256, torch.Generator().manual_seed(2))
    out = nll_bpd(den, x0, batch_size=128, generator=torch.Generator().manual_seed(3))
    kl = sum(_expected_kl_per_dim(schedule, t) for t in range(2, 21))
    expected = (_expected_prior_per_dim(schedule) + kl + _expected_decoder_per_dim(schedule)) / math.log(2)
    assert out["bpd"] == pytest.approx(expected, abs=5 * out["bpd_sem"])
    assert out["decoder_bpd"] == pytest.approx(_expected_decoder_per_dim(schedule) / math.log(2), rel=0.02)
    assert out["kl_bpd"] == pytest.approx(kl / math.log(2), rel=0.03)
    assert out["bpd"] == pytest.approx(out["prior_bpd"] + out["decoder_bpd"] + out["kl_bpd"], rel=1e-9)
    assert out["t"] == list(range(1, 21)) and out["n"] == 256
    strided = nll_bpd(den, x0, stride=4, batch_size=128, generator=torch.Generator().manual_seed(3))
    assert strided["t"] == [1, 2, 6, 10, 14, 18]
    assert strided["bpd"] == pytest.approx(expected, abs=5 * strided["bpd_sem"])  # unbiased, noisier


def test_kl_blocks_cover_every_term_once():
    for T, k in ((20, 1), (20, 4), (1000, 7), (5, 10)):
        covered = [first + i for first, length in kl_blocks(T, k) for i in range(length)]
        assert covered == list(range(2, T + 1))
    assert kl_blocks(6, 1) == [(t, 1) for t in range(2, 7)]


def test_nll_refuses_images_off_the_grid():
    den = _gaussian_denoiser(linear(10))
    with pytest.raises(Exception, match="8-bit"):
        nll_bpd(den, torch.rand(2, 1, 4, 4) * 2 - 1)


# ---- L_hybrid ------------------------------------------------------------------------------------


class _FixedOutput(torch.nn.Module):
    """A 'network' that returns the given output whatever its input."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x_t, t, y=None, x_self_cond=None):
        return self.out


def _hybrid_case(T=30, seed=0):
    schedule = linear(T)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 256, (6, 1, 4, 4), generator=g).double() / 127.5 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 5, 11, 29, 30])
    from ddpmkit.core.diffusion import q_sample

    x_t = q_sample(schedule, x0, t, eps)
    out = torch.cat([torch.randn(x0.shape, generator=g), torch.rand(x0.shape, generator=g) * 2 - 1], 1)
    return schedule, x0.float(), x_t.float(), t, eps.float(), out.requires_grad_()


def hybrid_loss(schedule, objective, x0, x_t, t, eps, out):
    """L_hybrid of a network whose output is `out` whatever its input (x_t comes from t and eps)."""
    den = Denoiser(_FixedOutput(out), schedule, objective, learn_sigma=True, clip_x0=False)
    return HybridLoss()(den, x0, None, Noise(t, eps, torch.ones(len(t), 2)))


def test_hybrid_vlb_does_not_train_the_mean():
    schedule, x0, x_t, t, eps, out = _hybrid_case()
    loss = hybrid_loss(schedule, "eps", x0, x_t, t, eps, out)
    grad = torch.autograd.grad(loss.sum(), out)[0]
    simple = (out[:, :1] - eps).pow(2).flatten(1).mean(1)
    grad_simple = torch.autograd.grad(simple.sum(), out)[0]
    assert torch.allclose(grad[:, :1], grad_simple[:, :1], atol=1e-7)  # the mean half: L_simple only
    assert grad[:, 1:].abs().sum() > 0  # the variance half is trained by L_vlb


def test_hybrid_vlb_is_the_evaluation_bound():
    """(L_hybrid - L_simple) / (0.001 T) in nats per image equals vlb_terms with the same output."""
    schedule, x0, x_t, t, eps, out = _hybrid_case()
    out = out.detach()
    loss = hybrid_loss(schedule, "eps", x0, x_t, t, eps, out)
    simple = (out[:, :1] - eps).pow(2).flatten(1).mean(1)
    den = Denoiser(_FixedOutput(out), schedule, "eps", learn_sigma=True, clip_x0=False)
    nats = vlb_terms(den, x0.double(), t, eps.double())
    assert torch.allclose((loss - simple) / (0.001 * schedule.T) * 16 * math.log(2), nats.float(), rtol=1e-4)


def test_learn_sigma_trains_through_the_cli_and_ddpm_samples_use_it(tmp_path, tiny_mnist, monkeypatch, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--out",
                str(run),
                "--dataset",
                "mnist",
                "--data-dir",
                str(tiny_mnist),
                *TINY_MODEL,
                *FAST,
                "--steps",
                "30",
                "--learn-sigma",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    assert json.loads((run / "config.json").read_text())["diffusion"]["learn_sigma"] is True
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    seen = []
    original = samplers._ddpm_sigma

    def spy(pred, *args):
        seen.append(pred.var_frac is not None)
        return original(pred, *args)

    monkeypatch.setattr(samplers, "_ddpm_sigma", spy)
    assert (
        main(["sample", str(run), "--sampler", "ddpm", "--steps", "5", "--n", "4", "--out", str(tmp_path / "s.png")])
        == 0
    )
    assert len(seen) == 4 and all(seen)  # every noised step (s > 0) used the learned variance
