"""The ConvNeXt U-Net of the seed-001 MNIST notebook (okarthikb/diffusion), written afresh.

Every level is a ConvNeXt block followed by single-group attention; strided 3x3 convs go down,
transposed 3x3 convs come back up, with an output padding worked out for each level so that any
image size comes back to itself (the notebook derived every level's padding from the first level's
size, which only happens to work at 28x28).
"""

import torch
from torch import Tensor, nn

from ddpmkit.models.layers import Attention2d, ClassEmbedding, SinusoidalEmbedding, network_input, require


def conv_out_size(n: int, stride: int) -> int:
    """Output size of a 3x3 conv with padding 1: floor((n + 2p - k) / s) + 1."""
    return (n + 2 - 3) // stride + 1


def output_padding(n_in: int, n_out: int, stride: int) -> int:
    """Output padding of a 3x3 transposed conv, padding 1, taking n_out back to n_in.

    n_in = (n_out - 1) s - 2p + k + output_padding; it is (n_in - 1) mod s, so always below s.
    """
    return n_in - ((n_out - 1) * stride - 2 + 3)


def up_conv(c_in: int, c_out: int, stride: int, n_in: int, n_out: int) -> nn.ConvTranspose2d:
    """The 3x3 transposed conv that undoes a strided 3x3 conv, size n_out back to n_in."""
    padding = output_padding(n_in, n_out, stride)
    return nn.ConvTranspose2d(c_in, c_out, 3, stride, padding=1, output_padding=padding)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, plus projected step (and class) embeddings, then
    GN, 3x3 conv to mult * c_out, GELU, GN, 3x3 conv to c_out; a 1x1 shortcut when widths differ.
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, mult: int = 3, conditional: bool = False):
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 7, padding=3, groups=c_in)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_in))
        self.class_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_in)) if conditional else None
        self.net = nn.Sequential(
            nn.GroupNorm(1, c_in),
            nn.Conv2d(c_in, mult * c_out, 3, padding=1),
            nn.GELU(),
            nn.GroupNorm(1, mult * c_out),
            nn.Conv2d(mult * c_out, c_out, 3, padding=1),
        )
        self.shortcut = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, t_emb: Tensor, class_emb: Tensor | None = None) -> Tensor:
        h = self.depthwise(x) + self.time_proj(t_emb)[:, :, None, None]
        if self.class_proj is not None:
            h = h + self.class_proj(class_emb)[:, :, None, None]
        return self.net(h) + self.shortcut(x)


class ConvNeXtStage(nn.Module):
    """The notebook's Block: a ConvNeXtBlock, then pre-norm attention with one GroupNorm group."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, mult: int, conditional: bool, num_heads: int):
        super().__init__()
        self.block = ConvNeXtBlock(c_in, c_out, emb_dim, mult, conditional)
        self.attn = Attention2d(c_out, num_heads, "full", groups=1)

    def forward(self, x: Tensor, t_emb: Tensor, class_emb: Tensor | None) -> Tensor:
        return self.attn(self.block(x, t_emb, class_emb))


def validate(c: dict) -> None:
    """Raise DdpmkitError, in one sentence, for a ConvNeXtUNet config that cannot be built."""
    for name in ("in_channels", "image_size", "mult", "num_heads"):
        require(c[name] >= 1, f"{name} must be a positive integer, got {c[name]}.")
    channels, strides, heads = c["channels"], c["strides"], c["num_heads"]
    require(len(channels) >= 2, f"channels needs at least two levels, got {channels}.")
    require(
        len(strides) == len(channels) - 1,
        f"strides needs one entry per downsampling ({len(channels) - 1}), got {strides}.",
    )
    require(min(strides) >= 1, f"strides must be positive integers, got {strides}.")
    require(
        channels[0] >= 2 and min(channels) >= 1,
        f"channels must be positive and channels[0] >= 2, got {channels}.",
    )
    widths = [*channels, channels[0] // 2]
    require(
        all(w % heads == 0 for w in widths),
        f"the channel counts {widths} must all be divisible by num_heads={heads}.",
    )
    require(
        c["num_classes"] >= 0,
        f"num_classes must be 0 (unconditional) or more, got {c['num_classes']}.",
    )


class ConvNeXtUNet(nn.Module):
    """ConvNeXt U-Net: level i has channels[i] and is reached by a stride strides[i-1] conv.

    The step embedding is the fixed sinusoidal one of size emb_dim (4 * image_size by default) and
    the class embedding is learned, each projected into every block. Going up, level i's stage maps
    the concatenation [upsampled, skip] of 2 * channels[i] to channels[i], except the top one,
    which gives channels[0] // 2; a last ConvNeXtBlock maps that to the output channels.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        channels: tuple[int, ...] = (16, 32, 64, 128),
        strides: tuple[int, ...] = (2, 2, 3),
        mult: int = 3,
        emb_dim: int | None = None,
        num_classes: int = 0,
        learn_sigma: bool = False,
        self_condition: bool = False,
        num_heads: int = 1,
    ):
        super().__init__()
        self.config = dict(
            in_channels=in_channels,
            image_size=image_size,
            channels=list(channels),
            strides=list(strides),
            mult=mult,
            emb_dim=4 * image_size if emb_dim is None else emb_dim,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            self_condition=self_condition,
            num_heads=num_heads,
        )
        validate(self.config)
        self._build()

    def _build(self) -> None:
        c = self.config
        channels, strides, emb_dim = c["channels"], c["strides"], c["emb_dim"]
        self.time_embed = SinusoidalEmbedding(emb_dim)
        self.class_embed = ClassEmbedding(c["num_classes"], emb_dim) if c["num_classes"] else None

        def stage(c_in: int, c_out: int) -> ConvNeXtStage:
            return ConvNeXtStage(c_in, c_out, emb_dim, c["mult"], c["num_classes"] > 0, c["num_heads"])

        sizes = [c["image_size"]]
        for s in strides:
            sizes.append(conv_out_size(sizes[-1], s))
        x_channels = c["in_channels"] * (2 if c["self_condition"] else 1)
        self.first = stage(x_channels, channels[0])
        self.downs = nn.ModuleList(
            nn.Conv2d(channels[i - 1], channels[i], 3, strides[i - 1], padding=1) for i in range(1, len(channels))
        )
        self.down_stages = nn.ModuleList(stage(ch, ch) for ch in channels[1:])
        levels = range(len(channels) - 1, 0, -1)
        self.ups = nn.ModuleList(
            up_conv(channels[i], channels[i - 1], strides[i - 1], sizes[i - 1], sizes[i]) for i in levels
        )
        self.up_stages = nn.ModuleList(
            stage(2 * channels[i - 1], channels[i - 1] if i > 1 else channels[0] // 2) for i in levels
        )
        out_channels = c["in_channels"] * (2 if c["learn_sigma"] else 1)
        self.final = ConvNeXtBlock(channels[0] // 2, out_channels, emb_dim, c["mult"], c["num_classes"] > 0)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, x_self_cond: Tensor | None = None) -> Tensor:
        """x [B, C, H, W] at step t [B] (1..T, not normalised); y [B] class ids, num_classes = null.

        y is ignored by an unconditional network and x_self_cond by one without self_condition.
        """
        x = network_input(self.config, x, x_self_cond, "ConvNeXtUNet")
        t_emb = self.time_embed(t)
        class_emb = None if self.class_embed is None else self.class_embed(y, len(t))
        h, skips = self.first(x, t_emb, class_emb), []
        for down, stage in zip(self.downs, self.down_stages, strict=True):
            skips.append(h)
            h = stage(down(h), t_emb, class_emb)
        for up, stage in zip(self.ups, self.up_stages, strict=True):
            h = stage(torch.cat([up(h), skips.pop()], dim=1), t_emb, class_emb)
        return self.final(h, t_emb, class_emb)
