"""Every sampler against the exact denoiser of Gaussian data (a known answer)."""

import math

import pytest
import torch
from oracles import GaussianEpsNet, exact_ode_solution

from ddpmkit.core.denoiser import Denoiser
from ddpmkit.core.samplers import SAMPLERS, Trajectory, ddim, ddpm, dpm_solver_pp_2m, get_sampler
from ddpmkit.core.schedules import cosine, linear, timesteps
from ddpmkit.errors import DdpmkitError

MU, S = 0.4, 0.3


def gaussian_denoiser(schedule):
    return Denoiser(GaussianEpsNet(schedule, MU, S), schedule, "eps", clip_x0=False)


def x_T(n=4000, seed=0):
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "name,kwargs,n_steps",
    [
        ("ddpm", {"variance": "beta_tilde"}, 200),
        ("ddpm", {"variance": "beta"}, 200),
        ("ddim", {"eta": 0.0}, 50),
        ("ddim", {"eta": 1.0}, 200),
        ("ddim", {"eta": 0.5}, 100),
        ("dpm++", {}, 15),
    ],
)
def test_samplers_recover_the_gaussian(name, kwargs, n_steps):
    sch = cosine(200)
    steps = timesteps(200, n_steps, "quadratic" if name == "dpm++" else "uniform")
    out = SAMPLERS[name](gaussian_denoiser(sch), x_T(), steps, generator=torch.Generator().manual_seed(1), **kwargs)
    assert float(out.mean()) == pytest.approx(MU, abs=0.01)
    assert float(out.std()) == pytest.approx(S, rel=0.05)


def test_deterministic_samplers_converge_to_the_ode_solution():
    sch = linear(1000)
    den, xT = gaussian_denoiser(sch), x_T(256)
    exact = exact_ode_solution(sch, xT, MU, S)
    errors = {}
    for name in ("ddim", "dpm++"):
        for n in (5, 10, 20, 100):
            out = SAMPLERS[name](den, xT, timesteps(1000, n, "quadratic"))
            errors[name, n] = float((out - exact).abs().max())
        assert errors[name, 5] > errors[name, 20] > errors[name, 100]
    assert errors["dpm++", 100] < 2e-3 and errors["ddim", 100] < 5e-2
    assert errors["dpm++", 10] < errors["ddim", 10]  # second order beats first order
    assert errors["dpm++", 20] < errors["ddim", 20] / 2


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_determinism_and_callbacks(name):
    sch = cosine(50)
    den = gaussian_denoiser(sch)
    steps = timesteps(50, 7)
    runs = []
    for _ in range(2):
        traj = Trajectory()
        out = SAMPLERS[name](den, x_T(16), steps, generator=torch.Generator().manual_seed(3), callback=traj)
        runs.append(out)
        assert len(traj.t) == 7 and traj.t == steps
        assert traj.x_t[0].shape == (16, 1, 4, 4) and len(traj.x0_hat) == 7
    assert torch.equal(runs[0], runs[1])


def test_ddim_eta_zero_ignores_generator():
    sch = cosine(50)
    den = gaussian_denoiser(sch)
    a = ddim(den, x_T(8), timesteps(50, 10), generator=torch.Generator().manual_seed(1))
    b = ddim(den, x_T(8), timesteps(50, 10), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = ddpm(den, x_T(8), timesteps(50, 10), generator=torch.Generator().manual_seed(2))
    d = ddpm(den, x_T(8), timesteps(50, 10), generator=torch.Generator().manual_seed(3))
    assert not torch.equal(c, d)


def test_last_step_returns_x0_hat():
    sch = cosine(20)
    den = gaussian_denoiser(sch)
    for sampler in (ddim, ddpm, dpm_solver_pp_2m):
        traj = Trajectory()
        out = sampler(den, x_T(4), [20, 10, 1], callback=traj)
        assert torch.allclose(out, traj.x0_hat[-1], atol=1e-6)


def test_bad_arguments():
    den = gaussian_denoiser(cosine(20))
    with pytest.raises(DdpmkitError):
        ddim(den, x_T(2), [5, 10])  # not decreasing
    with pytest.raises(DdpmkitError):
        ddim(den, x_T(2), [5], eta=1.5)
    with pytest.raises(DdpmkitError):
        get_sampler("euler_a")


def _ddpm_output_law(schedule, steps, variance):
    """Mean and variance of ddpm's output on Gaussian data, in closed form (scalars, float64).

    Every step is affine in x_t plus independent noise: x0_hat = mu + k (x_t - sqrt(abar_t) mu) with
    k = sqrt(abar_t) s^2 / (abar_t s^2 + 1 - abar_t) (the oracle), x_s = c0 x0_hat + c1 x_t + sigma z
    (the posterior q(x_s | x_t, x0_hat) of any pair s < t), so a Gaussian x_T stays Gaussian."""
    m, v = 0.0, 1.0  # x_T ~ N(0, 1)
    for t, s in zip(steps, [*steps[1:], 0]):
        a_t, a_s = float(schedule.alpha_bar[t]), float(schedule.alpha_bar[s])
        k = math.sqrt(a_t) * S**2 / (a_t * S**2 + 1 - a_t)
        beta_ts = 1 - a_t / a_s
        c0, c1 = math.sqrt(a_s) * beta_ts / (1 - a_t), math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t)
        sigma2 = 0.0 if s == 0 else beta_ts if variance == "beta" else (1 - a_s) / (1 - a_t) * beta_ts
        m = c0 * (MU + k * (m - math.sqrt(a_t) * MU)) + c1 * m
        v = (c0 * k + c1) ** 2 * v + sigma2
    return m, v


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
@pytest.mark.parametrize("n_steps", [10, 50, 100])
def test_respaced_ddpm_has_the_known_output_law(n_steps, variance):
    """Respaced DDPM on the exact denoiser of Gaussian data, at 10, 50 and all T = 100 steps: the
    samples' mean and std match the closed form (std 0.21 at 10 steps, 0.28 at 100 with beta_tilde;
    the data's is 0.3), so a wrong beta_{t|s}, mean coefficient or variance would show."""
    sch = cosine(100)
    steps = timesteps(100, n_steps)
    out = ddpm(gaussian_denoiser(sch), x_T(2000), steps, generator=torch.Generator().manual_seed(1), variance=variance)
    mean, var = _ddpm_output_law(sch, steps, variance)
    assert float(out.mean()) == pytest.approx(mean, abs=0.006)
    assert float(out.std()) == pytest.approx(math.sqrt(var), rel=0.015)
