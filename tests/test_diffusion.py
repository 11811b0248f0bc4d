import pytest
import torch

from ddpmkit.core import diffusion as D
from ddpmkit.core import losses
from ddpmkit.core.schedules import cosine, linear
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


def test_min_snr_weights():
    sch = linear(1000)
    t = torch.tensor([1, 500, 1000])
    snr = D.snr(sch, t)
    w = losses.min_snr_weight("x0", sch, t, 5.0)
    assert torch.allclose(w, snr.clamp(max=5.0))
    w_eps = losses.min_snr_weight("eps", sch, t, 5.0)
    assert torch.allclose(w_eps, snr.clamp(max=5.0) / snr)
    assert float(w_eps[-1]) == pytest.approx(1.0)  # low SNR: eps loss unchanged


def test_sample_t_range():
    t = losses.sample_t(5000, 10, "cpu", torch.Generator().manual_seed(0))
    assert int(t.min()) == 1 and int(t.max()) == 10


def test_unknown_objective(sch):
    with pytest.raises(DdpmkitError):
        D.target("score", sch, torch.zeros(1), torch.ones(1, dtype=torch.long), torch.zeros(1))
