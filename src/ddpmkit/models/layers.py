"""Building blocks shared by the networks: embeddings, ResBlock, Attention2d, Down/Upsample."""

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpmkit.errors import DdpmkitError


def require(ok: bool, message: str) -> None:
    """Raise DdpmkitError(message) unless ok."""
    if not ok:
        raise DdpmkitError(message)


def check_choice(value: str, choices: Iterable[str], what: str) -> None:
    """Raise DdpmkitError unless value is one of choices."""
    choices = tuple(choices)
    require(value in choices, f"unknown {what} {value!r}; choose one of: {', '.join(choices)}.")


def group_count(channels: int, groups: int) -> int:
    """The largest number of GroupNorm groups <= groups that divides channels."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of module, so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class SinusoidalEmbedding(nn.Module):
    """Transformer encoding of the step t: [sin(t w_i), cos(t w_i)], w_i = 10000^(-i / (dim/2))."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        require(dim >= 2 and dim % 2 == 0, f"a sinusoidal embedding needs an even dim, got {dim}.")
        self.out_dim, self.max_period = dim, max_period
        self.register_buffer("freqs", self._frequencies(), persistent=False)

    def _frequencies(self) -> Tensor:
        half = self.out_dim // 2
        return torch.exp(-math.log(self.max_period) * torch.arange(half) / half)  # w_i = P^(-i/half)

    def reset_buffers(self) -> None:
        """Recompute the frequencies (on the default device): no weights file holds them, so a
        network built on the meta device and given its weights gets them here."""
        self.freqs = self._frequencies()

    def forward(self, t: Tensor) -> Tensor:
        angles = t[:, None].to(self.freqs.dtype) * self.freqs  # [B, half]: t * w_i
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class LearnedSinusoidalEmbedding(nn.Module):
    """Fourier features [s, sin(2 pi w s), cos(2 pi w s)] of s = t / T, w ~ N(0, 1) learned or
    fixed (random). As lucidrains' RandomOrLearnedSinusoidalPosEmb, which its continuous-time models
    feed with s in [0, 1]: on the integer steps t themselves, w t would alias (one cycle per ~1/w
    steps) and the raw feature t ~ 1000 would swamp the class embedding. Output: dim + 1 features.
    """

    def __init__(self, dim: int, random: bool = False, T: int = 1):
        super().__init__()
        require(dim >= 2 and dim % 2 == 0, f"a Fourier embedding needs an even dim, got {dim}.")
        weights = torch.randn(dim // 2)
        if random:
            self.register_buffer("weights", weights)
        else:
            self.weights = nn.Parameter(weights)
        self.out_dim, self.T = dim + 1, T

    def forward(self, t: Tensor) -> Tensor:
        t = t[:, None].to(self.weights.dtype) / self.T  # s = t / T in [0, 1]
        angles = 2 * math.pi * t * self.weights  # 2 pi w s
        return torch.cat([t, angles.sin(), angles.cos()], dim=-1)


TIME_EMBEDDINGS = ("sinusoidal", "learned", "random_fourier")


class TimestepEmbedder(nn.Sequential):
    """t -> Fourier features -> Linear -> SiLU -> Linear: the DDPM time embedding [B, emb_dim]."""

    def __init__(self, freq_dim: int, emb_dim: int, kind: str = "sinusoidal", T: int = 1000):
        check_choice(kind, TIME_EMBEDDINGS, "time embedding")
        if kind == "sinusoidal":
            features = SinusoidalEmbedding(freq_dim)
        else:
            features = LearnedSinusoidalEmbedding(freq_dim, random=kind == "random_fourier", T=T)
        super().__init__(features, nn.Linear(features.out_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


class ClassEmbedding(nn.Module):
    """Learned class vectors; the extra row num_classes is the null class (no label, guidance)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.null_class = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Tensor | None, batch_size: int) -> Tensor:
        if y is None:
            y = torch.full((batch_size,), self.null_class, device=self.table.weight.device)
        return self.table(y)


def norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with as many groups as possible up to groups."""
    return nn.GroupNorm(group_count(channels, groups), channels)


def network_input(config: dict, x: Tensor, x_self_cond: Tensor | None, name: str) -> Tensor:
    """Check the image size the network was built for, and append x_self_cond (zeros when None)
    as extra channels when it is self-conditioned."""
    size = config["image_size"]
    require(
        tuple(x.shape[-2:]) == (size, size),
        f"the {name} was built for {size}x{size} images, got {x.shape[-2]}x{x.shape[-1]}.",
    )
    if config["self_condition"]:
        x = torch.cat([x, torch.zeros_like(x) if x_self_cond is None else x_self_cond], dim=1)
    return x


EMB_INJECTIONS = ("scale_shift", "add")  # how a ResBlock takes the embedding


class ResBlock(nn.Module):
    """Pre-activation residual block; the embedding scales and shifts the normalised features.

    h = conv(SiLU(GN(x)));  (scale, shift) = Linear(SiLU(emb));
    out = skip(x) + conv0(Dropout(SiLU(GN(h) * (1 + scale) + shift))).
    Applying the embedding after the GroupNorm (improved-diffusion's scale-shift norm) keeps it from
    being normalised away, which an embedding added before GroupNorm is when groups hold one channel.
    With ``emb_injection="add"`` it is Ho et al.'s block instead: h + Linear(SiLU(emb)) goes into the
    second GroupNorm, out = skip(x) + conv0(Dropout(SiLU(GN(h + Linear(SiLU(emb)))))).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        emb_dim: int,
        dropout: float = 0.0,
        groups: int = 32,
        emb_injection: str = "scale_shift",
    ):
        super().__init__()
        check_choice(emb_injection, EMB_INJECTIONS, "emb_injection")
        self.scale_shift = emb_injection == "scale_shift"
        self.in_layers = nn.Sequential(norm(c_in, groups), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, (2 if self.scale_shift else 1) * c_out))
        self.out_norm = norm(c_out, groups)
        self.out_layers = nn.Sequential(
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_init(nn.Conv2d(c_out, c_out, 3, padding=1)),
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h, e = self.in_layers(x), self.emb_proj(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift  # FiLM: GN(h) (1 + scale) + shift
        else:
            h = self.out_norm(h + e)  # Ho et al.: GN(h + Linear(SiLU(emb)))
        return self.skip(x) + self.out_layers(h)


# At or below this many positions (8x8), bf16 training on a CPU runs attention faster as two matmuls
# than with SDPA's fused kernel, whose bf16 backward is slow at small N: 3-6x per call forward +
# backward (bench/attention.py), 1.06-1.27x per training step of the default model (bench/speed.py,
# two before/after pairs).
MATMUL_ATTENTION_MAX_POSITIONS = 64
# Above that and up to 16x16, bf16 training runs the fused kernel in fp32: its fp32 backward beats its
# bf16 one there (forward + backward 1.42-1.45x at 196 positions, 1.13-1.23x at 256 in two runs of
# bench/attention.py), while at 32x32 the bf16 kernel is faster again (0.82x).
FP32_ATTENTION_MAX_POSITIONS = 256
# bf16 forward passes (sampling) up to 16x16 run the two matmuls, a few images at a time so that the
# fp32 scores stay in cache (MATMUL_ATTENTION_CHUNK_BYTES). Unchunked, the scores of 64 images at
# 14x14 (39 MB) fell out of cache and the matmuls measured 0.76-0.91x the fused kernel in model
# sampling; chunked, a bf16 forward pass of the diffusers-matched network at 1x28x28 ran 1.08x faster
# than with the fused kernel, the default and lucidrains-matched ones 1.04-1.05x (bench/attention.py's
# in-model table, AVX-512 BF16, 2026-12-03).
MATMUL_FORWARD_MAX_POSITIONS = 256
MATMUL_ATTENTION_CHUNK_BYTES = 4 << 20


def full_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q^T k / sqrt(d)) v over positions; q, k, v and the result are [B, heads, d, N].

    The same formula by whichever kernel measured faster (`cpu_attention_kernel`): in bf16 on a CPU,
    two matmuls (`matmul_attention`) for training at a few positions and for forward passes up to
    16x16, the fused kernel in fp32 (`fused_fp32_attention`) for training up to 16x16; else PyTorch's
    fused kernel (`fused_attention`)."""
    return ATTENTION_KERNELS[cpu_attention_kernel(q)](q, k, v)


def is_training_pass(q: Tensor) -> bool:
    """Whether attention on q will be differentiated (a training step), not a forward pass only."""
    return torch.is_grad_enabled() and q.requires_grad


def cpu_attention_kernel(q: Tensor) -> str:
    """The name of the kernel full_attention runs for q: "matmul", "fused_fp32" or "fused"."""
    training = is_training_pass(q)
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return "fused"
    positions = q.shape[-1]
    if not training:
        return "matmul" if positions <= MATMUL_FORWARD_MAX_POSITIONS else "fused"
    if positions <= MATMUL_ATTENTION_MAX_POSITIONS:
        return "matmul"
    return "fused_fp32" if positions <= FP32_ATTENTION_MAX_POSITIONS else "fused"


def fused_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """full_attention by SDPA, which takes [B, heads, N, d].

    Made contiguous there, so that PyTorch's fused (flash) kernel may run: it needs d at stride 1, and
    a transposed view sends SDPA to its unfused math path, which on a CPU is 3-7x slower at 14x14
    positions and above (bench/results/attention-*.md, bench/attention.py)."""
    q, k, v = (z.transpose(-1, -2).contiguous() for z in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(-1, -2)


def matmul_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """full_attention as two matmuls in the [B, heads, d, N] layout (no copies), over as many images at
    a time as keep the fp32 scores within MATMUL_ATTENTION_CHUNK_BYTES (a cache's worth)."""
    b, heads, _, n = q.shape
    per_image = heads * n * n * 4  # bytes of fp32 scores
    chunk = max(1, MATMUL_ATTENTION_CHUNK_BYTES // per_image)
    if chunk >= b:
        return _matmul_attention(q, k, v)
    parts = [_matmul_attention(q[i : i + chunk], k[i : i + chunk], v[i : i + chunk]) for i in range(0, b, chunk)]
    return torch.cat(parts)


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The two matmuls. The scores and the softmax are fp32, as the fused kernel keeps them (bf16
    scores would round logits of ~20 by ~0.06); the weights take v's dtype for the second matmul."""
    wide = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    with torch.autocast(q.device.type, enabled=False):
        scores = (q.to(wide) * q.shape[-2] ** -0.5).transpose(-1, -2) @ k.to(wide)  # s_ij = q_i.k_j / sqrt(d)
        weights = scores.softmax(dim=-1).to(v.dtype)  # a_ij = softmax_j(s_ij)
        return v @ weights.transpose(-1, -2)  # out_i = sum_j a_ij v_j


def fused_fp32_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """fused_attention on fp32 copies of q, k, v (autocast off); the result in q's dtype."""
    wide = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        return fused_attention(q.to(wide), k.to(wide), v.to(wide)).to(q.dtype)


ATTENTION_KERNELS = {"fused": fused_attention, "fused_fp32": fused_fp32_attention, "matmul": matmul_attention}


def linear_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Linear attention (Shen et al.; lucidrains' LinearAttention) on [B, heads, d, N] tensors."""
    d, n = q.shape[-2:]
    q = q.softmax(dim=-2) * d**-0.5  # softmax over features, scaled by 1/sqrt(d)
    k = k.softmax(dim=-1)  # softmax over positions
    context = torch.einsum("bhdn,bhen->bhde", k, v / n)  # context = k v^T / N
    return torch.einsum("bhde,bhdn->bhen", context, q)  # out = context^T q


ATTENTION = {"full": full_attention, "linear": linear_attention}


class Attention2d(nn.Module):
    """Pre-norm multi-head self-attention over the H*W positions: x + proj(attn(GN(x)))."""

    def __init__(self, channels: int, num_heads: int = 4, kind: str = "full", groups: int = 32):
        super().__init__()
        check_choice(kind, ATTENTION, "attention type")
        require(
            channels % num_heads == 0,
            f"{channels} channels cannot be split into {num_heads} attention heads.",
        )
        self.num_heads, self.kind = num_heads, kind
        self.attend = ATTENTION[kind]
        self.norm = norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        out = self.attend(*qkv.unbind(1)).reshape(b, c, h, w)
        return x + self.proj_out(out)


DOWNSAMPLE = ("conv", "space_to_depth", "conv3")
UPSAMPLE = ("transposed", "nearest")


class Downsample(nn.Sequential):
    """Halve H and W: a 4x4 stride-2 conv; pixel-unshuffle (space-to-depth) then a 1x1 conv; or
    "conv3", Ho et al.'s 3x3 stride-2 conv with TensorFlow's "SAME" padding (one row and column of
    zeros after the image, none before)."""

    def __init__(self, c_in: int, c_out: int, kind: str = "conv"):
        check_choice(kind, DOWNSAMPLE, "downsample")
        if kind == "conv":
            super().__init__(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1))
        elif kind == "conv3":
            super().__init__(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c_in, c_out, 3, stride=2))
        else:
            super().__init__(nn.PixelUnshuffle(2), nn.Conv2d(4 * c_in, c_out, 1))


class Upsample(nn.Sequential):
    """Double H and W: a 4x4 stride-2 transposed conv, or nearest x2 then a 3x3 conv."""

    def __init__(self, c_in: int, c_out: int, kind: str = "transposed"):
        check_choice(kind, UPSAMPLE, "upsample")
        if kind == "transposed":
            super().__init__(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
        else:
            super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1))
