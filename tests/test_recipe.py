"""Training-recipe options: learning-rate decay to the end of the budget, the power-function EMA and
EDM's log-normal noise levels, against values computed by hand."""

import json
import math

import pytest
import torch
from conftest import FAST, TINY_MODEL, make_idx_dataset

from ddpmkit.cli import main
from ddpmkit.core.losses import SimpleLoss, lognormal_t
from ddpmkit.core.schedules import cosine, linear
from ddpmkit.run import checkpoint
from ddpmkit.train import trainer as train


def test_lr_warms_up_then_decays_to_zero_at_the_planned_step():
    lr, warmup, planned = 1e-3, 10, 110
    assert train.lr_at(4, lr, warmup, "cosine", planned) == pytest.approx(5e-4)  # (4 + 1) / 10 of the peak
    assert train.lr_at(10, lr, warmup, "cosine", planned) == pytest.approx(lr)  # p = 0
    assert train.lr_at(60, lr, warmup, "cosine", planned) == pytest.approx(lr / 2)  # p = 1/2: (1 + cos(pi/2)) / 2
    assert train.lr_at(85, lr, warmup, "cosine", planned) == pytest.approx(lr * (1 + math.cos(0.75 * math.pi)) / 2)
    assert train.lr_at(85, lr, warmup, "linear", planned) == pytest.approx(lr * 0.25)
    assert train.lr_at(110, lr, warmup, "linear", planned) == 0.0
    assert train.lr_at(500, lr, warmup, "cosine", planned) == pytest.approx(0.0, abs=1e-20)  # stays at 0 past the end
    assert train.lr_at(60, lr, warmup, "constant", planned) == lr
    assert train.lr_at(60, lr, warmup, "cosine", None) == lr  # no plan yet: the peak


def test_power_ema_decay_is_karras_beta_t():
    assert train.ema_decay_at(0, 0.999, power=7.0) == 0.0  # the first average is the model itself
    assert train.ema_decay_at(9, 0.999, power=1.0) == pytest.approx(0.9**2)  # (1 - 1/10)^(1 + 1)
    assert train.ema_decay_at(1999, 0.999, power=6.94) == pytest.approx((1 - 1 / 2000) ** 7.94)
    assert train.ema_decay_at(1999, 0.999) == pytest.approx(2000 / 2009)  # the warm-up rule, unchanged


def test_power_ema_with_gamma_zero_is_the_plain_mean():
    """beta_t = (1 - 1/t) makes the EMA the running mean of all iterates: check it on a toy model."""
    ema, model, seen = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1), []
    for step in range(5):
        with torch.no_grad():
            model.weight.fill_(float(step + 1))
        seen.append(model.weight.clone())
        train.ema_update(ema, model, train.ema_decay_at(step, 0.999, power=0.0))
    assert torch.allclose(ema.weight, torch.stack(seen).mean(0))


def test_lognormal_t_follows_edm_in_log_sigma():
    schedule = cosine(1000)
    t = lognormal_t(schedule)(200_000, "cpu", torch.Generator().manual_seed(0))
    assert 1 <= int(t.min()) and int(t.max()) <= 1000
    abar = schedule.alpha_bar[t]
    log_sigma = 0.5 * torch.log((1 - abar) / abar)
    assert float(log_sigma.mean()) == pytest.approx(-1.2, abs=0.02)  # ln sigma ~ N(-1.2, 1.2^2)
    assert float(log_sigma.std()) == pytest.approx(1.2, abs=0.02)


def test_lognormal_t_picks_the_nearest_step_in_log_sigma():
    schedule = linear(50)
    log_sigma = 0.5 * torch.log((1 - schedule.alpha_bar[1:]) / schedule.alpha_bar[1:])
    draw = lognormal_t(schedule, mean=0.0, std=1.0)
    z = torch.randn(1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = draw(1000, "cpu", torch.Generator().manual_seed(3))
    nearest = (log_sigma[None, :] - z[:, None]).abs().argmin(1) + 1  # brute force over t = 1..T
    assert torch.equal(t, nearest)


def test_the_loss_draws_its_own_noise_levels():
    schedule = cosine(100)
    uniform = SimpleLoss().draw(schedule, (4000, 1, 2, 2), "cpu", torch.Generator().manual_seed(0)).t
    edm = SimpleLoss(t_sampling="lognormal").draw(schedule, (4000, 1, 2, 2), "cpu", torch.Generator().manual_seed(0)).t
    assert abs(float(uniform.float().mean()) - 50.5) < 2  # U{1..100}
    assert float(edm.float().mean()) < 40  # EDM's levels sit at low noise: ln sigma ~ -1.2


def test_the_options_train_through_the_cli(tmp_path):
    data, run = make_idx_dataset(tmp_path / "mnist"), tmp_path / "run"
    argv = [
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        str(data),
        *TINY_MODEL,
        *FAST,
        "--steps",
        "6",
        "--warmup",
        "2",
        "--lr-schedule",
        "cosine",
        "--ema-power",
        "7",
        "--t-sampling",
        "lognormal",
        "--out",
        str(run),
    ]
    assert main(argv) == 0
    config = checkpoint.load_config(run)
    assert (config.train.lr_schedule, config.train.ema_power, config.diffusion.t_sampling) == (
        "cosine",
        7.0,
        "lognormal",
    )
    lrs = [row["lr"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    # the last log line shows the lr of step index 5: p = (5 - 2) / (6 - 2) of the decay
    assert lrs[-1] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 0.75)) / 2)


def test_a_time_budget_plans_the_decay_from_the_speed_so_far(monkeypatch):
    """With --minutes alone, the schedule's end is the step the run will reach at its measured rate."""

    class Fake:  # 10 s after its start at step 0 the run is at step 50: 5 steps/s
        step, _started, device = 50, (0, 100.0), "cpu"

    monkeypatch.setattr(train.time, "monotonic", lambda: 110.0)
    assert train.Trainer._steps_by(Fake(), deadline=150.0) == 50 + 5 * 40
