"""Shared fixtures: a tiny MNIST-format dataset on disk and tiny-model flags."""

import numpy as np
import pytest
import torch
from torch import nn

from ddpmkit.data.idx import write_idx

TINY_MODEL = [
    "--base-channels",
    "8",
    "--channel-mults",
    "1,2",
    "--num-res-blocks",
    "1",
    "--attn-resolutions",
    "14",
    "--num-heads",
    "2",
    "--timesteps",
    "50",
]
FAST = [
    "--batch-size",
    "8",
    "--log-every",
    "5",
    "--sample-every",
    "1000",
    "--checkpoint-every",
    "1000",
    "--sample-steps",
    "2",
    "--no-progress",
    "--warmup",
    "5",
]


def make_idx_dataset(root, n=48, seed=0):
    """n 28x28 images of 10 classes (a bright square whose position encodes the class)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        r, col = 2 + 8 * (c // 4), 2 + 6 * (c % 4)
        images[i, r : r + 6, col : col + 6] = 230
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("t10k", n // 2)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images[:count], gzip=True)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels[:count].astype(np.uint8), gzip=True)
    return root


@pytest.fixture
def tiny_mnist(tmp_path):
    return make_idx_dataset(tmp_path / "mnist")


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)


def perturb(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Move every parameter off its initial value, so zero-initialised layers pass signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model
