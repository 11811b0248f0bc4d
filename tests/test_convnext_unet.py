import json

import pytest
import torch
from conftest import perturb

from ddpmkit.errors import DdpmkitError
from ddpmkit.models import ConvNeXtUNet, build_model, count_parameters

# The seed-001 notebook's UNet(max_t=500, m=3, n_class=10), re-implemented outside the repository,
# has 2,038,132 trainable parameters (plus a frozen 501 x 112 table of step embeddings); ours adds
# one 112-wide row to the class table: the null class.
NOTEBOOK_TRAINABLE_PARAMETERS = 2_038_132


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(**overrides) -> ConvNeXtUNet:
    config = dict(image_size=8, channels=(4, 8, 8), strides=(2, 2), mult=1, emb_dim=8)
    return ConvNeXtUNet(**{**config, **overrides})


def batch(model: ConvNeXtUNet, n: int = 2):
    c = model.config
    x = torch.randn(n, c["in_channels"], c["image_size"], c["image_size"])
    return x, torch.randint(1, 501, (n,))


def widths(stage) -> tuple[int, int]:
    block = getattr(stage, "block", stage)
    return block.depthwise.in_channels, block.net[-1].out_channels


def test_the_notebook_network_has_the_notebook_widths_and_parameter_count():
    model = ConvNeXtUNet(mult=3, num_classes=10)
    assert model.config["emb_dim"] == 4 * 28
    assert widths(model.first) == (1, 16)
    assert [widths(s) for s in model.down_stages] == [(32, 32), (64, 64), (128, 128)]
    assert [widths(s) for s in model.up_stages] == [(128, 64), (64, 32), (32, 8)]
    assert widths(model.final) == (8, 1)
    assert count_parameters(model) == NOTEBOOK_TRAINABLE_PARAMETERS + 11 * 112 - 10 * 112


def test_output_padding_is_worked_out_per_level():
    model = ConvNeXtUNet()  # 28 -> 14 -> 7 -> 3 and back
    assert [up.output_padding for up in model.ups] == [(0, 0), (1, 1), (1, 1)]
    model = ConvNeXtUNet(image_size=27)  # 27 -> 14 -> 7 -> 3: the notebook's rule breaks here
    assert [up.output_padding for up in model.ups] == [(0, 0), (1, 1), (0, 0)]


@pytest.mark.parametrize("image_size", [28, 32, 27, 64])
def test_every_size_comes_back_to_itself(image_size):
    model = ConvNeXtUNet(image_size=image_size, channels=(4, 4, 4, 4), mult=1, emb_dim=8)
    x, t = batch(model, 1)
    assert model(x, t).shape == x.shape


@pytest.mark.parametrize("image_size", [28, 32])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_has_the_input_shape(image_size, in_channels):
    model = ConvNeXtUNet(in_channels=in_channels, image_size=image_size, channels=(4, 4, 8, 8), mult=1)
    x, t = batch(model)
    assert model(x, t).shape == x.shape


def test_learn_sigma_doubles_the_output_channels():
    model = tiny(in_channels=3, learn_sigma=True)
    x, t = batch(model)
    assert model(x, t).shape == (2, 6, 8, 8)


def test_self_condition_takes_x_self_cond_and_zeros_by_default():
    model = perturb(tiny(self_condition=True))
    x, t = batch(model)
    assert model.first.block.depthwise.in_channels == 2
    torch.testing.assert_close(model(x, t), model(x, t, x_self_cond=torch.zeros_like(x)))
    assert not torch.allclose(model(x, t), model(x, t, x_self_cond=torch.randn_like(x)))


def test_the_step_changes_the_output():
    model = tiny()
    x, t = batch(model)
    assert not torch.allclose(model(x, t), model(x, t + 1))


def test_the_class_changes_the_output_and_none_is_the_null_class():
    model = tiny(num_classes=10)
    x, t = batch(model)
    out = model(x, t, torch.tensor([3, 4]))
    assert not torch.allclose(out, model(x, t, torch.tensor([5, 6])))
    torch.testing.assert_close(model(x, t), model(x, t, torch.tensor([10, 10])))
    assert not torch.allclose(model(x, t), out)


def test_an_unconditional_network_has_no_class_path_and_ignores_y():
    model = tiny()
    x, t = batch(model)
    assert model.class_embed is None and model.final.class_proj is None
    torch.testing.assert_close(model(x, t, torch.tensor([1, 2])), model(x, t))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(strides=(2,)), "one entry per downsampling"),
        (dict(channels=(4,), strides=()), "at least two levels"),
        (dict(channels=(1, 8, 8)), "channels"),
        (dict(strides=(2, 0)), "strides"),
        (dict(num_heads=3), "num_heads"),
        (dict(emb_dim=7), "even dim"),
        (dict(num_classes=-1), "num_classes"),
        (dict(image_size=0), "image_size"),
    ],
)
def test_bad_configs_raise_one_clear_error(overrides, message):
    with pytest.raises(DdpmkitError, match=message):
        tiny(**overrides)


def test_a_wrong_input_size_raises():
    with pytest.raises(DdpmkitError, match="8x8"):
        tiny()(torch.randn(1, 1, 9, 9), torch.tensor([1]))


def test_gradients_reach_every_parameter():
    model = perturb(tiny(num_classes=3, self_condition=True, learn_sigma=True))
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


def test_bfloat16_autocast_runs_and_stays_close():
    model = perturb(tiny(num_classes=3))
    x, t = batch(model)
    expected = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out.float() - expected).abs().max() < 0.1 * expected.abs().max()


def test_the_config_rebuilds_the_same_network_after_json():
    model = perturb(tiny(num_classes=3, learn_sigma=True))
    config = json.loads(json.dumps(model.config))
    assert config == model.config
    twin = build_model("convnext", **config)
    twin.load_state_dict(model.state_dict())
    x, t = batch(model)
    torch.testing.assert_close(twin(x, t), model(x, t))
