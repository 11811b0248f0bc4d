"""The FID InceptionV3: the network that FID and the Inception score are defined on, torch only.

It is TensorFlow's 2015-12-05 Inception graph (the one the original FID and IS code ran), as
pytorch-fid and torch-fidelity port it, with their parameter names, so that torch-fidelity's
published weights file (INCEPTION_URL in eval.inception) loads into it as it is. Where that graph
differs from torchvision's InceptionV3 it is followed here:

  * the input, uint8 RGB of any size, is resized to 299x299 by TF 1.x bilinear resizing (output
    pixel i samples the input at i * in / out, no half-pixel offset) and scaled to (x - 128) / 128;
  * average pools inside the blocks leave the zero padding out of the mean;
  * the pool branch of the last block takes a max, not an average;
  * the classifier has 1008 outputs (1001 classes and 7 unused) and no auxiliary head.

The FID code asks for two things per image: the 2048 pooled features (FID) and the 1008 logits
without the classifier's bias ("logits_unbiased" in torch-fidelity, the Inception score).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddpmkit.errors import DdpmkitError

INPUT_SIZE = 299
FEATURES = 2048
LOGITS = 1008


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF 1.x `resize_bilinear(align_corners=False)` of [B, C, H, W] floats to size x size.

    Output pixel i reads the input at p = i * in / out (in x's dtype, as TF does in float32), mixing
    pixels floor(p) and floor(p) + 1 (the last one repeated at the edge) by the fraction of p.
    """

    def taps(n_in: int):
        p = torch.arange(size, dtype=x.dtype, device=x.device) * torch.tensor(n_in / size, dtype=x.dtype)
        lo = p.long()
        return lo, (lo + 1).clamp(max=n_in - 1), p - lo

    lo_y, hi_y, fy = taps(x.shape[2])
    lo_x, hi_x, fx = taps(x.shape[3])
    top, bottom = x[:, :, lo_y], x[:, :, hi_y]
    left = top[..., lo_x] + (top[..., hi_x] - top[..., lo_x]) * fx
    right = bottom[..., lo_x] + (bottom[..., hi_x] - bottom[..., lo_x]) * fx
    return left + (right - left) * fy[:, None]


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, TF's) -> ReLU; `pad="same"` keeps the size at stride 1."""

    def __init__(self, c_in: int, c_out: int, kernel, stride: int = 1, pad=0):
        super().__init__()
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = tuple(k // 2 for k in kernel) if pad == "same" else pad
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _chain(block: nn.Module, x: torch.Tensor, *names: str) -> torch.Tensor:
    """x through the block's layers `names`, in turn."""
    for name in names:
        x = getattr(block, name)(x)
    return x


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF: the mean of real pixels


class BlockA(nn.Module):
    """35x35: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1 (`Mixed_5b`..`5d`)."""

    def __init__(self, c_in: int, pool_channels: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = ConvBN(c_in, 48, 1), ConvBN(48, 64, 5, pad="same")
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = ConvBN(64, 96, 3, pad="same"), ConvBN(96, 96, 3, pad="same")
        self.branch_pool = ConvBN(c_in, pool_channels, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                _chain(self, x, "branch5x5_1", "branch5x5_2"),
                _chain(self, x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                self.branch_pool(_avg_pool(x)),
            ],
            1,
        )


class BlockB(nn.Module):
    """35x35 -> 17x17: 3x3 / 2 | 1x1 -> 3x3 -> 3x3 / 2 | max pool / 2 (`Mixed_6a`)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = ConvBN(64, 96, 3, pad="same"), ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                _chain(self, x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class BlockC(nn.Module):
    """17x17 with factorised 7x7s: 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> (7x1 -> 1x7) x 2 | avg pool -> 1x1
    (`Mixed_6b`..`6e`; c7 channels inside the 7x7 branches)."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), pad="same")
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), pad="same")
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), pad="same")
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), pad="same")
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), pad="same")
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), pad="same")
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                _chain(self, x, "branch7x7_1", "branch7x7_2", "branch7x7_3"),
                _chain(self, x, *(f"branch7x7dbl_{i}" for i in range(1, 6))),
                self.branch_pool(_avg_pool(x)),
            ],
            1,
        )


class BlockD(nn.Module):
    """17x17 -> 8x8: 1x1 -> 3x3 / 2 | 1x1 -> 1x7 -> 7x1 -> 3x3 / 2 | max pool / 2 (`Mixed_7a`)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = ConvBN(c_in, 192, 1), ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), pad="same")
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), pad="same")
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                _chain(self, x, "branch3x3_1", "branch3x3_2"),
                _chain(self, x, *(f"branch7x7x3_{i}" for i in range(1, 5))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class BlockE(nn.Module):
    """8x8, widened: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1 (`Mixed_7b`, `7c`).

    pool: "avg" in Mixed_7b, "max" in Mixed_7c (so in the TF graph, unlike the paper)."""

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), pad="same")
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), pad="same")
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, pad="same")
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), pad="same")
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), pad="same")
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = _chain(self, x, "branch3x3dbl_1", "branch3x3dbl_2")
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(a),
                self.branch3x3_2b(a),
                self.branch3x3dbl_3a(b),
                self.branch3x3dbl_3b(b),
                self.branch_pool(pooled),
            ],
            1,
        )


class InceptionV3(nn.Module):
    """uint8 RGB images [B, 3, H, W] -> (pooled features [B, 2048], logits without bias [B, 1008]), float32."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, pad="same")
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, "avg"), BlockE(2048, "max")
        self.fc = nn.Linear(FEATURES, LOGITS)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise DdpmkitError(
                f"InceptionV3 takes uint8 RGB images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        x = resize_bilinear_tf1(images.float(), INPUT_SIZE)
        x = (x - 128) / 128
        x = _chain(self, x, "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3")  # 147x147
        x = _chain(self, F.max_pool2d(x, 3, stride=2), "Conv2d_3b_1x1", "Conv2d_4a_3x3")  # 71x71
        x = _chain(self, F.max_pool2d(x, 3, stride=2), "Mixed_5b", "Mixed_5c", "Mixed_5d")  # 35x35
        x = _chain(self, x, "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")  # 17x17
        x = _chain(self, x, "Mixed_7a", "Mixed_7b", "Mixed_7c")  # 8x8
        features = x.mean((2, 3))
        return features, features @ self.fc.weight.T
