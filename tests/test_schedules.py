import math

import pytest
import torch

from ddpmkit.core.likelihood import prior_bpd
from ddpmkit.core.schedules import (
    KARRAS_RHO,
    KARRAS_SIGMA_MAX,
    MAX_PRIOR_BPD,
    SCHEDULES,
    SPACINGS,
    Schedule,
    build_schedule,
    check_prior,
    cosine,
    linear,
    prior_bpd_bound,
    sigma,
    step_at_sigma,
    timesteps,
)
from ddpmkit.errors import DdpmkitError
from ddpmkit.run.config import RunConfig, validate


def test_linear_matches_ho_et_al():
    sch = linear(1000)
    assert sch.T == 1000
    assert sch.beta[0] == 0 and sch.alpha_bar[0] == 1
    assert math.isclose(float(sch.beta[1]), 1e-4) and math.isclose(float(sch.beta[1000]), 0.02)
    assert torch.allclose(sch.beta[1:], torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


# alpha_bar_T of each registry schedule in closed form, computed here without the library (plain floats)


def _linear_alpha_bar_T(T: int) -> float:
    """improved-diffusion's rule: beta_t from 1e-4 to 0.02 scaled by 1000 / T, clipped at 0.999."""
    scale = 1000 / T
    betas = [min(0.999, scale * (1e-4 + (0.02 - 1e-4) * (t - 1) / max(T - 1, 1))) for t in range(1, T + 1)]
    return math.exp(math.fsum(math.log1p(-b) for b in betas))


def _cosine_alpha_bar_T(T: int, s: float = 0.008) -> float:
    """f(T) = cos^2(pi/2) = 0, so beta_T = 1 is clipped to 0.999: alpha_bar_T = 0.001 f(T - 1) / f(0)."""
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in (0, T - 1)]
    return (1 - 0.999) * f[1] / f[0]


CLOSED_FORM = {"linear": _linear_alpha_bar_T, "cosine": _cosine_alpha_bar_T}


@pytest.mark.parametrize("T", [10, 50, 100, 500, 1000, 4000])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_alpha_bar_T_of_every_schedule_at_any_T(name, T):
    assert name in CLOSED_FORM, f"add the closed-form alpha_bar_T of the {name} schedule to this test"
    alpha_bar_T = float(build_schedule(name, T).alpha_bar[T])
    assert alpha_bar_T == pytest.approx(CLOSED_FORM[name](T), rel=1e-9)
    assert math.sqrt(alpha_bar_T) < 0.01  # x_T is N(0, I) up to a trace of the image, at every T


@pytest.mark.parametrize("T", [50, 100, 500, 1000, 4000])
def test_linear_alpha_bar_T_stays_near_ho_et_al_at_any_T(T):
    """Scaling by 1000 / T keeps sum_t beta_t = 1000 (1e-4 + 0.02) / 2 = 10.05 at every T. With
    -log(1 - b) - b in [0, b^2] for b <= 1/2 and sum_t beta_t^2 < 140 / T (a ramp up to 20 / T):
    exp(-10.05 - 140 / T) < alpha_bar_T <= exp(-10.05) = 4.3e-5 (Ho et al.'s T = 1000: 4.04e-5).
    Unscaled, alpha_bar_T was 0.60 at T = 50 and 0.36 at T = 100."""
    sch = linear(T)
    assert float(sch.beta[1:].sum()) == pytest.approx(10.05, rel=1e-12)
    assert math.exp(-10.05 - 140 / T) < float(sch.alpha_bar[T]) <= math.exp(-10.05)


def test_a_schedule_that_leaves_signal_in_x_T_is_refused(monkeypatch):
    with pytest.raises(DdpmkitError, match=r"linear schedule with T = 1 keeps alpha_bar_T = 0\.9 ") as why:
        linear(1)  # one step of beta = 0.1 leaves 95% of the image's amplitude
    assert "\n" not in str(why.value) and "--timesteps" in str(why.value)
    weak = Schedule.from_betas(torch.full((100,), 0.01, dtype=torch.float64))  # alpha_bar_T = 0.99^100 = 0.37
    with pytest.raises(DdpmkitError, match="keeps alpha_bar_T = 0.366"):
        check_prior(weak)
    # the threshold: L_T <= 1e-3 bits/dim for any image in [-1, 1]; the bound is attained at |x0| = 1
    barely = Schedule.from_betas(torch.tensor([0.999, 0.5], dtype=torch.float64))  # alpha_bar_T = 5e-4
    assert check_prior(barely) is barely
    x0 = torch.ones(1, 1, 2, 2)
    assert float(prior_bpd(barely, x0)) == pytest.approx(prior_bpd_bound(barely), rel=1e-9)
    assert prior_bpd_bound(barely) < MAX_PRIOR_BPD < prior_bpd_bound(weak)
    config = RunConfig()
    config.diffusion.schedule, config.diffusion.timesteps, config.sample.steps = "linear", 1, 1
    with pytest.raises(DdpmkitError, match="alpha_bar_T"):
        validate(config)  # refused before any data is read or a network built


@pytest.mark.parametrize("T", [10, 500, 1000])
def test_cosine_matches_closed_form(T):
    sch, s = cosine(T), 0.008
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    closed = f / f[0]
    unclipped = sch.beta < 0.999  # clipping only changes the very last steps
    assert torch.allclose(sch.alpha_bar[unclipped], closed[unclipped], rtol=1e-9, atol=1e-12)
    assert float(sch.beta.max()) <= 0.999
    assert float(sch.beta[T]) == pytest.approx(0.999)  # cos^2 reaches 0 at T, so beta_T is clipped


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_derived_tensors(name):
    sch = build_schedule(name, 50)
    assert torch.allclose(sch.alpha, 1 - sch.beta)
    assert torch.allclose(sch.alpha_bar, torch.cumprod(sch.alpha, 0))
    assert torch.allclose(sch.alpha_bar_prev[1:], sch.alpha_bar[:-1])
    t = torch.arange(2, 51)
    expected = (1 - sch.alpha_bar[t - 1]) / (1 - sch.alpha_bar[t]) * sch.beta[t]
    assert torch.allclose(sch.beta_tilde[t], expected)
    assert sch.beta_tilde[1] == 0  # q(x_0 | x_1, x_0) is a point mass
    assert bool((sch.beta_tilde[1:] <= sch.beta[1:]).all())


def test_at_broadcasts():
    sch = linear(10)
    v = sch.at("alpha_bar", torch.tensor([1, 10]), ndim=4)
    assert v.shape == (2, 1, 1, 1) and v.dtype == torch.float32


@pytest.mark.parametrize("spacing", sorted(SPACINGS))
@pytest.mark.parametrize("T,n", [(1000, 10), (1000, 1), (50, 50), (20, 19), (500, 35), (7, 3)])
def test_spacings_are_valid(spacing, T, n):
    steps = timesteps(T, n, spacing, cosine(T))
    assert len(steps) == n
    assert all(a > b for a, b in zip(steps, steps[1:]))
    assert 1 <= min(steps) and max(steps) <= T


def test_spacing_shapes():
    assert timesteps(1000, 10, "trailing")[:3] == [1000, 900, 800]
    assert timesteps(1000, 10, "uniform")[0] == 1000 and timesteps(1000, 10, "uniform")[-1] == 1
    q = timesteps(1000, 10, "quadratic")
    assert q[-2] - q[-1] < q[0] - q[1]  # denser near t = 1


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_step_at_sigma_inverts_sigma(name):
    sch = build_schedule(name, 1000)
    t = torch.tensor([1.0, 2.0, 17.0, 500.0, 999.0, 1000.0], dtype=torch.float64)
    assert torch.allclose(step_at_sigma(sch, [sigma(sch, int(v)) for v in t]), t)
    between = step_at_sigma(sch, [(sigma(sch, 10) * sigma(sch, 11)) ** 0.5])  # the geometric mean
    assert 10 < float(between) < 11
    assert step_at_sigma(sch, [1e-9, 1e9]).tolist() == [1.0, 1000.0]  # clamped to [1, T]


@pytest.mark.parametrize("name", ["cosine", "linear"])
@pytest.mark.parametrize("n", [5, 12, 30])
def test_karras_spacing_follows_the_rho_7_sigmas(name, n):
    sch = build_schedule(name, 1000)
    steps = timesteps(1000, n, "karras", sch)
    assert steps[0] == 1000 and steps[-1] == 1  # from pure noise to the smallest noise level
    sigma_max = min(sigma(sch, 1000), KARRAS_SIGMA_MAX)
    lo, hi = sigma(sch, 1) ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    for i, t in enumerate(steps[1:], start=1):  # Karras et al. eq. 5, each on its nearest integer step
        target = (hi + i / (n - 1) * (lo - hi)) ** KARRAS_RHO
        assert sigma(sch, t + 1) > target > sigma(sch, t - 1) or t <= n - i  # (or pushed apart at the end)


def test_karras_spacing_caps_sigma_max():
    # the cosine schedule's clipped beta_T gives sigma_T ~ 2e4; from there rho = 7 would spend most steps
    # within a few steps of T. From min(sigma_T, 80) the second step is already below sigma = 80.
    sch = cosine(1000)
    assert sigma(sch, 1000) > 1e4
    steps = timesteps(1000, 10, "karras", sch)
    assert sigma(sch, steps[1]) < KARRAS_SIGMA_MAX and steps[1] < 990


def test_karras_spacing_needs_the_schedule():
    with pytest.raises(DdpmkitError, match="give the schedule"):
        timesteps(1000, 10, "karras")
    with pytest.raises(DdpmkitError, match="T = 50"):
        timesteps(1000, 10, "karras", cosine(50))


@pytest.mark.parametrize("bad", [dict(n=0), dict(n=11), dict(spacing="nope")])
def test_bad_spacing_args(bad):
    args = dict(T=10, n=5, spacing="uniform") | bad
    with pytest.raises(DdpmkitError):
        timesteps(**args)


def test_unknown_schedule():
    with pytest.raises(DdpmkitError, match="unknown schedule"):
        build_schedule("sigmoid", 10)
    with pytest.raises(DdpmkitError):
        linear(0)
