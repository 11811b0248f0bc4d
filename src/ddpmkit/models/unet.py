"""The DDPM U-Net (Ho et al. 2020) in the improved-diffusion layout (Nichol & Dhariwal 2021)."""

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ddpmkit.models.layers import (
    ATTENTION,
    DOWNSAMPLE,
    EMB_INJECTIONS,
    TIME_EMBEDDINGS,
    UPSAMPLE,
    Attention2d,
    ClassEmbedding,
    Downsample,
    ResBlock,
    TimestepEmbedder,
    Upsample,
    check_choice,
    network_input,
    norm,
    require,
    zero_init,
)


class EmbedSequential(nn.Sequential):
    """A Sequential that hands the embedding to the ResBlocks inside it.

    With grad_checkpointing, ResBlocks and attention keep only their inputs for the backward
    pass and recompute the rest there (the same numbers, less memory, one more forward).
    """

    grad_checkpointing = False

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            args = (x, emb) if isinstance(layer, ResBlock) else (x,)
            if self.grad_checkpointing and torch.is_grad_enabled() and isinstance(layer, (ResBlock, Attention2d)):
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return x


def validate(c: dict) -> None:
    """Raise DdpmkitError, in one sentence naming the constructor keyword, for a config that cannot be built."""
    for name in (
        "in_channels",
        "image_size",
        "base_channels",
        "num_res_blocks",
        "num_heads",
        "groups",
        "timesteps",
        "init_conv_kernel",
    ):
        require(c[name] >= 1, f"{name} must be a positive integer, got {c[name]}.")
    mults, size, heads = c["channel_mults"], c["image_size"], c["num_heads"]
    require(len(mults) > 0 and min(mults) >= 1, f"channel_mults must be positive integers, got {mults}.")
    require(
        c["num_classes"] >= 0,
        f"num_classes must be 0 (unconditional) or more, got {c['num_classes']}.",
    )
    require(0 <= c["dropout"] < 1, f"dropout must be in [0, 1), got {c['dropout']}.")
    require(
        c["init_conv_kernel"] % 2 == 1,
        f"init_conv_kernel must be odd, got {c['init_conv_kernel']}.",
    )
    factor = 2 ** (len(mults) - 1)
    require(
        size % factor == 0,
        f"image_size {size} is not divisible by {factor}: the {len(mults)} levels of channel_mults "
        f"{tuple(mults)} halve it {len(mults) - 1} times.",
    )
    sizes = [size // 2**level for level in range(len(mults))]
    missing = sorted(set(c["attn_resolutions"]) - set(sizes))
    require(not missing, f"attn_resolutions {missing} match no level; the levels are {sizes}.")
    # attention splits its channels into heads: at the levels with attention, and in the mid block (the last level)
    widths = sorted(
        {c["base_channels"] * m for m, s in zip(mults, sizes) if s in c["attn_resolutions"]}
        | {c["base_channels"] * mults[-1]}
    )
    require(
        all(w % heads == 0 for w in widths),
        f"num_heads {heads} must divide the width of every level with attention, {widths} "
        "(base_channels x channel_mults).",
    )
    check_choice(c["attn_type"], ATTENTION, "attn_type")
    check_choice(c["time_embedding"], TIME_EMBEDDINGS, "time_embedding")
    check_choice(c["downsample"], DOWNSAMPLE, "downsample")
    check_choice(c["emb_injection"], EMB_INJECTIONS, "emb_injection")
    check_choice(c["upsample"], UPSAMPLE, "upsample")


class UNet(nn.Module):
    """The DDPM U-Net: ResBlocks with a time (and class) embedding, attention at chosen sizes.

    Down: init conv, then per level num_res_blocks ResBlocks (each followed by attention when the
    level's size is in attn_resolutions) and a Downsample except at the last level; every output is
    kept as a skip. Mid: ResBlock, full attention, ResBlock. Up: per level num_res_blocks + 1
    ResBlocks, each eating one skip (as in improved-diffusion), then an Upsample except at the top.
    Out: GroupNorm, SiLU, zero-initialised 3x3 conv, so the untrained network outputs zeros.

    The embedding is 4 * base_channels wide. Options: self_condition feeds [x_t, x_self_cond];
    learn_sigma outputs [prediction (eps, x0 or v), variance interpolation] along channels;
    final_res_block (lucidrains' layout, with init_conv_kernel=7) adds a ResBlock over
    [h, init conv features] before the output; emb_injection="add" with downsample="conv3" and
    upsample="nearest" is Ho et al.'s network (see the cifar10-ddpm preset). Downsample and Upsample
    keep the channel count; each level's first ResBlock changes it.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        base_channels: int = 64,
        channel_mults: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (14,),
        dropout: float = 0.0,
        num_heads: int = 4,
        num_classes: int = 0,
        learn_sigma: bool = False,
        self_condition: bool = False,
        attn_type: str = "full",
        time_embedding: str = "sinusoidal",
        groups: int = 32,
        downsample: str = "conv",
        upsample: str = "transposed",
        init_conv_kernel: int = 3,
        final_res_block: bool = False,
        timesteps: int = 1000,
        emb_injection: str = "scale_shift",
    ):
        super().__init__()
        self.config = dict(
            in_channels=in_channels,
            image_size=image_size,
            base_channels=base_channels,
            channel_mults=list(channel_mults),
            num_res_blocks=num_res_blocks,
            attn_resolutions=list(attn_resolutions),
            dropout=dropout,
            num_heads=num_heads,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            self_condition=self_condition,
            attn_type=attn_type,
            time_embedding=time_embedding,
            groups=groups,
            downsample=downsample,
            upsample=upsample,
            init_conv_kernel=init_conv_kernel,
            final_res_block=final_res_block,
            timesteps=timesteps,
            emb_injection=emb_injection,
        )
        validate(self.config)
        self._build()

    def _build(self) -> None:
        c = self.config
        base, groups = c["base_channels"], c["groups"]
        self.emb_dim = 4 * base
        self.time_embed = TimestepEmbedder(base, self.emb_dim, c["time_embedding"], c["timesteps"])
        self.class_embed = ClassEmbedding(c["num_classes"], self.emb_dim) if c["num_classes"] else None
        x_channels = c["in_channels"] * (2 if c["self_condition"] else 1)
        kernel = c["init_conv_kernel"]
        self.init_conv = nn.Conv2d(x_channels, base, kernel, padding=kernel // 2)
        self.down, skip_channels = self._down_path()
        ch = skip_channels[-1]
        self.mid = EmbedSequential(
            self._res_block(ch, ch),
            Attention2d(ch, c["num_heads"], "full", groups),
            self._res_block(ch, ch),
        )
        self.up = self._up_path(skip_channels)
        width = base * c["channel_mults"][0]
        self.final_res_block = self._res_block(width + base, width) if c["final_res_block"] else None
        out_channels = c["in_channels"] * (2 if c["learn_sigma"] else 1)
        self.out = nn.Sequential(
            norm(width, groups), nn.SiLU(), zero_init(nn.Conv2d(width, out_channels, 3, padding=1))
        )

    def _res_block(self, c_in: int, c_out: int) -> ResBlock:
        c = self.config
        return ResBlock(c_in, c_out, self.emb_dim, c["dropout"], c["groups"], c["emb_injection"])

    def _stage(self, c_in: int, c_out: int, size: int) -> EmbedSequential:
        """A ResBlock, followed by attention when size is one of attn_resolutions."""
        c = self.config
        stage = EmbedSequential(self._res_block(c_in, c_out))
        if size in c["attn_resolutions"]:
            stage.append(Attention2d(c_out, c["num_heads"], c["attn_type"], c["groups"]))
        return stage

    def _down_path(self) -> tuple[nn.ModuleList, list[int]]:
        c = self.config
        stages, ch, size = nn.ModuleList(), c["base_channels"], c["image_size"]
        skip_channels = [ch]
        for level, mult in enumerate(c["channel_mults"]):
            for _ in range(c["num_res_blocks"]):
                stages.append(self._stage(ch, c["base_channels"] * mult, size))
                ch = c["base_channels"] * mult
                skip_channels.append(ch)
            if level < len(c["channel_mults"]) - 1:
                stages.append(EmbedSequential(Downsample(ch, ch, c["downsample"])))
                skip_channels.append(ch)
                size //= 2
        return stages, skip_channels

    def _up_path(self, skip_channels: list[int]) -> nn.ModuleList:
        c = self.config
        skips, stages, ch = list(skip_channels), nn.ModuleList(), skip_channels[-1]
        size = c["image_size"] // 2 ** (len(c["channel_mults"]) - 1)
        for level, mult in reversed(list(enumerate(c["channel_mults"]))):
            for i in range(c["num_res_blocks"] + 1):
                stage = self._stage(ch + skips.pop(), c["base_channels"] * mult, size)
                ch = c["base_channels"] * mult
                if level > 0 and i == c["num_res_blocks"]:
                    stage.append(Upsample(ch, ch, c["upsample"]))
                    size *= 2
                stages.append(stage)
        return stages

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Trade compute for memory in training; not part of the architecture (weights unchanged)."""
        for module in self.modules():
            if isinstance(module, EmbedSequential):
                module.grad_checkpointing = enabled

    def embed(self, t: Tensor, y: Tensor | None) -> Tensor:
        """What every ResBlock sees: time embedding (+ class embedding; y None = null class)."""
        emb = self.time_embed(t)
        if self.class_embed is not None:
            emb = emb + self.class_embed(y, len(t))
        return emb

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, x_self_cond: Tensor | None = None) -> Tensor:
        """x [B, C, H, W] at step t [B] (1..T, not normalised); y [B] class ids, num_classes = null.

        y is ignored by an unconditional network and x_self_cond by one without self_condition.
        """
        x = network_input(self.config, x, x_self_cond, "UNet")
        emb = self.embed(t, y)
        h0 = self.init_conv(x)
        h, skips = h0, [h0]
        for stage in self.down:
            h = stage(h, emb)
            skips.append(h)
        h = self.mid(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        if self.final_res_block is not None:
            h = self.final_res_block(torch.cat([h, h0], dim=1), emb)
        return self.out(h)
