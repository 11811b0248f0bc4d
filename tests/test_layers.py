import math

import conftest
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddpmkit.errors import DdpmkitError
from ddpmkit.models.layers import (
    Attention2d,
    ClassEmbedding,
    Downsample,
    LearnedSinusoidalEmbedding,
    ResBlock,
    SinusoidalEmbedding,
    TimestepEmbedder,
    Upsample,
    fused_attention,
    fused_fp32_attention,
    group_count,
    matmul_attention,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def perturb(module: nn.Module) -> nn.Module:
    """conftest.perturb with larger moves: these layers' formula tests want clearly non-trivial weights."""
    return conftest.perturb(module, scale=0.3)


def manual_group_norm(x, num_groups, weight, bias, eps):
    """(x - mean) / sqrt(var + eps) over each group of channels and all positions, then affine."""
    b, c, h, w = x.shape
    g = x.reshape(b, num_groups, c // num_groups, h, w)
    mean = g.mean(dim=(2, 3, 4), keepdim=True)
    var = g.var(dim=(2, 3, 4), unbiased=False, keepdim=True)
    g = ((g - mean) / torch.sqrt(var + eps)).reshape(b, c, h, w)
    return g * weight[None, :, None, None] + bias[None, :, None, None]


@pytest.mark.parametrize("channels, groups, expected", [(64, 32, 32), (8, 32, 8), (48, 32, 24), (7, 4, 1), (1, 32, 1)])
def test_group_count_is_the_largest_divisor_up_to_groups(channels, groups, expected):
    assert group_count(channels, groups) == expected


def test_sinusoidal_embedding_matches_the_transformer_formula():
    dim, half = 8, 4
    t = torch.tensor([1, 7, 500, 1000])
    emb = SinusoidalEmbedding(dim)(t)
    expected = torch.tensor(
        [
            [math.sin(s * 10000 ** (-i / half)) for i in range(half)]
            + [math.cos(s * 10000 ** (-i / half)) for i in range(half)]
            for s in t.tolist()
        ]
    )
    assert emb.shape == (4, dim)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(SinusoidalEmbedding(dim)(t.float()), emb)


def test_sinusoidal_embedding_gives_distinct_rows_for_distinct_steps():
    emb = SinusoidalEmbedding(32)(torch.arange(1, 1001))
    distances = torch.cdist(emb, emb) + torch.eye(1000) * 1e9
    assert distances.min() > 1e-3


def test_sinusoidal_embedding_rejects_an_odd_dim():
    with pytest.raises(DdpmkitError):
        SinusoidalEmbedding(7)


@pytest.mark.parametrize("random", [False, True])
def test_learned_sinusoidal_embedding_is_t_then_fourier_features(random):
    layer = LearnedSinusoidalEmbedding(6, random=random, T=50)
    t = torch.tensor([3.0, 40.0])
    emb = layer(t)
    s = t[:, None] / 50  # the features see s = t / T in [0, 1]
    angles = 2 * math.pi * s * layer.weights[None]
    assert emb.shape == (2, 7) and layer.out_dim == 7
    torch.testing.assert_close(emb, torch.cat([s, angles.sin(), angles.cos()], dim=1))
    assert len(list(layer.parameters())) == (0 if random else 1)
    assert "weights" in layer.state_dict()


@pytest.mark.parametrize("kind", ["sinusoidal", "learned", "random_fourier"])
def test_timestep_embedder_maps_steps_to_emb_dim(kind):
    emb = TimestepEmbedder(8, 32, kind)(torch.tensor([1, 2, 3]))
    assert emb.shape == (3, 32)
    assert not torch.allclose(emb[0], emb[1])


def test_timestep_embedder_rejects_an_unknown_kind():
    with pytest.raises(DdpmkitError, match="time embedding"):
        TimestepEmbedder(8, 32, "fourier")


def test_class_embedding_null_row_is_used_when_y_is_none():
    layer = ClassEmbedding(num_classes=10, dim=4)
    assert layer.table.weight.shape == (11, 4)
    null = layer(None, batch_size=3)
    torch.testing.assert_close(null, layer.table.weight[10].expand(3, 4))
    torch.testing.assert_close(layer(torch.tensor([10, 10, 10]), 3), null)
    torch.testing.assert_close(layer(torch.tensor([2]), 1)[0], layer.table.weight[2])


def test_groupnorm_in_blocks_matches_the_formula():
    block = perturb(ResBlock(8, 8, emb_dim=4, groups=4))
    gn = block.in_layers[0]
    x = torch.randn(2, 8, 5, 5)
    expected = manual_group_norm(x, 4, gn.weight, gn.bias, gn.eps)
    torch.testing.assert_close(gn(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(F.group_norm(x, 4, gn.weight, gn.bias, gn.eps), expected, atol=1e-5, rtol=1e-5)


def test_resblock_matches_its_equations():
    block = perturb(ResBlock(4, 6, emb_dim=5, groups=2)).eval()
    x, emb = torch.randn(2, 4, 6, 6), torch.randn(2, 5)
    gn1, conv1 = block.in_layers[0], block.in_layers[2]
    gn2, conv2 = block.out_norm, block.out_layers[2]
    lin, skip = block.emb_proj[1], block.skip
    h = F.conv2d(
        F.silu(manual_group_norm(x, 2, gn1.weight, gn1.bias, 1e-5)),
        conv1.weight,
        conv1.bias,
        padding=1,
    )
    scale, shift = F.linear(F.silu(emb), lin.weight, lin.bias)[:, :, None, None].chunk(2, dim=1)
    out = F.conv2d(
        F.silu(manual_group_norm(h, 2, gn2.weight, gn2.bias, 1e-5) * (1 + scale) + shift),
        conv2.weight,
        conv2.bias,
        padding=1,
    )
    expected = F.conv2d(x, skip.weight, skip.bias) + out
    torch.testing.assert_close(block(x, emb), expected, atol=1e-4, rtol=1e-4)


def test_resblock_with_added_embedding_is_ho_et_al_block():
    """h = conv1(SiLU(GN(x))) + Linear(SiLU(emb)); out = skip(x) + conv2(SiLU(GN(h)))  (their resnet_block)."""
    block = perturb(ResBlock(4, 6, emb_dim=5, groups=2, emb_injection="add")).eval()
    x, emb = torch.randn(2, 4, 6, 6), torch.randn(2, 5)
    gn1, conv1 = block.in_layers[0], block.in_layers[2]
    gn2, conv2 = block.out_norm, block.out_layers[2]
    lin, skip = block.emb_proj[1], block.skip
    assert lin.out_features == 6  # one value per channel, not a (scale, shift) pair
    h = F.conv2d(F.silu(manual_group_norm(x, 2, gn1.weight, gn1.bias, 1e-5)), conv1.weight, conv1.bias, padding=1)
    h = h + F.linear(F.silu(emb), lin.weight, lin.bias)[:, :, None, None]
    out = F.conv2d(F.silu(manual_group_norm(h, 2, gn2.weight, gn2.bias, 1e-5)), conv2.weight, conv2.bias, padding=1)
    torch.testing.assert_close(block(x, emb), F.conv2d(x, skip.weight, skip.bias) + out, atol=1e-4, rtol=1e-4)
    with pytest.raises(DdpmkitError, match="emb_injection"):
        ResBlock(4, 6, emb_dim=5, emb_injection="concat")


def test_resblock_embedding_survives_one_channel_groups():
    """With one channel per group, an embedding added before GroupNorm would be normalised away."""
    block = perturb(ResBlock(4, 4, emb_dim=5, groups=4)).eval()
    x = torch.randn(2, 4, 6, 6)
    assert not torch.allclose(block(x, torch.zeros(2, 5)), block(x, torch.ones(2, 5)), atol=1e-3)


def test_resblock_starts_as_its_skip_path():
    x, emb = torch.randn(2, 4, 6, 6), torch.randn(2, 5)
    same = ResBlock(4, 4, emb_dim=5, groups=2)
    torch.testing.assert_close(same(x, emb), x)
    wider = ResBlock(4, 6, emb_dim=5, groups=2)
    torch.testing.assert_close(wider(x, emb), wider.skip(x))


def test_full_attention_matches_torch_multihead_attention():
    attn = perturb(Attention2d(8, num_heads=2, kind="full", groups=2))
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight[:, :, 0, 0])
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj_out.weight[:, :, 0, 0])
        mha.out_proj.bias.copy_(attn.proj_out.bias)
    x = torch.randn(3, 8, 4, 5)
    seq = attn.norm(x).flatten(2).transpose(1, 2)  # [B, N, C]
    out, _ = mha(seq, seq, seq, need_weights=False)
    expected = x + out.transpose(1, 2).reshape(3, 8, 4, 5)
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_full_attention_matches_the_softmax_formula():
    attn = perturb(Attention2d(6, num_heads=3, kind="full", groups=3))
    x = torch.randn(2, 6, 3, 3)
    q, k, v = attn.qkv(attn.norm(x)).reshape(2, 3, 3, 2, 9).unbind(1)  # [B, heads, d, N]
    weights = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / math.sqrt(2), dim=-1)
    out = torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(2, 6, 3, 3)
    torch.testing.assert_close(attn(x), x + attn.proj_out(out), atol=1e-5, rtol=1e-5)


FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"


@pytest.mark.parametrize(
    "side, dtype, grad, kernel",
    [
        (10, torch.float32, False, "fused"),  # 100 positions: the fused kernel, forward and training
        (10, torch.float32, True, "fused"),
        (10, torch.bfloat16, False, "matmul"),  # bf16 forward up to 16x16: the matmuls, a few images at a time
        (10, torch.bfloat16, True, "fused_fp32"),  # bf16 training up to 16x16: the fp32 backward is faster
        (16, torch.bfloat16, True, "fused_fp32"),
        (17, torch.bfloat16, True, "fused"),  # beyond 16x16 the bf16 kernel wins again
        (16, torch.bfloat16, False, "matmul"),
        (17, torch.bfloat16, False, "fused"),  # beyond 16x16 the fused forward is faster
        (8, torch.bfloat16, True, "matmul"),  # 64 positions, bf16 training: the fused backward is slow there
        (8, torch.float32, True, "fused"),  # fp32 training: within noise, so the fused kernel stays
        (8, torch.bfloat16, False, "matmul"),
        (8, torch.float32, False, "fused"),
    ],
)
def test_full_attention_picks_the_faster_cpu_kernel(side, dtype, grad, kernel, monkeypatch):
    """The measured choice: never SDPA on transposed views (its math path, 3-7x slower at 14x14
    positions and above); in bf16 training two matmuls at <= 64 positions and the fused kernel in fp32
    up to 256, in bf16 forward passes two matmuls up to 256, else the fused kernel in the input's dtype."""
    from torch.profiler import ProfilerActivity, profile

    sdpa, sdpa_dtypes = F.scaled_dot_product_attention, []

    def spy(q, k, v, *args, **kwargs):
        sdpa_dtypes.append(q.dtype)
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    attn = perturb(Attention2d(16, num_heads=2, kind="full", groups=2)).to(dtype)
    x = torch.randn(2, 16, side, side, dtype=dtype, requires_grad=grad)
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.set_grad_enabled(grad):
        out = attn(x)
        if grad:
            out.float().sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert (FLASH in ops) == (kernel != "matmul")
    assert ("aten::_softmax" in ops) == (kernel == "matmul")  # SDPA's math path would show it too
    expected = {"matmul": [], "fused_fp32": [torch.float32], "fused": [dtype]}[kernel]
    assert sdpa_dtypes == expected
    assert out.dtype == dtype


def test_fused_fp32_attention_in_bf16_training_matches_the_fused_kernel():
    """The fp32 detour changes the kernel, not the maths: output and gradients agree with the bf16
    fused kernel to bf16's rounding, and come back in bf16."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 196).bfloat16().requires_grad_(True) for _ in range(3))

    def output_and_grads(attend):
        out = attend(q, k, v)
        return (out, *torch.autograd.grad(out.float().pow(2).sum(), (q, k, v)))

    for got, expected in zip(output_and_grads(fused_fp32_attention), output_and_grads(fused_attention), strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected.float(), atol=0.05, rtol=0.05)


def test_matmul_attention_equals_the_fused_kernel_with_gradients():
    q, k, v = (torch.randn(3, 2, 5, 49, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def output_and_grads(attend):
        out = attend(q, k, v)
        return (out, *torch.autograd.grad(out.pow(2).sum(), (q, k, v)))

    for got, expected in zip(output_and_grads(fused_attention), output_and_grads(matmul_attention), strict=True):
        torch.testing.assert_close(got, expected)


def test_matmul_attention_goes_a_few_images_at_a_time_with_the_same_result(monkeypatch):
    """The scores of a whole batch at 14x14 overflow a cache (39 MB for 64 images and 4 heads), so the
    matmuls take as many images at a time as keep them within MATMUL_ATTENTION_CHUNK_BYTES: output and
    gradients are those of the whole batch at once."""
    import ddpmkit.models.layers as layers

    calls = []
    whole = layers._matmul_attention

    def spy(q, k, v):
        calls.append(q.shape[0])
        return whole(q, k, v)

    monkeypatch.setattr(layers, "_matmul_attention", spy)
    q, k, v = (torch.randn(64, 4, 18, 196, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = matmul_attention(q, k, v)
    assert calls == [6] * 10 + [4]  # 4 MiB // (4 heads * 196^2 * 4 bytes) = 6 images a time
    expected = whole(q, k, v)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(expected.pow(2).sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, want)
    calls.clear()
    matmul_attention(*(z[:, :, :, :64].detach() for z in (q, k, v)))  # 8x8: the whole batch fits
    assert calls == [64]


def test_matmul_attention_in_bf16_is_as_accurate_as_the_fused_kernel():
    """Its scores and softmax stay fp32: bf16 scores round logits of ~20 by ~0.06, several times the
    fused kernel's error (measured 1.0e-2 against 1.6e-3 here)."""
    torch.manual_seed(0)
    q, k, v = (3 * torch.randn(8, 4, 36, 49) for _ in range(3))
    q, k, v = (z.bfloat16() for z in (q, k, v))
    exact = matmul_attention(*(z.double() for z in (q, k, v)))

    def error(attend):
        with torch.autocast("cpu", torch.bfloat16):
            out = attend(q, k, v)
        assert out.dtype == torch.bfloat16
        return float((out.double() - exact).norm() / exact.norm())

    assert error(matmul_attention) < 2 * error(fused_attention)


def test_linear_attention_matches_the_formula():
    attn = perturb(Attention2d(8, num_heads=2, kind="linear", groups=2))
    x = torch.randn(2, 8, 4, 4)
    q, k, v = attn.qkv(attn.norm(x)).reshape(2, 3, 2, 4, 16).unbind(1)  # [B, heads, d, N]
    out = torch.empty_like(q)
    for b in range(2):
        for h in range(2):
            q_soft = torch.softmax(q[b, h], dim=0) / math.sqrt(4)  # over the d features
            k_soft = torch.softmax(k[b, h], dim=1)  # over the N positions
            context = k_soft @ (v[b, h] / 16).T  # [d, e]
            out[b, h] = context.T @ q_soft
    expected = x + attn.proj_out(out.reshape(2, 8, 4, 4))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["full", "linear"])
def test_attention_starts_as_identity_and_accepts_channels_last(kind):
    x = torch.randn(2, 8, 4, 4)
    attn = Attention2d(8, num_heads=2, kind=kind)
    torch.testing.assert_close(attn(x), x)
    perturb(attn)
    cl = attn(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, attn(x), atol=1e-5, rtol=1e-5)


def test_attention_rejects_bad_heads_and_kinds():
    with pytest.raises(DdpmkitError, match="heads"):
        Attention2d(6, num_heads=4)
    with pytest.raises(DdpmkitError, match="attention type"):
        Attention2d(8, kind="sparse")


@pytest.mark.parametrize("kind", ["conv", "space_to_depth", "conv3"])
def test_downsample_halves_the_size(kind):
    assert Downsample(4, 6, kind)(torch.randn(2, 4, 8, 8)).shape == (2, 6, 4, 4)


def test_conv3_downsample_pads_as_tensorflow_same():
    """3x3, stride 2 on an even size: TensorFlow's SAME pads one zero row and column after, none before,
    so output pixel (i, j) sees input rows and columns 2i .. 2i + 2."""
    down = perturb(Downsample(2, 3, "conv3"))
    conv = down[1]
    x = torch.randn(1, 2, 6, 6)
    out = down(x)
    padded = F.pad(x, (0, 1, 0, 1))
    for i, j in [(0, 0), (1, 2), (2, 2)]:
        window = padded[0, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]
        expected = (conv.weight * window).sum((1, 2, 3)) + conv.bias
        torch.testing.assert_close(out[0, :, i, j], expected, atol=1e-5, rtol=1e-5)
    assert out.shape == (1, 3, 3, 3)


def test_space_to_depth_is_pixel_unshuffle_then_1x1_conv():
    down = Downsample(3, 5, "space_to_depth")
    x = torch.randn(1, 3, 4, 4)
    conv = down[1]
    torch.testing.assert_close(down(x), F.conv2d(F.pixel_unshuffle(x, 2), conv.weight, conv.bias))


@pytest.mark.parametrize("kind", ["transposed", "nearest"])
def test_upsample_doubles_the_size(kind):
    assert Upsample(4, 6, kind)(torch.randn(2, 4, 7, 7)).shape == (2, 6, 14, 14)


def test_resampling_rejects_unknown_kinds():
    with pytest.raises(DdpmkitError, match="downsample"):
        Downsample(4, 4, "pool")
    with pytest.raises(DdpmkitError, match="upsample"):
        Upsample(4, 4, "bilinear")


def test_unet_fourier_embedding_scales_t_by_the_runs_T():
    from ddpmkit.run.build import net as build_net
    from ddpmkit.run.config import RunConfig, apply_overrides

    config = apply_overrides(RunConfig(), {"model": {"time_embedding": "learned"}, "diffusion": {"timesteps": 400}})
    config.num_classes = 10
    features = build_net(config).time_embed[0]
    assert features.T == 400
    assert float(features(torch.tensor([400]))[0, 0].detach()) == 1.0  # t = T -> s = 1
