"""A dataset in memory: uint8 images ``[N, C, H, W]``, labels, and what a model needs to know of it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddpmkit.errors import DdpmkitError


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: image shape and the classes."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class ImageData:
    """A whole dataset in memory: uint8 ``images [N, C, H, W]``, long ``labels [N]`` (-1: unlabelled)."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.long or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be long [{len(self.images)}], got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.images)


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 ``[N, C, H, W]`` so the shorter side is ``size`` (bicubic, antialiased), then center-crop."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    new_h, new_w = max(size, round(h * size / min(h, w))), max(size, round(w * size / min(h, w)))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return _resize(images, new_h, new_w)[..., top : top + size, left : left + size].contiguous()


def resize_pad(images: torch.Tensor, size: int, fill: tuple[int, ...]) -> torch.Tensor:
    """Letterbox: resize uint8 ``[N, C, H, W]`` so the longer side is ``size`` (bicubic, antialiased),
    then centre it on a ``size`` x ``size`` canvas of colour ``fill`` (one value per channel)."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    new_h, new_w = max(1, round(h * size / max(h, w))), max(1, round(w * size / max(h, w)))
    out = torch.tensor(fill, dtype=torch.uint8).view(1, c, 1, 1).repeat(n, 1, size, size)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[..., top : top + new_h, left : left + new_w] = _resize(images, new_h, new_w)
    return out


def _resize(images: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` resized to ``new_h`` x ``new_w``, bicubic with antialiasing, rounded back to uint8."""
    n, c = images.shape[:2]
    out = torch.empty((n, c, new_h, new_w), dtype=torch.uint8)
    for start in range(0, n, 4096):  # chunks bound the float copy's memory
        chunk = F.interpolate(
            images[start : start + 4096].float(),
            size=(new_h, new_w),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )
        out[start : start + 4096] = chunk.round().clamp(0, 255)
    return out


def check_image_size(image_size) -> None:
    """image_size is None (keep the native size) or a positive int."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise DdpmkitError(f"image_size must be a positive integer, got {image_size!r}.")
