import pytest
import torch

from ddpmkit.core import diffusion as D
from ddpmkit.core import losses
from ddpmkit.core.denoiser import Denoiser
from ddpmkit.core.schedules import Schedule, cosine
from ddpmkit.errors import DdpmkitError


@pytest.fixture
def sch():
    return cosine(100)


def test_q_sample_marginal(sch):
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 40)
    x_t = D.q_sample(sch, x0, t, torch.randn(x0.shape, generator=g))
    abar = float(sch.alpha_bar[40])
    assert float(x_t.mean()) == pytest.approx(abar**0.5 * 0.7, abs=0.02)
    assert float(x_t.var()) == pytest.approx(1 - abar, rel=0.05)


def test_conversions_are_exact_inverses(sch):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    t = torch.randint(1, 101, (8,), generator=g)
    x_t = D.q_sample(sch, x0, t, eps)
    v = D.v_from(sch, t, x0, eps)
    for objective, out in (("eps", eps), ("x0", x0), ("v", v)):
        assert torch.allclose(D.target(objective, sch, x0, t, eps), out)
        x0_hat, eps_hat = D.to_x0_eps(objective, sch, x_t, t, out)
        assert torch.allclose(x0_hat, x0, atol=1e-3) and torch.allclose(eps_hat, eps, atol=1e-3)


def test_posterior_is_bayes_rule(sch):
    # q(x_s | x_t, x0) ∝ q(x_s | x0) q(x_t | x_s): product of two Gaussians in x_s
    x0, x_t = torch.tensor([[[[0.3]]]]), torch.tensor([[[[-0.5]]]])
    for t, s in ((50, 49), (50, 20), (3, 0)):
        tt, ss = torch.tensor([t]), torch.tensor([s])
        post = D.q_posterior(sch, x0, x_t, tt, ss)
        ab_s, ab_t = float(sch.alpha_bar[s]), float(sch.alpha_bar[t])
        a_ts = ab_t / ab_s
        if s == 0:
            assert float(post.variance) == pytest.approx(0, abs=1e-9)
            assert float(post.mean) == pytest.approx(0.3, abs=1e-5)
            continue
        precision = 1 / (1 - ab_s) + a_ts / (1 - a_ts)
        mean = (ab_s**0.5 * 0.3 / (1 - ab_s) + a_ts**0.5 * -0.5 / (1 - a_ts)) / precision
        assert float(post.variance) == pytest.approx(1 / precision, rel=1e-4)
        assert float(post.mean) == pytest.approx(mean, rel=1e-4)
    default = D.q_posterior(sch, x0, x_t, torch.tensor([50]))
    assert float(default.variance) == pytest.approx(float(sch.beta_tilde[50]), rel=1e-4)


def test_loss_is_zero_for_perfect_prediction_and_per_example(sch):
    out = torch.randn(4, 1, 3, 3)
    assert torch.equal(losses.loss_per_example(out, out), torch.zeros(4))
    loss = losses.loss_per_example(out, torch.zeros_like(out))
    assert loss.shape == (4,) and torch.allclose(loss, out.pow(2).flatten(1).mean(1))


# A schedule with known SNRs: alpha_bar_1..3 = 0.9, 0.5, 0.1, so SNR = 9, 1, 1/9
KNOWN_ALPHA_BAR = (0.9, 0.5, 0.1)


def known_snr_schedule():
    abar = torch.tensor((1.0, *KNOWN_ALPHA_BAR), dtype=torch.float64)
    return Schedule.from_betas(1 - abar[1:] / abar[:-1])  # beta_t = 1 - abar_t / abar_{t-1}


# min(SNR, 5) on the x0 error, i.e. / SNR on the eps error and / (SNR + 1) on the v error, by hand:
MIN_SNR_5 = {
    "x0": (5.0, 1.0, 1 / 9),  # min(9, 5), min(1, 5), min(1/9, 5)
    "eps": (5 / 9, 1.0, 1.0),  # 5 / 9, 1 / 1, (1/9) / (1/9)
    "v": (0.5, 0.5, 0.1),  # 5 / 10, 1 / 2, (1/9) / (10/9)
}


@pytest.mark.parametrize("objective", sorted(MIN_SNR_5))
def test_min_snr_weights_at_known_snrs(objective):
    sch, t = known_snr_schedule(), torch.tensor([1, 2, 3])
    assert torch.allclose(D.snr(sch, t).double(), torch.tensor([9.0, 1.0, 1 / 9], dtype=torch.float64), rtol=1e-6)
    weight = losses.min_snr_weight(objective, sch, t, 5.0)
    assert torch.allclose(weight.double(), torch.tensor(MIN_SNR_5[objective], dtype=torch.float64), rtol=1e-6)


def test_min_snr_weight_refuses_an_unknown_objective():
    with pytest.raises(DdpmkitError, match="unknown objective 'score'"):
        losses.min_snr_weight("score", known_snr_schedule(), torch.tensor([1]), 5.0)


class _Outputs(torch.nn.Module):
    """A 'network' that returns a fixed output whatever its input, and records the labels it sees."""

    def __init__(self, out):
        super().__init__()
        self.out, self.seen = out, []

    def forward(self, x_t, t, y=None, x_self_cond=None):
        self.seen.append(y)
        return self.out


def _fixed_batch_loss(objective, gamma, loss_kind=losses.SimpleLoss, learn_sigma=False):
    """The loss of a network that outputs zeros, on x0 = 0.5 everywhere with eps = 0, at t = 1, 2, 3."""
    sch, x0 = known_snr_schedule(), torch.full((3, 1, 2, 2), 0.5)
    out = torch.zeros(3, 2 if learn_sigma else 1, 2, 2)
    den = Denoiser(_Outputs(out), sch, objective, learn_sigma=learn_sigma, clip_x0=False)
    noise = losses.Noise(torch.tensor([1, 2, 3]), torch.zeros_like(x0), torch.ones(3, 2))
    return loss_kind(min_snr_gamma=gamma)(den, x0, None, noise)


@pytest.mark.parametrize("objective", sorted(MIN_SNR_5))
def test_the_loss_of_a_fixed_batch_with_and_without_min_snr(objective):
    """Targets with eps = 0: x0 = 0.5, eps = 0, v = -sqrt(1 - abar) 0.5, so the per-example squared
    error of a zero output is 0.25, 0 and 0.25 (1 - abar); min-SNR multiplies it by its weight."""
    unweighted = {"x0": [0.25] * 3, "eps": [0.0] * 3, "v": [0.25 * (1 - a) for a in KNOWN_ALPHA_BAR]}[objective]
    plain = _fixed_batch_loss(objective, None)
    weighted = _fixed_batch_loss(objective, 5.0)
    assert torch.allclose(plain.double(), torch.tensor(unweighted, dtype=torch.float64), atol=1e-7)
    expected = [u * w for u, w in zip(unweighted, MIN_SNR_5[objective])]
    assert torch.allclose(weighted.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-7)


def test_hybrid_loss_weights_its_l_simple_part_only():
    """--learn-sigma with min-SNR: L_hybrid = w(t) L_simple + lambda L_vlb (the bound is not reweighted)."""
    plain = _fixed_batch_loss("v", None, losses.HybridLoss, learn_sigma=True)
    weighted = _fixed_batch_loss("v", 5.0, losses.HybridLoss, learn_sigma=True)
    simple = torch.tensor([0.25 * (1 - a) for a in KNOWN_ALPHA_BAR], dtype=torch.float64)
    vlb = plain.double() - simple
    assert bool((vlb.abs() > 1e-6).all())  # the L_vlb part is there
    weight = torch.tensor(MIN_SNR_5["v"], dtype=torch.float64)
    assert torch.allclose(weighted.double(), weight * simple + vlb, atol=1e-6)


def test_sample_t_range():
    t = losses.sample_t(5000, 10, "cpu", torch.Generator().manual_seed(0))
    assert int(t.min()) == 1 and int(t.max()) == 10


def test_unknown_objective(sch):
    with pytest.raises(DdpmkitError):
        D.target("score", sch, torch.zeros(1), torch.ones(1, dtype=torch.long), torch.zeros(1))
