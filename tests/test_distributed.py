"""Scale-out: DDP under torchrun (same curve as one process), fp16 loss scaling, gradient
checkpointing, and the model presets.

Run as a script under torchrun (see `_worker`), this file trains through the CLI and reports what
each rank did; the tests launch it, and `ddpmkit train --nproc 2`, as real processes on gloo.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpmkit.cli import main
from ddpmkit.data import DatasetInfo, ImageData
from ddpmkit.errors import DdpmkitError
from ddpmkit.models import UNet, count_parameters
from ddpmkit.run import checkpoint
from ddpmkit.run.build import net as build_net
from ddpmkit.run.config import RunConfig, apply_overrides, validate
from ddpmkit.run.presets import PRESETS
from ddpmkit.train import distributed
from ddpmkit.train import trainer as train
from ddpmkit.train.trainer import Trainer, batch_indices

# MNIST-format data at 16x16, an 8-channel U-Net, T = 50; fp32 and no dropout, so that one and two
# processes compute the same numbers up to float summation order
TINY = [
    "--image-size",
    "16",
    "--base-channels",
    "8",
    "--channel-mults",
    "1,2",
    "--num-res-blocks",
    "1",
    "--attn-resolutions",
    "8",
    "--num-heads",
    "2",
    "--timesteps",
    "50",
    "--sample-steps",
    "2",
    "--no-progress",
    "--warmup",
    "5",
    "--precision",
    "fp32",
    "--dropout",
    "0",
    "--seed",
    "3",
    "--lr",
    "2e-3",
]


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir, step):
    ckpt = Path(run_dir) / f"ckpt-{step:08d}"
    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "ema.safetensors"))


def _assert_same_network(run_a, run_b, step):
    """The model and EMA weights of two runs at `step` compute the same function.

    Compared through the network, not number by number: in these 8-channel blocks every channel
    is its own GroupNorm group, so a bias (or embedding) added before a GroupNorm has a zero
    gradient; Adam divides its float-noise gradient by its own tiny RMS and moves it by up to lr
    per step, differently in each run, without changing any output.
    """
    config = checkpoint.load_config(run_a)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, config.in_channels, config.image_size, config.image_size, generator=g)
    t, y = torch.randint(1, 51, (6,), generator=g), torch.arange(6)
    for a, b in zip(_weights(run_a, step), _weights(run_b, step)):
        nets = [build_net(config), build_net(config)]
        for net, weights in zip(nets, (a, b)):
            net.load_state_dict(weights)
        with torch.no_grad():
            out_a, out_b = (net(x, t, y) for net in nets)
        assert out_a.abs().mean() > 0.05  # a trained network, not the zero-initialised output
        torch.testing.assert_close(out_b, out_a, rtol=1e-4, atol=1e-5)


# ---- MUST SHOW: 2 processes x batch 8 == 1 process x batch 16 ---------------------------------


def test_two_processes_match_one_process_with_twice_the_batch(tiny_mnist, tmp_path, capsys):
    data = [
        "--dataset",
        "mnist",
        "--data-dir",
        str(tiny_mnist),
        *TINY,
        "--log-every",
        "1",
        "--sample-every",
        "1000",
        "--checkpoint-every",
        "10",
        "--keep",
        "2",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *data, "--batch-size", "16", "--steps", "20", "--out", str(one)]) == 0
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddpmkit",
            "train",
            "--nproc",
            "2",
            *data,
            "--batch-size",
            "8",
            "--steps",
            "10",
            "--out",
            str(two),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[:3000] + "\n...\n" + launched.stderr[-3000:]
    assert launched.stdout.count("trained to step 10") == 1  # rank 0 alone reports

    # the same loss curve (the loss logged is the mean over ranks) and the same weights
    np.testing.assert_allclose(_losses(two), _losses(one)[:10], rtol=1e-4)
    _assert_same_network(one, two, 10)

    # resume on one process: the global batch must stay 16, so --grad-accum 2 (8 x 1 x 2)
    assert main(["train", "--out", str(two), "--resume", "--steps", "20", "--no-progress"]) == 2
    assert "global batch of 16" in capsys.readouterr().err
    assert main(["train", "--out", str(two), "--resume", "--steps", "20", "--grad-accum", "2", "--no-progress"]) == 0
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-4)
    _assert_same_network(one, two, 20)


# ---- ranks agree, and only rank 0 writes -------------------------------------------------------


def test_ranks_hold_identical_ema_and_only_rank_zero_writes(tiny_mnist, tmp_path):
    run, report = tmp_path / "run", tmp_path / "report.json"
    args = [
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        str(tiny_mnist),
        *TINY,
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--steps",
        "4",
        "--log-every",
        "1",
        "--sample-every",
        "2",
        "--checkpoint-every",
        "2",
        "--keep",
        "1",
        "--grad-checkpointing",
        "--out",
        str(run),
    ]
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            __file__,
            str(run),
            str(report),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[:3000] + "\n...\n" + launched.stderr[-3000:]
    ranks = [json.loads(Path(f"{report}.{rank}").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["ema"] == ranks[1]["ema"] and ranks[0]["model"] == ranks[1]["model"]
    assert ranks[1]["writes"] == [] and ranks[0]["writes"]  # rank 0 wrote, rank 1 nothing
    assert {p.name for p in run.iterdir()} == {"config.json", "ckpt-00000004", "metrics.jsonl", "loss.png", "samples"}
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    assert len(_losses(run)) == 4


def _worker(run_dir: str, report: str, argv: list[str]) -> int:
    """Under torchrun: `ddpmkit ARGV`, recording every file write under run_dir (ranks > 0 must make
    none) and, at the end of fit, each rank's digest of its EMA and model weights, into REPORT.<rank>."""
    from ddpmkit import cli

    rank, writes = int(os.environ["RANK"]), []

    def audit(event, args):
        if event in ("open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree") and args:
            path = os.fsdecode(os.fspath(args[0])) if isinstance(args[0], (str, bytes, os.PathLike)) else ""
            mode, flags = (args[1], args[2]) if event == "open" else ("w", 0)
            writing = (mode is not None and any(c in str(mode) for c in "wxa+")) or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if path.startswith(run_dir) and writing:
                writes.append(f"{event} {path}")

    sys.addaudithook(audit)
    fit = train.Trainer.fit

    def fit_and_report(self, *args, **kwargs):
        step = fit(self, *args, **kwargs)
        digest = {
            name: hashlib.sha256(
                b"".join(t.detach().numpy().tobytes() for t in module.state_dict().values())
            ).hexdigest()
            for name, module in (("ema", self.ema), ("model", self.model))
        }
        Path(f"{report}.{rank}").write_text(json.dumps({"rank": rank, **digest, "writes": writes}))
        return step

    train.Trainer.fit = fit_and_report
    return cli.main(argv)


# ---- the pieces --------------------------------------------------------------------------------


def test_rank_batch_sampler_takes_the_in_memory_slices():
    micro, accum, n, seed = 3, 2, 50, 7
    global_batch = micro * 2 * accum
    indices = lambda step: batch_indices(seed, step, n, global_batch)  # noqa: E731
    per_rank = []
    for rank in (0, 1):
        world = distributed.DistInfo(rank, 2, rank)
        batches = iter(distributed.RankBatchSampler(indices, micro, accum, 5, world))
        per_rank.append([next(batches) for _ in range(3 * accum)])  # steps 5, 6, 7
    for step in (5, 6, 7):
        got = [per_rank[rank][(step - 5) * accum + k] for k in range(accum) for rank in (0, 1)]
        assert sum(got, []) == indices(step).tolist()  # micro-batch k is rank 0's slice, then rank 1's


@pytest.mark.parametrize("rank, local_rank, runs_in_phase", [(0, 0, 0), (8, 0, 1), (1, 1, 2), (9, 1, 2)])
def test_rank_zero_loads_first_then_each_machine_then_the_rest(monkeypatch, rank, local_rank, runs_in_phase):
    events = []
    monkeypatch.setattr(distributed, "info", lambda: distributed.DistInfo(rank, 16, local_rank))
    monkeypatch.setattr(distributed, "any_rank", lambda flag, device: events.append("barrier") or flag)
    assert distributed.rank_zero_first(lambda: events.append("load") or "data", "cpu") == "data"
    assert events.count("load") == 1 and events.count("barrier") == 3
    assert events.index("load") == runs_in_phase  # after as many barriers as earlier phases

    def fails():
        raise DdpmkitError("no such dataset")

    monkeypatch.setattr(distributed, "any_rank", lambda flag, device: True)  # it failed somewhere
    with pytest.raises(DdpmkitError, match="no such dataset" if rank == 0 else "another rank failed"):
        distributed.rank_zero_first(fails, "cpu")


def test_without_option_strips_nproc_in_every_spelling():
    argv = ["train", "--nproc", "2", "--out", "r", "--np=3", "--steps", "5", "--npro", "4", "--no-progress"]
    assert distributed.without_option(argv, "--nproc") == ["train", "--out", "r", "--steps", "5", "--no-progress"]
    assert distributed.torchrun_command(2, ["train"])[-4:] == ["--nproc_per_node=2", "-m", "ddpmkit", "train"]
    with pytest.raises(DdpmkitError, match="--nproc must be >= 1"):
        distributed.relaunch(0, ["train"])


# ---- memory and precision ----------------------------------------------------------------------


def _tiny_config(**train_overrides):
    config = apply_overrides(
        RunConfig(),
        {
            "model": {
                "base_channels": 8,
                "channel_mults": (1, 2),
                "num_res_blocks": 1,
                "attn_resolutions": (4,),
                "num_heads": 2,
            },
            "diffusion": {"timesteps": 50},
            "train": {
                "batch_size": 8,
                "lr": 1e-3,
                "warmup": 0,
                "sample_every": 10**6,
                "checkpoint_every": 10**6,
                "log_every": 1,
                "ema_decay": 0.9,
                **train_overrides,
            },
            "sample": {"steps": 2},
        },
    )
    config.in_channels, config.image_size, config.num_classes, config.class_names = 3, 8, 2, ("a", "b")
    return config


def _tiny_rgb(n=16):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return ImageData(images, torch.arange(n) % 2, DatasetInfo("tiny", 3, 8, 2, ("a", "b")))


def _fp16_trainer(run_dir, scaler=None):
    config = _tiny_config(precision="fp16")
    config.diffusion.objective = "eps"  # its loss scale overflows fp16 within a few steps at 2^20
    if not run_dir.exists():
        checkpoint.create_run(run_dir, config)
    trainer = Trainer(config, run_dir, _tiny_rgb(), "cpu")
    if scaler is not None:
        trainer.scaler = scaler
    return trainer


def _train_steps(trainer, n):
    for _ in range(n):
        trainer.train_step()
        trainer.step += 1


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path):
    trainer = _fp16_trainer(tmp_path / "run", torch.amp.GradScaler("cpu", init_scale=2.0**100))
    assert trainer.scaler.is_enabled()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    ema_before = [p.detach().clone() for p in trainer.ema.parameters()]
    loss = trainer.train_step()  # loss x 2^100 overflows fp16 in the backward pass
    assert torch.isfinite(loss) and trainer.scaler.get_scale() == 2.0**99
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema_before, trainer.ema.parameters()))
    assert trainer.nan_skipped == 0  # an overflow is routine for fp16, not a NaN


def test_fp16_resume_restores_the_loss_scale(tmp_path):
    # growth_interval 1: the scale doubles after every good step and halves on overflow, so the
    # skip pattern (and the weights) depend on the scaler state carried across the resume
    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=1)

    straight = _fp16_trainer(tmp_path / "straight", scaler())
    init = [p.detach().clone() for p in straight.model.parameters()]
    _train_steps(straight, 8)
    assert straight.scaler.get_scale() < 2.0**20  # some steps overflowed...
    assert not all(torch.equal(a, b) for a, b in zip(init, straight.model.parameters()))  # ...some did not

    split = _fp16_trainer(tmp_path / "split", scaler())
    _train_steps(split, 4)
    split.save()
    _, train_state = checkpoint.load_state(checkpoint.latest_checkpoint(tmp_path / "split"))
    assert train_state["scaler"]["scale"] == split.scaler.get_scale() != 2.0**16
    resumed = _fp16_trainer(tmp_path / "split")  # a default scaler: the checkpoint's replaces it
    resumed.resume()
    assert resumed.scaler.get_scale() == train_state["scaler"]["scale"]
    _train_steps(resumed, 4)
    assert resumed.scaler.get_scale() == straight.scaler.get_scale()
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def _random_unet(**kwargs):
    torch.manual_seed(0)
    net = UNet(
        in_channels=3,
        image_size=8,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        num_heads=2,
        num_classes=3,
        dropout=0.2,
        **kwargs,
    )
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised layers would hide most of the gradient
            p.add_(0.1 * torch.randn_like(p))
    return net


def _gradients(net):
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([1, 10, 20, 40]), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(5)  # dropout masks: checkpointing must replay the same ones
    net.zero_grad()
    (net(x, t, y) ** 2).mean().backward()
    return {name: p.grad.clone() for name, p in net.named_parameters()}


def test_grad_checkpointing_gives_the_same_gradients():
    plain, checkpointed = _random_unet(), _random_unet()
    checkpointed.set_grad_checkpointing(True)
    calls, block = [], checkpointed.down[0][0]
    forward = block.forward
    block.forward = lambda *args: calls.append(1) or forward(*args)
    expected, got = _gradients(plain), _gradients(checkpointed)
    assert len(calls) == 2  # the ResBlock ran again in the backward pass: checkpointing is on
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert expected["down.0.0.in_layers.2.weight"].abs().sum() > 0


def test_grad_checkpointing_flag_reaches_the_model_not_the_architecture(tmp_path):
    config = _tiny_config(grad_checkpointing=True)
    trainer = Trainer(config, tmp_path, _tiny_rgb(), "cpu")
    assert trainer.model.down[0].grad_checkpointing and not trainer.ema.down[0].grad_checkpointing
    assert trainer.model.state_dict().keys() == build_net(config).state_dict().keys()
    config.model.arch = "convnext"
    config.model.channels, config.model.strides = (8, 16), (2,)
    with pytest.raises(DdpmkitError, match="--grad-checkpointing is available for --arch unet"):
        Trainer(config, tmp_path, _tiny_rgb(), "cpu")


# ---- presets -----------------------------------------------------------------------------------

# Ho et al.'s CIFAR-10 U-Net has 35,746,307 parameters; the cifar10-ddpm preset builds it
# (unconditional, additive step embeddings, 3x3 stride-2 downsampling): tests/test_presets.py.
DDPM_CIFAR10 = 35_746_307


@pytest.mark.parametrize(
    "name, size, classes, expected", [("cifar10-ddpm", 32, 10, DDPM_CIFAR10), ("imagenet64", 64, 1000, 125_027_846)]
)
def test_presets_build_with_their_parameter_counts(name, size, classes, expected):
    config = apply_overrides(RunConfig(preset=name), PRESETS[name])
    validate(config)
    config.in_channels, config.image_size, config.num_classes = 3, size, classes
    assert count_parameters(build_net(config)) == expected


if __name__ == "__main__":  # the torchrun worker of test_ranks_hold_identical_ema_and_only_rank_zero_writes
    sys.exit(_worker(sys.argv[1], sys.argv[2], sys.argv[3:]))
