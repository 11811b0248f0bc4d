"""Seed 003's model options: self-conditioning, linear attention, its U-Net layout, step embeddings."""

import pytest
import torch
from conftest import FAST, TINY_MODEL
from torch import nn

from ddpmkit.cli import main
from ddpmkit.core.denoiser import Denoiser
from ddpmkit.core.losses import Noise, SimpleLoss
from ddpmkit.core.samplers import SAMPLERS, heun_corrects, nfe
from ddpmkit.core.schedules import cosine
from ddpmkit.models import build_model
from ddpmkit.run import build
from ddpmkit.run.build import model_kwargs
from ddpmkit.run.config import RunConfig, apply_overrides
from ddpmkit.run.presets import PRESETS


class Recorder(nn.Module):
    """A fake network that records its x_self_cond inputs and returns a fixed fraction of x_t."""

    def __init__(self):
        super().__init__()
        self.self_conds = []

    def forward(self, x, t, y=None, x_self_cond=None):
        self.self_conds.append(None if x_self_cond is None else x_self_cond.clone())
        return 0.5 * x


def _config(**model):
    config = apply_overrides(RunConfig(), {"model": {"self_condition": True, **model}, "diffusion": {"timesteps": 50}})
    config.num_classes = 10
    return config


@pytest.mark.parametrize("coin,passes", [(0.2, 2), (0.8, 1)])
def test_self_conditioning_training_passes(coin, passes):
    config, net, sch = _config(), Recorder(), cosine(50)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    t, eps = torch.tensor([5, 10, 20, 40]), torch.randn(4, 1, 8, 8)
    u = torch.full((4, 2), coin)
    u[:, 0] = 1.0  # no label dropout
    SimpleLoss()(build.denoiser(config, net, sch), x0, torch.zeros(4, dtype=torch.long), Noise(t, eps, u))
    assert len(net.self_conds) == passes
    if passes == 2:  # first an estimate from zeros, then the estimate is fed back (clamped x0_hat)
        assert torch.count_nonzero(net.self_conds[0]) == 0
        assert torch.count_nonzero(net.self_conds[1]) > 0 and float(net.self_conds[1].abs().max()) <= 1
    else:
        assert torch.count_nonzero(net.self_conds[0]) == 0


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_feed_back_the_previous_x0_hat(name, monkeypatch):
    net, sch = Recorder(), cosine(50)
    den = Denoiser(net, sch, "eps", self_condition=True, clip_x0=False)
    estimates, forward = [], den.forward

    def spy(*args, **kwargs):
        pred = forward(*args, **kwargs)
        estimates.append(pred.x0)
        return pred

    monkeypatch.setattr(den, "forward", spy)
    SAMPLERS[name](den, torch.randn(2, 1, 4, 4), [50, 30, 10], generator=torch.Generator().manual_seed(0))
    pairs = [(50, 30), (30, 10), (10, 0)]  # heun: one evaluation for a step from above Karras' sigma_max
    calls = 3 + sum(heun_corrects(sch, t, s) for t, s in pairs) if name == "heun" else nfe(name, 3)
    assert len(net.self_conds) == len(estimates) == calls
    assert net.self_conds[0] is None  # the first evaluation has no estimate yet (the net uses zeros)
    for i in range(1, len(estimates)):  # every later one gets the one before it (Heun: two per step)
        assert torch.allclose(net.self_conds[i], estimates[i - 1])


def test_self_conditioned_net_takes_the_estimate():
    config = _config(base_channels=8, channel_mults=(1, 2), attn_resolutions=())
    config.in_channels, config.image_size = 1, 8
    net = build_model("unet", **model_kwargs(config))
    for p in net.parameters():  # undo the zero-initialised output layer
        nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    assert not torch.allclose(net(x, t, None, torch.zeros_like(x)), net(x, t, None, torch.ones_like(x)))


def test_seed_003_layout_is_a_preset_of_the_unet():
    config = apply_overrides(RunConfig(), PRESETS["seed-003"])
    assert config.model.arch == "unet" and config.model.final_res_block and config.model.init_conv_kernel == 7
    net = build_model("unet", **model_kwargs(config))
    out = net(torch.randn(2, 1, 28, 28), torch.tensor([1, 999]), torch.tensor([0, 10]))
    assert out.shape == (2, 1, 28, 28)


@pytest.mark.parametrize(
    "option",
    [
        ["--self-condition"],
        ["--attn-type", "linear"],
        ["--time-embedding", "learned"],
        ["--time-embedding", "random_fourier"],
        ["--preset", "seed-003", "--base-channels", "8", "--num-res-blocks", "1"],
        ["--learn-sigma"],
        ["--arch", "convnext", "--mult", "1"],
    ],
)
def test_each_option_trains_and_samples_with_every_sampler(option, tiny_mnist, tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--dataset",
                "mnist",
                "--data-dir",
                str(tiny_mnist),
                *TINY_MODEL,
                *FAST,
                "--out",
                str(run),
                "--steps",
                "3",
                *option,
            ]
        )
        == 0
    )
    for sampler in sorted(SAMPLERS):
        out = tmp_path / f"{sampler}.png"
        assert (
            main(
                [
                    "sample",
                    str(run),
                    "--n",
                    "4",
                    "--steps",
                    "3",
                    "--sampler",
                    sampler,
                    "--out",
                    str(out),
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        assert out.is_file()
