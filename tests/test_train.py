import copy

import pytest
import torch
from conftest import FAST, TINY_MODEL

from ddpmkit.cli import main
from ddpmkit.core.losses import Noise
from ddpmkit.data import DatasetInfo, ImageData, to_model_range
from ddpmkit.run import build, checkpoint
from ddpmkit.run.config import RunConfig, apply_overrides
from ddpmkit.train import trainer as trainer_module
from ddpmkit.train.trainer import (
    Trainer,
    batch_indices,
    batch_noise,
    batch_randomness,
    class_balance_weights,
    ema_update,
    hflip,
    lr_at,
)


def tiny_config(**train):
    overrides = {
        "model": {
            "base_channels": 8,
            "channel_mults": (1, 2),
            "num_res_blocks": 1,
            "attn_resolutions": (),
            "num_heads": 2,
        },
        "diffusion": {"timesteps": 100},
        "train": {
            "batch_size": 16,
            "lr": 3e-3,
            "warmup": 10,
            "log_every": 10,
            "sample_every": 10**6,
            "checkpoint_every": 10**6,
            "ema_decay": 0.9,
            **train,
        },
        "sample": {"steps": 2},
    }
    config = apply_overrides(RunConfig(), overrides)
    config.in_channels, config.image_size, config.num_classes = 1, 8, 4
    config.class_names = ("a", "b", "c", "d")
    return config


def tiny_data(n=16):
    """n distinct 8x8 images: a bright 3x3 square at n different places."""
    images = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i % 16, 4)
        images[i, 0, r + r // 2 : r + r // 2 + 3, c + c // 2 : c + c // 2 + 3] = 255
    return ImageData(images, torch.arange(n) % 4, DatasetInfo("tiny", 1, 8, 4, ("a", "b", "c", "d")))


def _fixed_loss(trainer, data):
    """The loss of the raw model on every image at 8 fixed (t, eps) draws each."""
    x0 = to_model_range(data.images).repeat(8, 1, 1, 1)
    y = data.labels.repeat(8)
    t, eps, u = batch_noise(123, 0, x0.shape, trainer.schedule.T, "cpu")
    with torch.no_grad():
        denoiser = build.denoiser(trainer.config, trainer.model, trainer.schedule, precision="fp32")
        return float(trainer.loss(denoiser, x0, y, Noise(t, eps, u + 1)).mean())


def test_overfits_sixteen_images(tmp_path):
    config, data = tiny_config(lr=5e-3), tiny_data()
    checkpoint.create_run(tmp_path / "run", config)
    trainer = Trainer(config, tmp_path / "run", data, "cpu")
    before = _fixed_loss(trainer, data)
    trainer.fit(300, progress=False)
    after = _fixed_loss(trainer, data)
    assert after < before / 5, (before, after)


def test_ema_update_is_the_formula():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = copy.deepcopy(a)
    ema_update(a, b, 0.9)
    for pa, p0, pb in zip(a.parameters(), before.parameters(), b.parameters()):
        assert torch.allclose(pa, 0.9 * p0 + 0.1 * pb)


def test_lr_warmup():
    assert lr_at(0, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10) == 1.0 and lr_at(500, 1.0, 10) == 1.0 and lr_at(0, 1.0, 0) == 1.0


def test_batches_are_a_function_of_seed_and_step():
    a = batch_indices(0, 5, 100, 10)
    assert torch.equal(a, batch_indices(0, 5, 100, 10))
    epoch = torch.cat([batch_indices(0, k, 100, 10) for k in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))  # one epoch visits every example once
    t1, e1, _ = batch_noise(0, 3, (4, 1, 2, 2), 50, "cpu")
    t2, e2, _ = batch_noise(0, 3, (4, 1, 2, 2), 50, "cpu")
    assert torch.equal(t1, t2) and torch.equal(e1, e2)


def _weights(run_dir):
    from safetensors.torch import load_file

    ckpt = checkpoint.latest_checkpoint(run_dir)
    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "ema.safetensors"))


def test_resume_is_bit_identical(tiny_mnist, tmp_path):
    common = ["train", "--dataset", "mnist", "--data-dir", str(tiny_mnist), *TINY_MODEL, *FAST]
    assert main([*common, "--out", str(tmp_path / "straight"), "--steps", "20"]) == 0
    assert main([*common, "--out", str(tmp_path / "split"), "--steps", "10"]) == 0
    assert main(["train", "--out", str(tmp_path / "split"), "--resume", "--steps", "20", "--no-progress"]) == 0
    for a, b in zip(_weights(tmp_path / "straight"), _weights(tmp_path / "split")):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    state, _ = checkpoint.load_state(checkpoint.latest_checkpoint(tmp_path / "split"))
    assert state["step"] == 20


def test_run_directory_contents(tiny_mnist, tmp_path):
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
                "6",
                "--sample-every",
                "3",
                "--keep",
                "1",
                "--checkpoint-every",
                "2",
            ]
        )
        == 0
    )
    config = checkpoint.load_config(run)
    assert config.model.base_channels == 8 and config.num_classes == 10 and config.train.steps == 6
    assert [p.name for p in checkpoint.checkpoints(run)] == ["ckpt-00000006"]  # --keep 1
    assert {"ema.safetensors", "model.safetensors", "train_state.pt", "state.json"} <= {
        p.name for p in checkpoint.latest_checkpoint(run).iterdir()
    }
    assert (run / "metrics.jsonl").read_text().count("\n") >= 1 and (run / "loss.png").is_file()
    assert (run / "samples" / "step-00000003.png").is_file() and (run / "samples" / "step-00000006.png").is_file()
    assert not list(run.glob(".tmp*")) and not list(run.glob(".*.tmp"))


# ---- random horizontal flips (--hflip) ------------------------------------------------------------


def asymmetric_data(n=16):
    """n 8x8 images bright on their left half only (a flip moves the light to the right)."""
    images = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    images[:, :, :, :4] = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1) * 8 + 100
    return ImageData(images, torch.arange(n) % 4, DatasetInfo("tiny", 1, 8, 4, ("a", "b", "c", "d")))


def test_hflip_mirrors_exactly_the_images_whose_coin_says_so():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    out = hflip(x, torch.tensor([True, False]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


@pytest.mark.parametrize("flip", [False, True])
def test_hflip_flips_each_example_by_the_steps_seeded_coins(tmp_path, flip):
    config, data = tiny_config(batch_size=8), asymmetric_data()
    config.data.hflip = flip
    trainer = Trainer(config, tmp_path, data, "cpu")
    seen, loss = [], trainer.loss

    class Recording:  # the loss, recording the images it is given
        draw = loss.draw

        def __call__(self, denoiser, x0, y, noise):
            seen.append(x0.detach().clone())
            return loss(denoiser, x0, y, noise)

    trainer.loss = Recording()
    for step in range(3):
        trainer.train_step()
        idx = batch_indices(config.train.seed, step, len(data), 8)
        noise, coins = batch_randomness(config.train.seed, step, (8, 1, 8, 8), trainer.schedule.T, "cpu")
        expected = to_model_range(data.images[idx])
        assert torch.equal(seen[step], hflip(expected, coins) if flip else expected)
        assert torch.equal(noise.eps, batch_noise(config.train.seed, step, (8, 1, 8, 8), 100, "cpu").eps)
        trainer.step += 1
    coins = torch.cat([batch_randomness(0, s, (8, 1, 8, 8), 100, "cpu")[1] for s in range(3)])
    assert 0 < int(coins.sum()) < len(coins)  # both kinds of example occurred


def test_hflip_runs_resume_bit_identically(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module.viz, "loss_curve", lambda metrics, path: None)  # matplotlib: slow
    config, data = tiny_config(batch_size=8, checkpoint_every=2), asymmetric_data()
    config.data.hflip = True
    for name in ("straight", "resumed"):
        checkpoint.create_run(tmp_path / name, config)
    Trainer(config, tmp_path / "straight", data).fit(4, progress=False)
    Trainer(config, tmp_path / "resumed", data).fit(2, progress=False)
    again = Trainer(checkpoint.load_config(tmp_path / "resumed"), tmp_path / "resumed", data)
    again.resume()
    again.fit(4, progress=False)
    weights = [checkpoint.latest_checkpoint(tmp_path / name) / "model.safetensors" for name in ("straight", "resumed")]
    assert weights[0].read_bytes() == weights[1].read_bytes()


# ---- class-balanced draws (--class-balance) -------------------------------------------------------


def skewed_labels(n_big=90, n_small=10):
    return torch.cat([torch.zeros(n_big, dtype=torch.long), torch.ones(n_small, dtype=torch.long)])


@pytest.mark.parametrize("balance, share", [(1.0, 0.5), (0.5, 10**0.5 / (10**0.5 + 90**0.5))])
def test_class_balance_draws_class_c_with_probability_n_c_to_the_1_minus_b(balance, share):
    labels = skewed_labels()
    weights = class_balance_weights(labels, balance)
    drawn = torch.cat([batch_indices(0, step, 100, 10, weights) for step in range(400)])  # 40 epochs
    small = float((labels[drawn] == 1).float().mean())
    assert small == pytest.approx(share, abs=0.03)  # 0.1 without balancing
    assert torch.equal(batch_indices(0, 7, 100, 10, weights), batch_indices(0, 7, 100, 10, weights))
    assert not torch.equal(batch_indices(0, 7, 100, 10, weights), batch_indices(1, 7, 100, 10, weights))


def test_class_balance_0_or_one_class_keeps_the_plain_epochs():
    assert class_balance_weights(skewed_labels(), 0.0) is None
    assert class_balance_weights(torch.full((50,), -1), 1.0) is None  # unlabelled: nothing to balance
    assert class_balance_weights(skewed_labels(), 1.0) is not None
    assert class_balance_weights(skewed_labels(50, 50), 0.5) is None  # classes alike: plain epochs


def test_the_trainer_draws_its_batches_by_class_balance(tmp_path):
    config, data = tiny_config(batch_size=8), asymmetric_data()
    data = ImageData(data.images, (torch.arange(16) >= 13).long(), data.info)  # 13 of class 0, 3 of class 1
    config.data.class_balance = 1.0
    trainer = Trainer(config, tmp_path, data, "cpu")
    seen, loss = [], trainer.loss

    class Recording:  # the loss, recording the labels it is given
        draw = loss.draw

        def __call__(self, denoiser, x0, y, noise):
            seen.append(y.clone())
            return loss(denoiser, x0, y, noise)

    trainer.loss = Recording()
    for step in range(6):
        trainer.train_step()
        expected = data.labels[batch_indices(config.train.seed, step, 16, 8, trainer.weights)]
        assert torch.equal(seen[step][seen[step] >= 0], expected[seen[step] >= 0])  # (label dropout: -1)
        trainer.step += 1
    drawn = torch.cat([data.labels[batch_indices(0, s, 16, 8, trainer.weights)] for s in range(200)])
    assert float(drawn.float().mean()) == pytest.approx(0.5, abs=0.05)  # 3/16 of the data, half the draws


def test_class_balanced_runs_resume_bit_identically(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module.viz, "loss_curve", lambda metrics, path: None)  # matplotlib: slow
    config, data = tiny_config(batch_size=8, checkpoint_every=2), asymmetric_data()
    config.data.class_balance = 0.7
    for name in ("straight", "resumed"):
        checkpoint.create_run(tmp_path / name, config)
    Trainer(config, tmp_path / "straight", data).fit(4, progress=False)
    Trainer(config, tmp_path / "resumed", data).fit(2, progress=False)
    again = Trainer(checkpoint.load_config(tmp_path / "resumed"), tmp_path / "resumed", data)
    assert again.config.data.class_balance == 0.7  # saved with the run
    again.resume()
    again.fit(4, progress=False)
    weights = [checkpoint.latest_checkpoint(tmp_path / name) / "model.safetensors" for name in ("straight", "resumed")]
    assert weights[0].read_bytes() == weights[1].read_bytes()
