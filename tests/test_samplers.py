"""Every sampler against the exact denoiser of Gaussian data (a known answer), and through the CLI."""

import math

import numpy as np
import pytest
import torch
from conftest import FAST, TINY_MODEL, make_idx_dataset
from oracles import (
    GaussianEpsNet,
    exact_ode_at,
    exact_ode_solution,
    final_law,
    log_snr_linear,
    output_law,
)

from ddpmkit.cli import main
from ddpmkit.core import samplers
from ddpmkit.core.denoiser import Denoiser
from ddpmkit.core.samplers import (
    SAMPLERS,
    Trajectory,
    ddim,
    ddpm,
    dpm_solver_pp_2m,
    dpm_solver_pp_2m_sde,
    euler,
    euler_ancestral,
    get_sampler,
    heun,
    heun_corrects,
    nfe,
    unipc,
)
from ddpmkit.core.schedules import SPACINGS, cosine, linear, sigma, timesteps
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
        ("dpm++sde", {}, 30),
        ("euler", {}, 50),
        ("heun", {}, 20),
        ("heun", {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}, 50),  # EDM's ImageNet setting
        ("euler-a", {}, 200),
        ("unipc", {"order": 2}, 15),
        ("unipc", {"order": 3}, 15),
    ],
)
def test_samplers_recover_the_gaussian(name, kwargs, n_steps):
    sch = cosine(200)
    spacing = {"dpm++": "quadratic", "heun": "karras", "unipc": "quadratic"}.get(name, "uniform")
    steps = timesteps(200, n_steps, spacing, sch)
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


# ---- convergence orders ---------------------------------------------------------------------------
# On a schedule linear in lambda every spacing refines every step as n grows, so the error of a
# solver of order p falls as n^-p at every spacing. (On the cosine and linear schedules the last steps
# of uniform and trailing spacing do not shrink with n: see oracles.log_snr_linear.) The error is
# taken against x0_hat at the exact x_{t_1}: every sampler's last step, t_1 -> 0, is x_0 = x0_hat(x_{t_1}).

ORDER_STEPS = (64, 128, 256)
ODE_SOLVERS = [  # (name, options, order of the global error)
    ("ddim", {}, 1),
    ("euler", {}, 1),
    ("dpm++", {}, 2),
    ("heun", {}, 2),
    ("unipc", {"order": 2}, 3),
    ("unipc", {"order": 3}, 4),
]


def fitted_order(ns, errors) -> float:
    """Minus the least-squares slope of log(error) against log(n)."""
    xs, ys = [math.log(n) for n in ns], [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return -sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


@pytest.fixture(scope="module")
def lsl():
    sch = log_snr_linear(1000)
    xT = torch.linspace(-3, 3, 16, dtype=torch.float64).reshape(16, 1, 1, 1)
    return sch, gaussian_denoiser(sch), xT


@pytest.mark.parametrize("spacing", sorted(SPACINGS))
@pytest.mark.parametrize("name,options,order", ODE_SOLVERS, ids=[f"{s[0]}{s[1].get('order', '')}" for s in ODE_SOLVERS])
def test_ode_samplers_converge_at_their_order(lsl, name, options, order, spacing):
    sch, den, xT = lsl
    errors = []
    for n in ORDER_STEPS:
        steps = timesteps(sch.T, n, spacing, sch)
        target = den(exact_ode_at(sch, xT, steps[-1], MU, S), steps[-1]).x0
        errors.append(float((SAMPLERS[name](den, xT, steps, **options) - target).abs().max()))
    assert errors[0] > errors[1] > errors[2]
    assert abs(fitted_order(ORDER_STEPS, errors) - order) <= 0.2 * order, errors


LAW_STEPS = (32, 64, 128)
STOCHASTIC = [  # weak order: the law of the output, N(mean, var), against the exact one
    ("euler-a", {}, 1),
    ("dpm++sde", {}, 2),
    ("euler", {"s_churn": 5.0}, 1),
    ("heun", {"s_churn": 5.0}, 2),
]


@pytest.mark.parametrize("spacing", ["uniform", "karras"])
@pytest.mark.parametrize("name,options,order", STOCHASTIC, ids=[s[0] + ("-churn" if s[1] else "") for s in STOCHASTIC])
def test_stochastic_samplers_converge_in_law_at_their_order(lsl, name, options, order, spacing):
    sch, den, _ = lsl
    distances = []
    for n in LAW_STEPS:
        steps = timesteps(sch.T, n, spacing, sch)
        mean, var = output_law(SAMPLERS[name], den, steps, MU, S, max_draws=n, **options)
        exact_mean, exact_var = final_law(sch, steps[-1], MU, S)
        distances.append(math.hypot(mean - exact_mean, math.sqrt(var) - math.sqrt(exact_var)))  # W2 of Gaussians
    assert abs(fitted_order(LAW_STEPS, distances) - order) <= 0.2 * order, distances


def test_the_law_is_exact_arithmetic():
    """output_law gives the same mean and variance as many draws do (a check of the oracle itself)."""
    sch = cosine(200)
    den, steps = gaussian_denoiser(sch), timesteps(200, 8, "uniform")
    mean, var = output_law(euler_ancestral, den, steps, MU, S, max_draws=8)
    xT = x_T(20000).double()
    out = euler_ancestral(den, xT, steps, generator=torch.Generator().manual_seed(0))
    assert float(out.mean()) == pytest.approx(mean, abs=3e-3)
    assert float(out.var()) == pytest.approx(var, rel=2e-2)


# ---- DPM-Solver++(2M)'s first-order steps (issue 14) --------------------------------------------------


def second_order_after_the_first(order, i, h, h_prev):  # Lu et al.'s rule from 15 steps on
    return 1 if i == 0 else min(order, i + 1)


def first_order_into_t1(steps):  # ddpmkit's rule before issue 14: the step into t_1 always first order
    return lambda order, i, h, h_prev: 1 if i in (0, len(steps) - 2) else min(order, i + 1)


@pytest.mark.parametrize("spacing", ["trailing", "quadratic", "karras"])
def test_dpm_solver_stays_second_order_into_t1(spacing, monkeypatch):
    """The step t_2 -> t_1 is second order unless it is more than twice as long as the one before it.
    With the cosine schedule, trailing spacing and 20 steps, a first-order step there doubled the error."""
    sch = cosine(1000)
    den, xT = gaussian_denoiser(sch), x_T(256).double()
    steps = timesteps(1000, 20, spacing, sch)
    traj = Trajectory()
    out = dpm_solver_pp_2m(den, xT, steps, callback=traj)
    assert not torch.allclose(out, ddim(den, traj.x_t[-2].double(), steps[-2:]))  # not a DDIM step into t_1
    if spacing == "trailing":  # the example: 7.0e-2 with the first-order step, 3.0e-2 without
        error = float((out - exact_ode_solution(sch, xT, MU, S)).abs().max())
        monkeypatch.setattr(samplers, "_multistep_order", first_order_into_t1(steps))
        before = float((dpm_solver_pp_2m(den, xT, steps) - exact_ode_solution(sch, xT, MU, S)).abs().max())
        assert error < 0.04 and before > 1.8 * error


def test_dpm_solver_takes_uniform_spacings_last_step_at_first_order(monkeypatch):
    """Uniform spacing's last step (t_2 ~ T/n -> 1) is far longer in lambda than the one before it: there
    the extrapolation overshoots, so it stays first order; second order would multiply the error by 5+."""
    sch = cosine(1000)
    den, xT = gaussian_denoiser(sch), x_T(256).double()
    steps = timesteps(1000, 30, "uniform")
    target = den(exact_ode_at(sch, xT, 1, MU, S), 1).x0
    traj = Trajectory()
    out = dpm_solver_pp_2m(den, xT, steps, callback=traj)
    assert torch.allclose(out, ddim(den, traj.x_t[-2].double(), steps[-2:]))
    error = float((out - target).abs().max())
    monkeypatch.setattr(samplers, "_multistep_order", second_order_after_the_first)
    assert error < 1e-2 and float((dpm_solver_pp_2m(den, xT, steps) - target).abs().max()) > 5 * error


# ---- identities and bookkeeping ---------------------------------------------------------------------


def test_euler_is_ddim_and_euler_ancestral_is_ddim_with_eta_one():
    """Karras et al.: DDIM is Euler's method in sigma; the ancestral step is DDIM's eta = 1 step."""
    sch = cosine(100)
    den, xT = gaussian_denoiser(sch), x_T(64).double()
    steps = timesteps(100, 12, "karras", sch)
    assert torch.allclose(euler(den, xT, steps), ddim(den, xT, steps), atol=1e-10)
    a = euler_ancestral(den, xT, steps, generator=torch.Generator().manual_seed(5))
    b = ddim(den, xT, steps, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-10)


def test_dpm_solver_sde_first_order_step_is_the_ddpm_step():
    sch = cosine(100)
    den, xT = gaussian_denoiser(sch), x_T(64).double()
    a = dpm_solver_pp_2m_sde(den, xT, [60, 20], generator=torch.Generator().manual_seed(5))
    b = ddpm(den, xT, [60, 20], generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-10)
    three = [dpm_solver_pp_2m_sde(den, xT, [60, 30, 20], generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(three[0], three[1])
    assert not torch.allclose(three[0], ddpm(den, xT, [60, 30, 20], generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_network_evaluations(name):
    sch = cosine(50)
    den = gaussian_denoiser(sch)
    for n in (1, 2, 7):
        den.net.calls = 0
        SAMPLERS[name](den, x_T(4), timesteps(50, n), generator=torch.Generator().manual_seed(0))
        assert den.net.calls == nfe(name, n, sch, "uniform")
    assert nfe("heun", 7) == 13 and nfe("unipc", 7) == 7  # on Karras et al.'s own grid


def test_heun_enters_the_karras_grid_with_one_euler_step():
    """From t = T, where the cosine schedule's sigma_T ~ 2e4 is above sigma_max = 80, Heun's first step
    is a single evaluation (the trapezoid over a 250-fold drop in sigma amplified x0_hat's change ~125x
    and drew noise on a trained model); on the grid below sigma_max it corrects as Algorithm 1."""
    sch = cosine(1000)
    steps = timesteps(1000, 8, "karras", sch)
    assert sigma(sch, steps[0]) > 80 >= sigma(sch, steps[1])
    assert not heun_corrects(sch, steps[0], steps[1]) and heun_corrects(sch, steps[1], steps[2])
    den = gaussian_denoiser(sch)
    den.net.calls = 0
    heun(den, x_T(4), steps)
    assert den.net.calls == nfe("heun", 8, sch, "karras") == 2 * 8 - 2


def test_churn_raises_the_noise_level_on_the_grid():
    sch = cosine(1000)
    den = gaussian_denoiser(sch)
    steps = timesteps(1000, 10, "karras", sch)
    traj = Trajectory()
    churn = {"s_churn": 1.0, "s_tmin": 0.05, "s_tmax": 50.0}  # gamma = S_churn / n = 0.1
    heun(den, x_T(4), steps, **churn, generator=torch.Generator().manual_seed(0), callback=traj)
    for t, t_hat in zip(steps, traj.t):  # the network sees x_hat at t_hat, the step nearest (1 + gamma) sigma_t
        if 0.05 <= sigma(sch, t) <= 50:
            assert t < t_hat <= 1000 and sigma(sch, t_hat) == pytest.approx(1.1 * sigma(sch, t), rel=0.05)
        else:
            assert t_hat == t
    # no churn outside [S_tmin, S_tmax]: the deterministic sampler, whatever the generator
    a = heun(den, x_T(4), steps, s_churn=10.0, s_tmin=1e6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, heun(den, x_T(4), steps))


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
        assert len(traj.t) == 7 and traj.t == steps  # one call per step, whatever the evaluations
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


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_last_step_returns_x0_hat(name):
    sch = cosine(20)
    den = gaussian_denoiser(sch)
    traj = Trajectory()
    out = SAMPLERS[name](den, x_T(4), [20, 10, 1], callback=traj, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, traj.x0_hat[-1], atol=1e-6)


def test_bad_arguments():
    den = gaussian_denoiser(cosine(20))
    with pytest.raises(DdpmkitError):
        ddim(den, x_T(2), [5, 10])  # not decreasing
    with pytest.raises(DdpmkitError):
        ddim(den, x_T(2), [5], eta=1.5)
    with pytest.raises(DdpmkitError, match="order must be 2 or 3"):
        unipc(den, x_T(2), [5], order=4)
    with pytest.raises(DdpmkitError, match="s_tmax must be >= s_tmin"):
        heun(den, x_T(2), [5], s_tmin=1.0, s_tmax=0.5)
    with pytest.raises(DdpmkitError, match="s_churn"):
        euler(den, x_T(2), [5], s_churn=-1.0)
    with pytest.raises(DdpmkitError, match="s_noise"):
        euler_ancestral(den, x_T(2), [5], s_noise=float("nan"))
    with pytest.raises(DdpmkitError):
        get_sampler("lms")


# ---- through the command line, on a trained run -------------------------------------------------------

CLI_OPTIONS = {  # the options each sampler is sampled with here, beyond its defaults
    "ddim": ["--eta", "0.5"],
    "ddpm": ["--variance", "beta"],
    "euler": ["--s-churn", "2", "--s-tmin", "0.05", "--s-tmax", "50"],
    "heun": ["--s-churn", "2", "--s-noise", "1.003"],
    "euler-a": ["--s-noise", "0.98"],
    "dpm++sde": ["--s-noise", "0.98"],
    "unipc": ["--order", "3"],
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    data = make_idx_dataset(root / "mnist")
    run = root / "run"
    argv = ["train", "--dataset", "mnist", "--data-dir", str(data), *TINY_MODEL, *FAST, "--steps", "3"]
    assert main([*argv, "--precision", "fp32", "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_samples_a_trained_run_with_guidance(trained_run, name, tmp_path):
    def sample(guidance, *options):
        npz = tmp_path / f"{guidance}{len(options)}.npz"
        argv = ["sample", str(trained_run), "--sampler", name, "--steps", "4", "--spacing", "karras", "--n", "4"]
        argv += ["--guidance", str(guidance), *options, "--out", str(tmp_path / "s.png"), "--npz", str(npz)]
        assert main([*argv, "--precision", "fp32", "--device", "cpu"]) == 0
        return np.load(npz)["images"]

    guided = sample(3.0)
    assert guided.shape == (4, 28, 28) and guided.dtype == np.uint8 and (tmp_path / "s.png").is_file()
    assert not np.array_equal(guided, sample(1.0))  # the guidance reached the sampler
    if name in CLI_OPTIONS:
        assert not np.array_equal(guided, sample(3.0, *CLI_OPTIONS[name]))  # and so did its options


def test_guidance_interval_from_the_command_line(trained_run, tmp_path, capsys):
    """--guidance-interval LO,HI guides only the steps whose sigma_t is in (LO, HI]: none of them is
    plain conditional sampling, all of them (or `all`) is plain guidance, some of them neither."""

    def sample(*flags):
        npz = tmp_path / "s.npz"
        argv = ["sample", str(trained_run), "--sampler", "ddim", "--steps", "6", "--n", "4", "--guidance", "3"]
        assert main([*argv, *flags, "--precision", "fp32", "--out", str(tmp_path / "s.png"), "--npz", str(npz)]) == 0
        return np.load(npz)["images"]

    guided, plain = sample("--guidance-interval", "all"), sample("--guidance", "1")
    assert not np.array_equal(guided, plain)
    assert np.array_equal(sample("--guidance-interval", "1e8,1e9"), plain)  # no step has such a sigma
    assert np.array_equal(sample("--guidance-interval", "0,1e8"), guided)  # every step does
    some = sample("--guidance-interval", "0.28,5.42")
    assert not np.array_equal(some, guided) and not np.array_equal(some, plain)
    assert np.array_equal(sample(), some)  # a new run's default interval
    for bad in ("5,0.5", "1", "nan,2", "-1,2", "0,inf"):
        with pytest.raises(SystemExit) as exited:  # argparse: usage, then one line naming the flag
            main(["sample", str(trained_run), "--guidance-interval", bad])
        assert exited.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "--guidance-interval" in err[-1] and "Traceback" not in "".join(err)


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
