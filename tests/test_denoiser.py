"""The Denoiser's classifier-free guidance against known answers, and what it refuses."""

import pytest
import torch

from ddpmkit.core import diffusion
from ddpmkit.core.denoiser import Denoiser
from ddpmkit.core.schedules import cosine
from ddpmkit.errors import DdpmkitError
from ddpmkit.run import build
from ddpmkit.run.config import RunConfig

NUM_CLASSES = 4


class ClassNet(torch.nn.Module):
    """out = 0.3 x_t + (y + 1): each class (and the null class, y = 4) has its own known output
    (0.3 x_t for an unconditional net, which gets y = None)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x_t, t, y=None, x_self_cond=None):
        self.seen.append(None if y is None else y.clone())
        return 0.3 * x_t + (0 if y is None else (y.float() + 1).reshape(-1, 1, 1, 1))


def _denoiser(objective="eps", **kwargs):
    return Denoiser(ClassNet(), cosine(50), objective, num_classes=NUM_CLASSES, clip_x0=False, **kwargs)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 1, 2, 2, generator=g), torch.tensor([5, 20, 40]), torch.tensor([0, 2, 3])


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_guidance_0_is_the_null_class_1_the_class_and_affine_in_between(objective):
    den, (x_t, t, y) = _denoiser(objective), _inputs()
    null = torch.full_like(y, NUM_CLASSES)
    cond = den(x_t, t, y)  # guidance 1 (the default)
    uncond = den(x_t, t, null)
    assert torch.equal(den.net.seen[-1], null)
    for w, expected in ((0.0, uncond), (1.0, cond)):
        out = den(x_t, t, y, guidance=w)
        assert torch.allclose(out.eps, expected.eps, atol=1e-5) and torch.allclose(out.x0, expected.x0, atol=1e-5)
    # eps_hat(w) = (1 - w) eps_null + w eps_cond, for w outside [0, 1] too; x0_hat follows from eps_hat
    for w in (0.5, 3.0, 7.5):
        den.net.seen.clear()
        out = den(x_t, t, y, guidance=w)
        assert torch.allclose(out.eps, uncond.eps + w * (cond.eps - uncond.eps), atol=1e-4)
        assert torch.allclose(out.x0, diffusion.x0_from_eps(den.schedule, x_t, t, out.eps), atol=1e-4)
        (labels,) = den.net.seen  # one batched pass: the classes, then the null class
        assert torch.equal(labels, torch.cat([y, null]))


def test_guidance_with_the_eps_objective_by_hand():
    """With out = eps_hat: (1 - w)(0.3 x_t + 5) + w (0.3 x_t + y + 1) at w = 3."""
    den, (x_t, t, y) = _denoiser("eps"), _inputs()
    out = den(x_t, t, y, guidance=3.0)
    by_hand = -2 * (0.3 * x_t + NUM_CLASSES + 1) + 3 * (0.3 * x_t + (y.float() + 1).reshape(-1, 1, 1, 1))
    assert torch.allclose(out.eps, by_hand, atol=1e-5)


def test_y_none_is_the_null_class():
    den, (x_t, t, _) = _denoiser(), _inputs()
    out = den(x_t, t)
    assert torch.equal(den.net.seen[-1], torch.full((3,), NUM_CLASSES))
    assert torch.allclose(out.eps, 0.3 * x_t + NUM_CLASSES + 1, atol=1e-6)


@pytest.mark.parametrize("call", ["y=None", "guidance 0", "guidance 3"])
def test_an_untrained_null_class_is_refused(call):
    den, (x_t, t, y) = _denoiser(null_class_trained=False), _inputs()
    args = {"y=None": (None, 1.0), "guidance 0": (y, 0.0), "guidance 3": (y, 3.0)}[call]
    with pytest.raises(DdpmkitError, match="trained without label dropout") as why:
        den(x_t, t, *args)
    assert "\n" not in str(why.value) and den.net.seen == []
    assert torch.allclose(den(x_t, t, y).eps, 0.3 * x_t + (y.float() + 1).reshape(-1, 1, 1, 1), atol=1e-6)


def test_guidance_on_an_unconditional_model():
    """Refused with labels; without them both branches are the unconditional model, which it returns."""
    den = Denoiser(ClassNet(), cosine(50), "eps", clip_x0=False)
    x_t, t, y = _inputs()
    with pytest.raises(DdpmkitError, match="guidance needs a class-conditional model"):
        den(x_t, t, y, guidance=2.0)
    assert torch.equal(den(x_t, t, None, guidance=2.0).eps, den(x_t, t).eps)


@pytest.mark.parametrize("label_dropout, trained", [(0.1, True), (0.0, False)])
def test_a_run_config_tells_the_denoiser_whether_the_null_class_was_trained(label_dropout, trained):
    config = RunConfig()
    config.data.label_dropout = label_dropout
    den = build.denoiser(config, ClassNet())
    assert den.num_classes == 10 and den.null_class_trained is trained


def _sigma(den, t: int) -> float:
    abar = float(den.schedule.alpha_bar[t])
    return ((1 - abar) / abar) ** 0.5


def test_a_guidance_interval_guides_only_where_sigma_lies_in_it():
    """Inside (LO, HI] the guided answer from one batched pass of both branches; outside it the plain
    conditional one, from one pass of the classes alone (half the work)."""
    den, (x_t, _, y) = _denoiser(), _inputs()
    null = torch.full_like(y, NUM_CLASSES)
    lo, hi = _sigma(den, 10), _sigma(den, 30)  # sigma_t grows with t
    den.guidance_interval = (lo, hi)
    assert [den.guides_at(t) for t in (10, 11, 30, 31)] == [False, True, True, False]
    for t, inside in ((5, False), (20, True), (45, False)):
        den.net.seen.clear()
        out = den(x_t, t, y, guidance=3.0)
        (labels,) = den.net.seen
        den.guidance_interval = None
        expected = den(x_t, t, y, guidance=3.0 if inside else 1.0)
        den.guidance_interval = (lo, hi)
        assert torch.equal(labels, torch.cat([y, null]) if inside else y)
        assert torch.allclose(out.eps, expected.eps) and torch.allclose(out.x0, expected.x0)
    den.guidance_interval = (0.0, 1e9)  # wide enough for every step: as without an interval
    assert all(den.guides_at(t) for t in range(1, 51))
