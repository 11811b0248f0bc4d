"""Denoising networks net(x_t, t, y=None, x_self_cond=None) and a registry of them by name."""

from torch import nn

from ddpmkit.errors import DdpmkitError
from ddpmkit.models.convnext_unet import ConvNeXtUNet
from ddpmkit.models.unet import UNet

ARCHITECTURES: dict[str, type[nn.Module]] = {"unet": UNet, "convnext": ConvNeXtUNet}


def build_model(arch: str, **kwargs) -> nn.Module:
    """The network registered as arch, built with kwargs (its constructor's keywords)."""
    if arch not in ARCHITECTURES:
        raise DdpmkitError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[arch](**kwargs)


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters of model."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["ARCHITECTURES", "ConvNeXtUNet", "UNet", "build_model", "count_parameters"]
