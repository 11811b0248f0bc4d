import itertools
import json

import pytest
import torch
from conftest import perturb
from torch import nn

from ddpmkit.errors import DdpmkitError
from ddpmkit.models import ARCHITECTURES, ConvNeXtUNet, UNet, build_model, count_parameters
from ddpmkit.models.layers import Attention2d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(**overrides) -> UNet:
    """An 8x8 UNet with two levels and attention at 4x4: a few tens of thousands of parameters."""
    config = dict(
        image_size=8,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        num_heads=2,
        groups=4,
    )
    return UNet(**{**config, **overrides})


def batch(model: UNet, n: int = 2):
    c = model.config
    x = torch.randn(n, c["in_channels"], c["image_size"], c["image_size"])
    return x, torch.randint(1, 1001, (n,))


@pytest.mark.parametrize("image_size", [28, 32])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_has_the_input_shape(image_size, in_channels):
    model = UNet(
        in_channels=in_channels,
        image_size=image_size,
        base_channels=8,
        channel_mults=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(image_size // 4,),
        num_heads=2,
        groups=4,
    )
    x, t = batch(model)
    out = model(x, t)
    assert out.shape == x.shape
    assert torch.all(out == 0)  # the zero-initialised output conv


def test_learn_sigma_doubles_the_output_channels():
    model = tiny(in_channels=3, learn_sigma=True)
    x, t = batch(model)
    assert model(x, t).shape == (2, 6, 8, 8)


def test_self_condition_takes_x_self_cond_and_zeros_by_default():
    model = perturb(tiny(self_condition=True))
    x, t = batch(model)
    assert model.init_conv.in_channels == 2
    torch.testing.assert_close(model(x, t), model(x, t, x_self_cond=torch.zeros_like(x)))
    assert not torch.allclose(model(x, t), model(x, t, x_self_cond=torch.randn_like(x)))


def test_the_step_changes_the_output():
    model = perturb(tiny())
    x, t = batch(model)
    assert not torch.allclose(model(x, t), model(x, t + 1))


def test_the_class_changes_the_output_and_none_is_the_null_class():
    model = perturb(tiny(num_classes=10))
    x, t = batch(model)
    out = model(x, t, torch.tensor([3, 4]))
    assert not torch.allclose(out, model(x, t, torch.tensor([5, 6])))
    torch.testing.assert_close(model(x, t), model(x, t, torch.tensor([10, 10])))
    assert not torch.allclose(model(x, t), out)


def test_an_unconditional_network_ignores_y():
    model = perturb(tiny())
    x, t = batch(model)
    assert model.class_embed is None
    torch.testing.assert_close(model(x, t, torch.tensor([1, 2])), model(x, t))


@pytest.mark.parametrize("attn_type", ["full", "linear"])
def test_attention_sits_at_the_chosen_levels_and_the_mid_block_is_full(attn_type):
    model = tiny(
        channel_mults=(1, 2, 2),
        image_size=16,
        num_res_blocks=2,
        attn_resolutions=(8,),
        attn_type=attn_type,
    )
    kinds = [m.kind for m in model.modules() if isinstance(m, Attention2d)]
    # the 8x8 level: 2 down blocks and 3 up blocks; plus the mid block at 4x4
    assert sorted(kinds) == sorted([attn_type] * 5 + ["full"])
    assert model.mid[1].kind == "full"


LAYOUT_OPTIONS = dict(
    attn_type=["full", "linear"],
    downsample=["conv", "space_to_depth"],
    upsample=["transposed", "nearest"],
    learn_sigma=[False, True],
    self_condition=[False, True],
    final_res_block=[False, True],
    init_conv_kernel=[3, 7],
)
EMBEDDING_OPTIONS = [
    dict(time_embedding=kind, num_classes=n) for kind in ("sinusoidal", "learned", "random_fourier") for n in (0, 3)
]


def test_every_option_combination_builds_and_runs():
    """Every combination of the options that shape the layers, each with one of the six ways of
    embedding (t, y), taken in turn so that each of those meets many layouts (all 768 would take
    the whole time budget of this file)."""
    x, t = torch.randn(1, 1, 4, 4), torch.tensor([5])
    layouts = itertools.product(*LAYOUT_OPTIONS.values())
    for values, embedding in zip(layouts, itertools.cycle(EMBEDDING_OPTIONS), strict=False):
        options = {**dict(zip(LAYOUT_OPTIONS, values, strict=True)), **embedding}
        model = UNet(
            image_size=4,
            base_channels=4,
            channel_mults=(1, 1),
            num_res_blocks=1,
            attn_resolutions=(2,),
            num_heads=1,
            groups=2,
            **options,
        )
        out = model(x, t, torch.tensor([1]) if options["num_classes"] else None, x)
        assert out.shape == (1, 2 if options["learn_sigma"] else 1, 4, 4), options


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=30, channel_mults=(1, 2, 2)), "image_size 30 is not divisible by 4"),
        (dict(attn_resolutions=(3,)), "attn_resolutions \\[3\\] match no level"),
        (dict(num_heads=3), "num_heads"),
        (dict(attn_type="sparse"), "attn_type"),
        (dict(time_embedding="fourier"), "time_embedding"),
        (dict(downsample="pool"), "downsample"),
        (dict(upsample="bilinear"), "upsample"),
        (dict(channel_mults=()), "channel_mults"),
        (dict(base_channels=0), "base_channels"),
        (dict(init_conv_kernel=4), "init_conv_kernel"),
        (dict(init_conv_kernel=-1), "init_conv_kernel must be a positive integer"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_classes=-1), "num_classes"),
    ],
)
def test_bad_configs_raise_one_clear_error(overrides, message):
    with pytest.raises(DdpmkitError, match=message):
        tiny(**overrides)


def test_a_wrong_input_size_raises():
    model = tiny()
    with pytest.raises(DdpmkitError, match="8x8"):
        model(torch.randn(1, 1, 16, 16), torch.tensor([1]))


def test_gradients_reach_every_parameter():
    model = perturb(tiny(num_classes=3, time_embedding="learned", final_res_block=True, self_condition=True))
    x, t = batch(model, 3)
    model(x, t, torch.tensor([0, 1, 2]), x_self_cond=x).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_channels_last_gives_the_same_output():
    model = perturb(tiny(num_classes=3))
    x, t = batch(model)
    expected = model(x, t)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn_type", ["full", "linear"])
def test_bfloat16_autocast_runs_and_stays_close(attn_type):
    model = perturb(tiny(num_classes=3, attn_type=attn_type))
    x, t = batch(model)
    expected = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out.float() - expected).abs().max() < 0.1 * expected.abs().max()


def test_the_config_rebuilds_the_same_network_after_json():
    model = perturb(tiny(num_classes=3, learn_sigma=True, attn_type="linear"))
    config = json.loads(json.dumps(model.config))
    assert config == model.config
    twin = UNet(**config)
    twin.load_state_dict(model.state_dict())
    x, t = batch(model)
    torch.testing.assert_close(twin(x, t), model(x, t))


def test_registry_builds_by_name_and_rejects_unknown_names():
    assert dict(unet=UNet, convnext=ConvNeXtUNet) == ARCHITECTURES
    model = build_model("unet", image_size=8, base_channels=8, channel_mults=(1,), attn_resolutions=())
    assert isinstance(model, UNet)
    with pytest.raises(DdpmkitError, match="unknown architecture 'vit'"):
        build_model("vit")


def test_count_parameters_counts_trainable_weights_only():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # (3*4 + 4) + (4*2 + 2)
    model[1].bias.requires_grad_(False)
    assert count_parameters(model) == 16 + 8
