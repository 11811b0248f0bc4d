"""The CUDA path: training (bf16, fp16, compiled), sampling against the CPU, checkpoints across devices.

These run only where a CUDA GPU is present (CI has none; they ran on an H100 through bench/gpu.sh,
which prints their result). Everything else in the suite runs on the CPU."""

import dataclasses

import pytest
import torch

from ddpmkit.core.samplers import SAMPLERS
from ddpmkit.data import DatasetInfo, ImageData
from ddpmkit.run.build import denoiser as denoiser_for
from ddpmkit.run.config import RunConfig, apply_overrides
from ddpmkit.run.sampling import generate
from ddpmkit.train import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _config(**train):
    config = apply_overrides(
        RunConfig(),
        {
            "model": {
                "base_channels": 16,
                "channel_mults": (1, 2),
                "num_res_blocks": 1,
                "attn_resolutions": (4,),
                "num_heads": 2,
            },
            "diffusion": {"timesteps": 50},
            "train": {
                "batch_size": 8,
                "warmup": 0,
                "sample_every": 10**6,
                "checkpoint_every": 10**6,
                "log_every": 1,
                **train,
            },
            "sample": {"steps": 5, "precision": "fp32"},
        },
    )
    config.in_channels, config.image_size, config.num_classes, config.class_names = 1, 8, 2, ("a", "b")
    return config


def _data(n=32):
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageData(images, torch.arange(n) % 2, DatasetInfo("tiny", 1, 8, 2, ("a", "b")))


@pytest.mark.parametrize("precision,compile", [("auto", False), ("fp16", False), ("fp32", True)])
def test_training_on_cuda_learns_and_saves_weights_the_cpu_loads(tmp_path, precision, compile):
    config = _config(precision=precision, compile=compile)
    trainer = Trainer(config, tmp_path, _data(), "cuda")
    assert next(trainer.model.parameters()).is_cuda
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    losses = [float(trainer.train_step()) for _ in range(3)]
    trainer.step = 3
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    trainer.save()
    cpu_trainer = Trainer(config, tmp_path, _data(), "cpu")
    cpu_trainer.resume()
    assert cpu_trainer.step == 3
    for k, v in cpu_trainer.ema.state_dict().items():
        torch.testing.assert_close(v, trainer.ema.state_dict()[k].cpu(), rtol=0, atol=0)


def test_cuda_sampling_matches_the_cpu_in_fp32():
    config = _config()
    net = Trainer(config, "/nonexistent", _data(), "cpu").ema
    labels = torch.tensor([0, 1, 0, 1])
    on_cpu = generate(denoiser_for(config, net), 4, (1, 8, 8), labels=labels, settings=config.sample)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    devices = []
    net.cuda().register_forward_hook(lambda module, args, out: devices.append(out.device.type))
    on_gpu = generate(denoiser_for(config, net), 4, (1, 8, 8), labels=labels, settings=config.sample, device="cuda")
    assert devices == ["cuda"] * config.sample.steps and on_gpu.device.type == "cpu"  # images come back to the host
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_on_cuda(sampler):
    """Deterministic samplers match the CPU in fp32; the stochastic ones draw their noise on the GPU."""
    config = _config()
    net = Trainer(config, "/nonexistent", _data(), "cpu").ema
    settings = dataclasses.replace(config.sample, sampler=sampler, spacing="karras", guidance=2.0)
    labels = torch.tensor([0, 1, 0, 1])
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    on_cpu = generate(denoiser_for(config, net), 4, (1, 8, 8), labels=labels, settings=settings)
    on_gpu = generate(denoiser_for(config, net.cuda()), 4, (1, 8, 8), labels=labels, settings=settings, device="cuda")
    assert torch.isfinite(on_gpu).all()
    if sampler in ("ddim", "dpm++", "euler", "heun", "unipc"):
        torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-3)
