"""Named configurations: overrides of the defaults as {section: {field: value}}.

`ddpmkit train --preset NAME`; flags given with a preset override it. Each entry says which paper or
notebook it follows and where it departs from it.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # The seed notebook (001): MNIST, T = 500, cosine, its ConvNeXt U-Net (m = 3), batch 128,
    # Adam lr 1e-3, 20 epochs, no EMA/clipping/warm-up/label dropout; 35 sampling steps, eta 0.1.
    "seed-notebook": {
        "model": {"arch": "convnext", "channels": (16, 32, 64, 128), "strides": (2, 2, 3), "mult": 3},
        "diffusion": {"timesteps": 500, "schedule": "cosine", "objective": "eps", "min_snr_gamma": None},
        "data": {"dataset": "mnist", "label_dropout": 0.0},
        "train": {
            "batch_size": 128,
            "optimizer": "adam",
            "lr": 1e-3,
            "epochs": 20,
            "warmup": 0,
            "grad_clip": 0.0,
            "ema_decay": 0.0,
            "weight_decay": 0.0,
        },
        "sample": {"sampler": "ddim", "steps": 35, "eta": 0.1},
    },
    # Seed 003's U-Net layout (lucidrains' denoising-diffusion-pytorch) at 28x28, through the
    # DDPM U-Net's options: 7x7 first conv, two residual blocks per level, linear attention as a
    # pre-norm residual block at every level (full attention in the mid block), space-to-depth
    # downsampling, nearest upsampling, and a final residual block on [x, first features].
    "seed-003": {
        "model": {
            "arch": "unet",
            "num_res_blocks": 2,
            "attn_resolutions": (28, 14, 7),
            "attn_type": "linear",
            "downsample": "space_to_depth",
            "upsample": "nearest",
            "init_conv_kernel": 7,
            "final_res_block": True,
        },
    },
    # Ho et al. 2020's CIFAR-10 setup (their paper, section 4 and appendix B, and their code):
    # unconditional, random horizontal flips; their U-Net: base 128, mults (1, 2, 2, 2), two residual
    # blocks per level, single-head attention at 16x16, dropout 0.1, the step embedding added in each
    # residual block, 3x3 stride-2 downsampling, nearest+conv upsampling: 35,746,307 parameters, as
    # theirs (35.7M); L_simple (eps, unweighted), linear betas, T = 1000; Adam 2e-4, batch 128, 5000
    # warm-up steps, clip 1, EMA 0.9999, 800k steps; ancestral sampling with sigma^2 = beta_t, all
    # 1000 steps. What still differs is listed in docs/presets.md and checked in tests/test_presets.py.
    "cifar10-ddpm": {
        "model": {
            "arch": "unet",
            "base_channels": 128,
            "channel_mults": (1, 2, 2, 2),
            "num_res_blocks": 2,
            "attn_resolutions": (16,),
            "num_heads": 1,
            "dropout": 0.1,
            "emb_injection": "add",
            "downsample": "conv3",
            "upsample": "nearest",
        },
        "diffusion": {"timesteps": 1000, "schedule": "linear", "objective": "eps", "min_snr_gamma": None},
        "data": {"dataset": "cifar10", "conditional": False, "hflip": True},
        "train": {
            "batch_size": 128,
            "optimizer": "adam",
            "lr": 2e-4,
            "weight_decay": 0.0,
            "warmup": 5000,
            "grad_clip": 1.0,
            "ema_decay": 0.9999,
            "steps": 800_000,
            "log_every": 100,
            "sample_every": 10_000,
            "checkpoint_every": 10_000,
        },
        "sample": {"sampler": "ddpm", "steps": 1000, "variance": "beta"},
    },
    # Nichol & Dhariwal 2021's ImageNet-64 size: base 128, mults (1, 2, 3, 4), three residual blocks
    # per level, 4-head attention at 32, 16 and 8, learned variances (L_hybrid), cosine, T = 4000;
    # Adam 1e-4, EMA 0.9999. batch_size is per process (see docs/imagenet64.md).
    "imagenet64": {
        "model": {
            "arch": "unet",
            "base_channels": 128,
            "channel_mults": (1, 2, 3, 4),
            "num_res_blocks": 3,
            "attn_resolutions": (32, 16, 8),
            "num_heads": 4,
            "dropout": 0.0,
            "upsample": "nearest",
        },
        "diffusion": {
            "timesteps": 4000,
            "schedule": "cosine",
            "objective": "eps",
            "learn_sigma": True,
            "min_snr_gamma": None,
        },
        "data": {"dataset": "folder", "image_size": 64},
        "train": {
            "batch_size": 128,
            "optimizer": "adamw",
            "lr": 1e-4,
            "weight_decay": 0.0,
            "warmup": 1000,
            "grad_clip": 1.0,
            "ema_decay": 0.9999,
            "log_every": 100,
            "sample_every": 10_000,
            "checkpoint_every": 10_000,
        },
        "sample": {"sampler": "ddpm", "steps": 100},
    },
    # One GPU, 28x28 data (Fashion-MNIST by default): a wider, deeper U-Net than the CPU default
    # (base 64, two residual blocks per level, attention at 14x14 and 7x7) and batch 256, so that
    # a step gives the GPU enough work; bf16 autocast ("auto"). See bench/results/ for its speed.
    # L_simple, as it was measured in docs/gpu.md (min-SNR is untested on the GPU).
    "fashion-gpu": {
        "model": {
            "arch": "unet",
            "base_channels": 64,
            "channel_mults": (1, 2, 2),
            "num_res_blocks": 2,
            "attn_resolutions": (14, 7),
        },
        "diffusion": {"min_snr_gamma": None},
        "data": {"dataset": "fashion-mnist"},
        "train": {
            "batch_size": 256,
            "lr": 1e-3,
            "warmup": 500,
            "ema_decay": 0.9995,
            "log_every": 100,
            "sample_every": 5000,
            "checkpoint_every": 5000,
        },
    },
}
