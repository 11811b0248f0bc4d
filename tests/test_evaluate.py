"""Sample-quality metrics against known answers, the domain classifier and its cache, the Inception
wiring (with a stand-in extractor: the real weights cannot be downloaded here) and `ddpmkit eval`."""

import importlib
import importlib.metadata
import json
import math
import pathlib
import sys
import types
import urllib.error

import numpy
import pytest
import torch
from conftest import FAST, TINY_MODEL, make_idx_dataset, perturb
from safetensors.torch import save_file

from ddpmkit.cli import main
from ddpmkit.core.likelihood import nll_bpd
from ddpmkit.data import load_dataset, to_model_range, to_uint8
from ddpmkit.errors import DdpmkitError
from ddpmkit.eval import domain, inception
from ddpmkit.eval.inception import InceptionMetrics, InceptionUnavailable
from ddpmkit.eval.inceptionv3 import InceptionV3, resize_bilinear_tf1
from ddpmkit.eval.metrics import feature_stats, frechet_distance, gaussian_blur, inception_score, precision_recall
from ddpmkit.eval.report import auto_nll_n, bits_per_dim
from ddpmkit.run import build
from ddpmkit.run.config import RunConfig


def _gaussian(n, mean, cov, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    return torch.as_tensor(mean, dtype=torch.float64) + z @ torch.linalg.cholesky(torch.as_tensor(cov)).T


# ---- Fréchet distance ----------------------------------------------------------------------------


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_noise():
    f = _gaussian(2000, [0.0] * 16, torch.eye(16, dtype=torch.float64) + 0.5, seed=0)
    stats = feature_stats(f)
    assert abs(frechet_distance(*stats, *stats)) < 1e-8
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(f.shape, generator=g, dtype=torch.float64)
    distances = [frechet_distance(*feature_stats(f + s * noise), *stats) for s in (0.1, 0.3, 0.6, 1.0, 2.0)]
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    assert distances[0] > 0


def test_fd_of_diagonal_gaussians_is_the_closed_form():
    """For commuting covariances d^2 = ||mu1 - mu2||^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2."""
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((s1.sqrt() - s2.sqrt()) ** 2).sum()
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(expected.item(), rel=1e-12)


def test_fd_of_non_commuting_2x2_covariances_is_the_closed_form():
    """For 2x2 PSD A with eigenvalues l1, l2: tr sqrt(A) = sqrt(l1) + sqrt(l2) = sqrt(tr A + 2 sqrt(det A)),
    and S1 S2 has the eigenvalues of the PSD S1^(1/2) S2 S1^(1/2),
    so tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))."""
    s1 = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[0.5, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    mu1, mu2 = torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([-0.2, 0.4], dtype=torch.float64)
    tr_sqrt = math.sqrt((s1 @ s2).trace() + 2 * math.sqrt(torch.det(s1) * torch.det(s2)))
    expected = ((mu1 - mu2) ** 2).sum().item() + s1.trace().item() + s2.trace().item() - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)
    # and from samples of the two Gaussians (sampling error shrinks like 1/sqrt(n))
    f1, f2 = _gaussian(200_000, mu1.tolist(), s1, 2), _gaussian(200_000, mu2.tolist(), s2, 3)
    assert frechet_distance(*feature_stats(f1), *feature_stats(f2)) == pytest.approx(expected, rel=0.02)


def _fd_by_eigenvalues(mu1, s1, mu2, s2) -> float:
    """Fréchet distance the other way round: tr (S1 S2)^(1/2) as the sum of square roots of the
    eigenvalues of the non-symmetric product S1 S2 (real and >= 0: it is similar to a PSD matrix)."""
    mu1, s1, mu2, s2 = (numpy.asarray(v, dtype=numpy.float64) for v in (mu1, s1, mu2, s2))
    eig = numpy.linalg.eigvals(s1 @ s2)
    assert numpy.abs(eig.imag).max() < 1e-9 * numpy.abs(eig).max()
    tr_sqrt = numpy.sqrt(numpy.clip(eig.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + numpy.trace(s1) + numpy.trace(s2) - 2 * tr_sqrt)


def test_fd_matches_an_independent_computation():
    f1 = _gaussian(500, [0.0] * 8, torch.eye(8, dtype=torch.float64), 4)
    f2 = _gaussian(500, [0.2] * 8, torch.eye(8, dtype=torch.float64) * 2 + 0.3, 5)
    (m1, c1), (m2, c2) = feature_stats(f1), feature_stats(f2)
    assert torch.allclose(c1, torch.from_numpy(numpy.cov(f1.numpy(), rowvar=False)), atol=1e-12)  # unbiased
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(_fd_by_eigenvalues(m1, c1, m2, c2), rel=1e-9)


# ---- precision and recall -----------------------------------------------------------------------


def _uniform(n, x_from, seed):
    """n points uniform on [x_from, x_from + width] x [0, 1] (width 1, or given as a pair)."""
    lo, hi = x_from if isinstance(x_from, tuple) else (x_from, x_from + 1.0)
    u = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.stack([lo + (hi - lo) * u[:, 0], u[:, 1]], 1)


@pytest.mark.parametrize(
    "fake_x, precision, recall",
    [
        ((0.5, 1.5), 0.5, 0.5),  # shifted by half: half of each support lies in the other
        ((0.0, 0.5), 1.0, 0.5),  # the left half of the real support: real-looking, half the variety
        ((-1.0, 2.0), 1 / 3, 1.0),  # three times as wide: a third lands on real data, all real data covered
        ((2.0, 3.0), 0.0, 0.0),  # disjoint
    ],
)
def test_precision_recall_of_independent_samples_with_known_overlap(fake_x, precision, recall):
    """Real ~ U([0, 1]^2) and fake ~ U(fake_x x [0, 1]), drawn independently. As n grows the k-NN
    manifolds shrink onto the supports, so precision -> |overlap| / |fake support| and recall ->
    |overlap| / |real support|. At n = 2000 (ball radius ~0.02) the union of balls misses 2-3% in
    gaps and reaches about 1% beyond the edges, hence the tolerance."""
    real, fake = _uniform(2000, (0.0, 1.0), seed=6), _uniform(2000, fake_x, seed=7)
    p, r = precision_recall(real, fake)
    assert p == pytest.approx(precision, abs=0.04) and r == pytest.approx(recall, abs=0.04)


def test_precision_recall_of_two_samples_of_one_gaussian_is_high_but_not_one():
    """Independent samples of the same distribution: not (1, 1) by construction, but close; a point
    falls outside the union of the other set's 3-NN balls only in the sparse tails."""
    real = _gaussian(2000, [0.0, 0.0], torch.eye(2, dtype=torch.float64), 6)
    fake = _gaussian(2000, [0.0, 0.0], torch.eye(2, dtype=torch.float64), 8)
    p, r = precision_recall(real, fake)
    assert 0.9 < p < 1.0 and 0.9 < r < 1.0
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)


# ---- Inception score and the FID wiring -----------------------------------------------------------


def test_inception_score_known_answers():
    assert inception_score(torch.zeros(100, 10), splits=5)[0] == pytest.approx(1.0)  # p(y|x) uniform: IS = 1
    confident = torch.full((100, 10), -1e4)
    confident[torch.arange(100), torch.arange(100) % 10] = 0.0  # sure and balanced: IS = number of classes
    mean, std = inception_score(confident, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == 0.0
    mean, std = inception_score(confident, splits=4)  # parts of 25 are not balanced: IS = exp H(p(y)) < 10
    assert 6 < mean < 10 and std > 0


class _FakeInception(torch.nn.Module):
    """A random conv net with Inception's interface: uint8 [B, 3, H, W] -> (features [B, 16], logits [B, 7])."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=2)
        self.fc = torch.nn.Linear(16, 7)
        self.calls = 0

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        self.calls += 1
        f = self.conv(x.float() / 127.5 - 1).relu().mean((2, 3))
        return f, self.fc(f) * 3


def _images(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 12, 12, generator=g) * 1.6 - 0.8 + shift).clamp(-1, 1)


def test_inception_wiring_with_a_stand_in_extractor_matches_a_hand_computation():
    """InceptionMetrics turns images into 8-bit RGB for the extractor, in batches, and scores its
    features and logits: the same numbers computed here directly from the extractor, in numpy."""
    fake = _FakeInception()
    real, generated = _images(300, 0), _images(200, 1, shift=0.15)
    ref_feats, _ = inception.inception_features(fake, real)
    metrics = InceptionMetrics(fake, *feature_stats(ref_feats), batch_size=64)
    scores = metrics.score(generated)
    assert fake.calls == 3 + 4  # 300 and 200 images in batches of 100 and 64

    def direct(images):  # grayscale in [-1, 1] -> uint8 RGB, one pass
        with torch.no_grad():
            f, z = fake(to_uint8(images).expand(-1, 3, -1, -1))
        return f.double().numpy(), z.double().numpy()

    (f_real, _), (f_gen, z_gen) = direct(real), direct(generated)
    stats = [(f.mean(0), numpy.cov(f, rowvar=False)) for f in (f_gen, f_real)]
    assert scores["fid"] == pytest.approx(_fd_by_eigenvalues(*stats[0], *stats[1]), rel=1e-6)
    assert scores["fid"] > 0
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0)).numpy()  # inception_score's split
    by_hand = []
    for part in numpy.array_split(z_gen[order], 10):
        p = numpy.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        by_hand.append(numpy.exp((p * (numpy.log(p) - numpy.log(p.mean(0)))).sum(1).mean()))
    assert scores["inception_score"] == pytest.approx(numpy.mean(by_hand), rel=1e-9)
    assert scores["inception_score_std"] == pytest.approx(numpy.std(by_hand, ddof=1), rel=1e-6)


# ---- the FID InceptionV3 itself (random weights: the real ones cannot be downloaded here) ----------


@pytest.fixture(scope="module")
def inception_net():
    """The architecture with random weights and batch-norm statistics (a fixed seed), scaled so that the
    image shows in the features (with PyTorch's default init two images' features differ by 1e-7)."""
    torch.manual_seed(0)
    net = InceptionV3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.8, 1.2)
                m.weight.uniform_(0.8, 1.2), m.bias.uniform_(-0.1, 0.1)
    return net.eval()


def test_the_fid_inceptionv3_gives_the_features_the_fid_code_uses(inception_net):
    """The names and shapes FID and IS ask for: 2048 pooled features and 1008 bias-free logits per
    image, from any image size (resized to 299x299), grayscale repeated to RGB; the parameters are
    laid out as in torch-fidelity's weights file (23,850,960 of them, under its names)."""
    state = inception_net.state_dict()
    assert sum(p.numel() for p in inception_net.parameters()) == 23_850_960
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3) and state["fc.weight"].shape == (1008, 2048)
    assert state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert state["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape == (384,)
    images = _images(2, 3)[:, :, :10, :10]  # [2, 1, 10, 10]
    feats, logits = inception.inception_features(inception_net, images)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008) and feats.dtype == logits.dtype == torch.float64
    assert bool((feats >= 0).all())  # means of ReLU outputs
    assert (feats[0] - feats[1]).std() > 0.05 * feats.std()  # each image its own features
    assert torch.allclose(logits, feats @ inception_net.fc.weight.detach().double().T, rtol=1e-4, atol=1e-5)
    again, _ = inception.inception_features(inception_net, images[1:])
    assert torch.allclose(again[0], feats[1], rtol=1e-4, atol=1e-6)  # one image alone: the same features
    with pytest.raises(DdpmkitError, match="uint8 RGB"):
        inception_net(torch.zeros(1, 3, 8, 8))


def test_resize_is_tf1_bilinear():
    """TF 1.x resize_bilinear without align_corners: output pixel i samples the input at i * in / out."""
    x = torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 1, 2, 4)  # each row 0, 1, 2, 3
    assert resize_bilinear_tf1(x, 8)[0, 0, 0].tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3]  # the last repeats
    assert resize_bilinear_tf1(x, 2)[0, 0, 0].tolist() == [0, 2]  # i * 2: no half-pixel offset


def test_inception_weights_are_read_safely_and_checked(inception_net, tmp_path):
    state = inception_net.state_dict()
    without = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # as some files are
    torch.save(state, tmp_path / "w.pth")  # torch-fidelity's format
    save_file({k: v.contiguous() for k, v in without.items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        loaded = inception.load_inception(tmp_path / name).state_dict()
        assert all(torch.equal(v, loaded[k]) for k, v in without.items())
    damaged = {**without, "fc.weight": torch.zeros(10, 2048)}
    del damaged["fc.bias"]
    torch.save(damaged, tmp_path / "damaged.pth")
    with pytest.raises(DdpmkitError, match=r"not the FID InceptionV3's weights: 2 problem\(s\), e.g. fc.bias missing"):
        inception.load_inception(tmp_path / "damaged.pth")
    marker = tmp_path / "pwned"
    torch.save({"fc.weight": _Payload(marker)}, tmp_path / "crafted.pth")
    with pytest.raises(DdpmkitError, match="cannot read Inception weights") as why:
        inception.load_inception(tmp_path / "crafted.pth")
    assert "\n" not in str(why.value) and not marker.exists()


class _Payload:
    """Unpickling this would create `marker`: what a crafted weights file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _torch_fidelity_inceptionv3(monkeypatch):
    """torch-fidelity's own FeatureExtractorInceptionV3 class, from its installed files, without its
    package __init__ (which imports torchvision for other extractors): a bare package module stands
    in for it while the one submodule (which needs only torch) is imported."""
    try:
        root = importlib.metadata.distribution("torch-fidelity").locate_file("torch_fidelity")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torch-fidelity is not installed (scripts/setup.sh installs it with --no-deps for the tests)")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(root)]
    before = set(sys.modules)
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    for name in set(sys.modules) - before:
        monkeypatch.setitem(sys.modules, name, sys.modules[name])  # removed again after the test
    return module.FeatureExtractorInceptionV3


def test_the_fid_inceptionv3_matches_torch_fidelitys(inception_net, tmp_path, monkeypatch):
    """The same weights file in both; the same uint8 images in: the same features and logits."""
    theirs_class = _torch_fidelity_inceptionv3(monkeypatch)
    torch.save(inception_net.state_dict(), tmp_path / "w.pth")
    theirs = theirs_class(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(tmp_path / "w.pth")
    )
    assert set(theirs.state_dict()) == set(inception_net.state_dict())
    images = torch.randint(0, 256, (1, 3, 21, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, reference = inception_net(images), theirs(images)
    for a, b in zip(ours, reference):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_inception_without_weights_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dest, progress):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(inception, "_fetch", offline)
    with pytest.raises(InceptionUnavailable) as why:
        inception.inception_weights(None)
    message = str(why.value)
    assert "\n" not in message and inception.INCEPTION_URL in message and "--inception-weights" in message
    assert "offline" in message
    found = tmp_path / "torch" / "hub" / "checkpoints" / inception.INCEPTION_URL.rsplit("/", 1)[1]
    found.parent.mkdir(parents=True)
    found.write_bytes(b"x")
    assert inception.inception_weights(None) == found  # a copy in torch's hub cache is used


def test_gaussian_blur_keeps_constants_and_mass():
    flat = torch.full((2, 3, 10, 10), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.5), flat, atol=1e-6)
    dot = torch.zeros(1, 1, 15, 15)
    dot[0, 0, 7, 7] = 1.0
    blurred = gaussian_blur(dot, 1.0)
    assert blurred.sum().item() == pytest.approx(1.0, rel=1e-5) and blurred.max() < 0.2
    assert torch.equal(gaussian_blur(dot, 0.0), dot)


# ---- the domain classifier -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One tiny dataset and one classifier cache for the module (the classifier trains once)."""
    root = tmp_path_factory.mktemp("eval")
    return {"data": make_idx_dataset(root / "mnist"), "cache": root / "cache", "root": root}


def test_domain_classifier_learns_and_is_cached(shared, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared["cache"]))
    trained = []
    real_train = domain.train_classifier
    monkeypatch.setattr(domain, "train_classifier", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    first = domain.DomainMetrics.for_dataset("mnist", shared["data"], progress=False)
    assert first.info["test_accuracy"] >= 0.9 and len(trained) == 1
    files = sorted(p.name for p in (shared["cache"] / "ddpmkit" / "classifiers").iterdir())
    assert len(files) == 3 and any(f.endswith("-reference.safetensors") for f in files)
    second = domain.DomainMetrics.for_dataset("mnist", shared["data"], progress=False)
    assert len(trained) == 1  # loaded, not retrained
    for a, b in zip(first.net.state_dict().values(), second.net.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.allclose(first.ref_sigma, second.ref_sigma)


def test_domain_scores_of_unseen_real_images_and_of_noise(shared, monkeypatch, tmp_path):
    """Scored against the test set's reference: new images of the same kind (another draw of the
    dataset's generator, none of them in the reference) score well, uniform noise badly."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared["cache"]))
    metrics = domain.DomainMetrics.for_dataset("mnist", shared["data"], progress=False)
    fresh = load_dataset("mnist", "train", make_idx_dataset(tmp_path / "fresh", n=40, seed=1))
    reference = load_dataset("mnist", "test", shared["data"])
    assert not any(bool((img == reference.images).flatten(1).all(1).any()) for img in fresh.images)
    real = metrics.score(to_model_range(fresh.images), fresh.labels)
    assert real["conditional_accuracy"] >= 0.9 and real["reference_n"] == 24 and real["n"] == 40
    assert real["precision"] >= 0.8 and real["recall"] >= 0.8
    assert real["class_entropy"] == pytest.approx(math.log(10), abs=0.15)  # 40 images, 4 per class
    noise = metrics.score(torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert noise["conditional_accuracy"] is None
    assert noise["fd_dom"] > 20 * real["fd_dom"] and noise["recall"] == 0.0
    assert noise["precision"] < real["precision"]


# ---- `ddpmkit eval` -------------------------------------------------------------------------------------


def test_eval_command_writes_the_report_and_prints_the_table(shared, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared["cache"]))
    monkeypatch.delenv("DDPMKIT_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(inception, "_fetch", lambda *a: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    run = shared["root"] / "run"
    assert (
        main(
            [
                "train",
                "--out",
                str(run),
                "--dataset",
                "mnist",
                "--data-dir",
                str(shared["data"]),
                *TINY_MODEL,
                *FAST,
                "--steps",
                "10",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(run),
                "--n",
                "20",
                "--sampler",
                "ddim",
                "--steps",
                "3",
                "--nll-n",
                "4",
                "--nll-stride",
                "25",
                "--seed",
                "7",
                "--inception",
                "on",
                "--no-progress",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "domain fd_dom" in out and "inception" in out
    assert "bits/dim -log p(x|y) bpd_sem" in out and "bits/dim -log p(x) bpd_sem" in out
    assert err.count("Inception metrics skipped") == 1 and "--inception-weights" in err
    reports = list(run.glob("eval-*-ddim3.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["seed"] == 7 and report["n"] == 20 and report["sampling"]["steps"] == 3
    assert report["versions"]["torch"] == torch.__version__ and report["command"][:2] == ["ddpmkit", "eval"]
    results = report["results"]
    assert results["domain"]["n"] == 20 and 0 <= results["domain"]["conditional_accuracy"] <= 1
    for quantity, label in (("conditional", "-log p(x|y)"), ("unconditional", "-log p(x)")):
        nll = results["nll"][quantity]
        assert nll["quantity"] == label and nll["n"] == 4 and nll["t"] == [1, 2, 27]
        assert nll["bpd"] > 0 and nll["bpd_sem"] > 0 and nll["seconds"] >= 0
    assert "skipped" in results["inception"]


def test_eval_reference_scores_real_training_images(shared, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared["cache"]))
    out = tmp_path / "ref.json"
    assert (
        main(
            [
                "eval",
                "--reference",
                "mnist",
                "--data-dir",
                str(shared["data"]),
                "--n",
                "24",
                "--blur",
                "1",
                "--inception",
                "off",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["kind"] == "reference" and report["blur_sigma"] == 1.0 and report["split"] == "train"
    assert "inception" not in report["results"]
    assert "domain precision" in capsys.readouterr().out
    assert (
        main(
            [
                "eval",
                "--reference",
                "mnist",
                "--data-dir",
                str(shared["data"]),
                "--n",
                "8",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )  # auto: no Inception on a CPU, and says so
    assert capsys.readouterr().err.count("--inception on") == 1


def _tiny_run_config(**data):
    config = RunConfig()
    config.model.base_channels, config.model.channel_mults, config.model.attn_resolutions = 8, (1, 2), (14,)
    config.model.num_heads, config.diffusion.timesteps = 2, 20
    for key, value in data.items():
        setattr(config.data, key, value)
    return config


@pytest.mark.parametrize(
    "data, measured",
    [
        ({}, ("conditional", "unconditional")),
        ({"label_dropout": 0.0}, ("conditional",)),
        ({"conditional": False}, ("unconditional",)),
    ],
)
def test_bits_per_dim_reports_each_likelihood_the_model_has(data, measured, capsys):
    """-log p(x|y) with the images' classes and -log p(x) with the null class (trained by label
    dropout); what a model does not have is skipped with the reason, never computed from an
    untrained null class."""
    config = _tiny_run_config(**data)
    torch.manual_seed(0)
    den = build.denoiser(config, perturb(build.net(config)).eval(), precision="fp32")
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 4, 9])
    out = bits_per_dim(config, den, images, labels, stride=5, batch_size=2, seed=3, progress=False)
    assert [out[q]["quantity"] for q in out] == ["-log p(x|y)", "-log p(x)"]
    for quantity, y in (("conditional", labels), ("unconditional", None)):
        if quantity not in measured:
            assert "skipped" in out[quantity] and "bpd" not in out[quantity]
            assert f"bits/dim {out[quantity]['quantity']} skipped: " in capsys.readouterr().err
            continue
        same_noise = nll_bpd(den, images, y, stride=5, batch_size=2, generator=torch.Generator().manual_seed(3))
        assert out[quantity]["bpd"] == pytest.approx(same_noise["bpd"], rel=1e-9)
        assert out[quantity]["bpd_sem"] == pytest.approx(same_noise["bpd_sem"], rel=1e-9)
    if len(measured) == 2:  # the class matters to a conditional network
        assert out["conditional"]["bpd"] != pytest.approx(out["unconditional"]["bpd"], rel=1e-6)
    if data.get("label_dropout") == 0.0:
        assert "label dropout" in out["unconditional"]["skipped"]


def test_auto_nll_n_keeps_the_bound_affordable_on_a_cpu():
    """`--nll-n auto`: 1000 images on a GPU; on a CPU 100 up to 32x32 and a quarter per doubling of
    the side, since the bound costs ~200 fp32 passes per image (a 64x64 eval of 378 held-out
    images spent over 30 minutes in it on 2 cores)."""
    assert [auto_nll_n(size, "cpu") for size in (16, 28, 32, 64, 128, 512)] == [100, 100, 100, 25, 6, 4]
    assert auto_nll_n(64, "cuda") == auto_nll_n(28, "cuda:0") == 1000


def test_eval_refuses_bad_arguments(capsys):
    assert main(["eval", "--n", "5"]) == 2
    assert "give either RUN_DIR or --reference" in capsys.readouterr().err
    assert main(["eval", "--reference", "mnist", "--n", "1"]) == 2
    assert "--n must be >= 4" in capsys.readouterr().err
    assert main(["eval", "--reference", "mnist", "--nll-n", "-1"]) == 2
    assert "--nll-n must be auto or >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--reference", "mnist", "--nll-n", "many"])
    assert stop.value.code == 2 and "invalid count or auto value: 'many'" in capsys.readouterr().err
