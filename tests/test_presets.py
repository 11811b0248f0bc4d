"""The seed-notebook preset reruns the notebook's configuration (seed 001), as saved in config.json."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAST, TINY_MODEL, make_idx_dataset

from ddpmkit.cli import main
from ddpmkit.models import build_model, count_parameters
from ddpmkit.models.layers import ResBlock
from ddpmkit.run import build, checkpoint
from ddpmkit.run.build import model_kwargs
from ddpmkit.run.config import RunConfig, apply_overrides, resolve
from ddpmkit.run.presets import PRESETS
from ddpmkit.train.trainer import batch_indices, ema_decay_at


def test_seed_notebook_preset_matches_the_notebook(tmp_path):
    data = make_idx_dataset(tmp_path / "mnist", n=130)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--preset",
                "seed-notebook",
                "--data-dir",
                str(data),
                "--steps",
                "1",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    saved = json.loads((run / "config.json").read_text())
    assert saved["preset"] == "seed-notebook"
    assert saved["data"]["dataset"] == "mnist"
    assert saved["diffusion"]["timesteps"] == 500 and saved["diffusion"]["schedule"] == "cosine"
    assert saved["diffusion"]["min_snr_gamma"] is None  # the notebook's plain L_simple
    assert saved["model"]["arch"] == "convnext" and saved["model"]["mult"] == 3
    assert saved["model"]["channels"] == [16, 32, 64, 128] and saved["model"]["strides"] == [2, 2, 3]
    assert saved["train"]["batch_size"] == 128 and saved["train"]["lr"] == 1e-3
    assert saved["train"]["optimizer"] == "adam" and saved["train"]["epochs"] == 20
    assert saved["train"]["steps"] == 1  # a flag given with a preset overrides it
    assert saved["sample"] == {**saved["sample"], "sampler": "ddim", "steps": 35, "eta": 0.1}
    config = RunConfig.from_json((run / "config.json").read_text())
    # the notebook's network: 2,038,132 trainable parameters + one null-class row of 112
    assert count_parameters(build_model("convnext", **model_kwargs(config))) == 2_038_132 + 112


@pytest.mark.parametrize("preset", ["seed-notebook", "cifar10-ddpm", "imagenet64", "fashion-gpu"])
def test_paper_and_measured_presets_keep_l_simple(preset):
    """The default recipe weights the loss with min-SNR (gamma 5); the presets that reproduce a
    paper, the notebook, or a measured configuration keep the unweighted L_simple."""
    assert RunConfig().diffusion.min_snr_gamma == 5.0
    assert apply_overrides(RunConfig(), PRESETS[preset]).diffusion.min_snr_gamma is None


@pytest.mark.parametrize(
    "given, saved",
    [
        (["--min-snr-gamma", "off"], None),
        (["--min-snr-gamma", "OFF"], None),
        (["--min-snr-gamma", "2.5"], 2.5),
        ([], 5.0),
    ],
)
def test_min_snr_gamma_flag(tmp_path, given, saved):
    data = make_idx_dataset(tmp_path / "mnist", n=16)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--dataset",
                "mnist",
                "--data-dir",
                str(data),
                *TINY_MODEL,
                *FAST,
                "--steps",
                "1",
                *given,
                "--out",
                str(run),
            ]
        )
        == 0
    )
    assert json.loads((run / "config.json").read_text())["diffusion"]["min_snr_gamma"] == saved


def test_min_snr_gamma_flag_refuses_words_other_than_off(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--min-snr-gamma", "none", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2
    assert "\n" not in err and "--min-snr-gamma" in err and not (tmp_path / "run").exists()


# ---- cifar10-ddpm: Ho et al. 2020 ---------------------------------------------------------------

HO_ET_AL = {  # section.field -> Ho et al. 2020's CIFAR-10 setting
    "model.arch": "unet",
    "model.base_channels": 128,
    "model.channel_mults": (1, 2, 2, 2),
    "model.num_res_blocks": 2,
    "model.attn_resolutions": (16,),
    "model.num_heads": 1,
    "model.dropout": 0.1,
    "model.emb_injection": "add",
    "model.downsample": "conv3",
    "model.upsample": "nearest",
    "model.self_condition": False,
    "diffusion.timesteps": 1000,
    "diffusion.schedule": "linear",
    "diffusion.objective": "eps",
    "diffusion.learn_sigma": False,
    "diffusion.min_snr_gamma": None,
    "data.dataset": "cifar10",
    "data.conditional": False,
    "data.hflip": True,
    "train.optimizer": "adam",
    "train.lr": 2e-4,
    "train.weight_decay": 0.0,
    "train.batch_size": 128,
    "train.grad_accum": 1,
    "train.warmup": 5000,
    "train.grad_clip": 1.0,
    "train.ema_decay": 0.9999,
    "train.steps": 800_000,
    "sample.sampler": "ddpm",
    "sample.variance": "beta",
    "sample.steps": 1000,
}
# what still differs: the rows of docs/presets.md's table, each checked below
DIFFERENCES = (
    "initialisation",
    "GroupNorm epsilon",
    "step embedding",
    "EMA warm-up",
    "precision",
    "Adam epsilon",
    "data order",
)


def cifar10_ddpm() -> RunConfig:
    config = apply_overrides(RunConfig(preset="cifar10-ddpm"), PRESETS["cifar10-ddpm"])
    config.in_channels, config.image_size, config.num_classes = 3, 32, 10
    return resolve(config)


def test_cifar10_ddpm_is_ho_et_al_setup_with_their_parameter_count():
    config = cifar10_ddpm()
    for dotted, theirs in HO_ET_AL.items():
        section, name = dotted.split(".")
        assert getattr(getattr(config, section), name) == theirs, dotted
    with torch.device("meta"):
        assert count_parameters(build.net(config)) == 35_746_307  # Ho et al.: 35.7M
    schedule = build.schedule(config)
    assert float(schedule.beta[1]) == pytest.approx(1e-4) and float(schedule.beta[1000]) == pytest.approx(0.02)


def test_cifar10_ddpm_remaining_differences_are_the_documented_ones():
    config = cifar10_ddpm()
    torch.manual_seed(0)
    net = build.net(config)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    # initialisation: PyTorch's default (nonzero biases); their zero-initialised layers are zero here too
    assert convs[0].bias.abs().sum() > 0
    assert all(not p.any() for p in net.out[-1].parameters())
    assert all(not b.out_layers[-1].weight.any() for b in net.modules() if isinstance(b, ResBlock))
    # GroupNorm epsilon
    assert {m.eps for m in net.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-5}
    # step embedding: 10000^(-i/64) of t (theirs 10000^(-i/63) of t - 1)
    freqs = net.time_embed[0].freqs
    assert torch.allclose(freqs, torch.exp(-math.log(10000) * torch.arange(64) / 64))
    # EMA warm-up
    assert ema_decay_at(0, config.train.ema_decay) == pytest.approx(0.1)
    assert ema_decay_at(10**6, config.train.ema_decay) == 0.9999
    # precision
    assert config.train.precision == "auto"
    # Adam epsilon: torch's Adam, eps 1e-8
    optimizer = build.optimizer(torch.nn.Linear(2, 2), config)
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["eps"] == 1e-8
    # data order: a seeded permutation per epoch
    assert torch.equal(batch_indices(0, 0, 50_000, 128), batch_indices(0, 0, 50_000, 128))
    docs = (Path(__file__).resolve().parents[1] / "docs" / "presets.md").read_text()
    table = docs[docs.index("What still differs") :]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert tuple(rows[1:]) == DIFFERENCES


def test_cifar10_ddpm_trains_through_the_cli_with_flags_overriding_it(tmp_path):
    from test_rgb import tiny_cifar_tarball

    (tmp_path / "cifar").mkdir()
    tiny_cifar_tarball(tmp_path / "cifar" / "cifar-10-python.tar.gz", per_batch=2)
    run = tmp_path / "run"
    tiny = ["--base-channels", "8", "--batch-size", "4", "--sample-steps", "2", "--precision", "fp32"]
    args = ["train", "--preset", "cifar10-ddpm", "--data-dir", str(tmp_path / "cifar"), *tiny, "--steps", "1"]
    assert main([*args, "--no-progress", "--out", str(run)]) == 0
    saved = checkpoint.load_config(run)
    assert saved.data.hflip and not saved.data.conditional and saved.model.emb_injection == "add"
    assert saved.model.base_channels == 8 and saved.train.steps == 1 and saved.sample.sampler == "ddpm"
