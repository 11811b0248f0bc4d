"""Sample quality: Fréchet distance, improved precision/recall, Inception FID and IS, and `ddpmkit eval`.

The maths works in any feature space: the domain classifier's (domain.py) or Inception's. The
Inception network is torch-fidelity's TF-compatible port (the one torchmetrics wraps); its weights
come from --inception-weights, the cache, or a download, and are always read with the safe loader.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from tqdm import tqdm

from . import viz
from .data import load_dataset, to_model_range, to_uint8
from .download import cache_dir, sha256_file
from .errors import DdpmkitError
from .fileio import atomic_write

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_HINT = f"download {INCEPTION_URL} and pass --inception-weights PATH (or set DDPMKIT_INCEPTION_WEIGHTS)"
INCEPTION_ON_CPU = ("Inception metrics skipped: InceptionV3 takes about a second per image on a CPU (and the "
                    "reference statistics 10k images, once); pass --inception on to compute them anyway")
MAX_REFERENCE = 10_000  # reference images for statistics


# ---- Fréchet distance and precision/recall, in any feature space -------------------------------


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    f = features.double()
    if f.ndim != 2 or f.shape[0] < 2:
        raise DdpmkitError(f"feature statistics need at least 2 feature vectors [N, D], got {tuple(f.shape)}")
    mu = f.mean(0)
    centered = f - mu
    return mu, centered.T @ centered / (f.shape[0] - 1)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    values, vectors = torch.linalg.eigh((a + a.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): the product is similar to a symmetric PSD
    matrix, so its square root's trace is the sum of square roots of real, non-negative eigenvalues.
    """
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mu1, mu2, sigma1, sigma2))
    root1 = _sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt).item()


def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance of each feature vector to its k-th nearest neighbour in the same set (itself excluded)."""
    f = features.double()
    if not 1 <= k < len(f):
        raise DdpmkitError(f"k-NN radii need 1 <= k < the number of vectors ({len(f)}), got k = {k}")
    # the (k+1)-th smallest distance counts the point itself, at distance 0
    return torch.cat([torch.cdist(f[i:i + chunk], f).kthvalue(k + 1, dim=1).values for i in range(0, len(f), chunk)])


def coverage(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of points inside the union of balls around `manifold` with `radii`."""
    p, m = points.double(), manifold.double()
    inside = [(torch.cdist(p[i:i + chunk], m) <= radii[None]).any(1) for i in range(0, len(p), chunk)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    precision: fraction of fake samples inside the real manifold (balls of k-NN radius around real points);
    recall: fraction of real samples inside the fake manifold.
    """
    precision = coverage(fake, real, knn_radii(real, k))
    recall = coverage(real, fake, knn_radii(fake, k))
    return precision, recall


# ---- Inception FID and IS -----------------------------------------------------------------------


class InceptionUnavailable(Exception):
    """Inception metrics cannot run here; the message is one line saying how to get them."""


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """IS = exp E_x KL(p(y | x) || p(y)) on `splits` random parts; mean and (unbiased) std over the parts."""
    order = torch.randperm(len(logits), generator=torch.Generator().manual_seed(seed))
    log_p = logits.double()[order].log_softmax(1)
    scores = []
    for part in log_p.chunk(splits):
        p = part.exp()
        log_marginal = p.mean(0).log()  # log p(y) over the part
        kl = torch.where(p > 0, p * (part - log_marginal), 0.0).sum(1)  # 0 log 0 = 0
        scores.append(kl.mean().exp())
    scores = torch.stack(scores)
    return scores.mean().item(), (scores.std().item() if len(scores) > 1 else 0.0)


def _extractor_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as error:  # ImportError, or a broken dependency such as torchvision
        raise InceptionUnavailable(f"Inception metrics skipped: torch-fidelity cannot be imported ({error}); "
                                   f"pip install 'ddpmkit[eval]', then {INCEPTION_HINT}") from None
    return FeatureExtractorInceptionV3


def inception_weights(path=None, download: bool = True, progress: bool = True) -> Path:
    """The weights file: `path`, else the ddpmkit or torch hub cache, else a download into the cache."""
    if path is not None:
        if not Path(path).is_file():
            raise DdpmkitError(f"Inception weights {path} do not exist")
        return Path(path)
    name = INCEPTION_URL.rsplit("/", 1)[1]
    dest = cache_dir() / "inception" / name
    for candidate in (dest, Path(torch.hub.get_dir()) / "checkpoints" / name):
        if candidate.is_file():
            return candidate
    reason = "downloads are off"
    if download:
        try:
            _fetch(INCEPTION_URL, dest, progress)
            return dest
        except OSError as error:
            reason = f"the download failed: {error}"
    raise InceptionUnavailable(f"Inception metrics skipped: no InceptionV3 weights here ({reason}); {INCEPTION_HINT}")


def _fetch(url: str, dest: Path, progress: bool) -> None:
    """Download to a temporary file, then rename; a failure leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + f".{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def load_inception(weights: Path, device="cpu") -> torch.nn.Module:
    """torch-fidelity's InceptionV3 giving (2048-d pool features, 1008 unbiased logits) per uint8 image.

    torch-fidelity unpickles a weights path without restriction, so the file is read here with the
    safe loader (safetensors, or torch.load(weights_only=True)) and handed over as plain tensors.
    """
    extractor_class = _extractor_class()
    try:
        state = load_file(str(weights)) if str(weights).endswith(".safetensors") else \
            torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DdpmkitError(f"cannot read Inception weights {weights}: {error}") from None
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "inception.pth"
        torch.save({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, plain)
        try:
            net = extractor_class("inception-v3-compat", ["2048", "logits_unbiased"],
                                  feature_extractor_weights_path=str(plain))
        except RuntimeError as error:
            raise DdpmkitError(f"{weights} are not torch-fidelity's InceptionV3 weights: {error}") from None
    return net.to(device).eval()


@torch.inference_mode()
def inception_features(extractor, images: torch.Tensor, batch_size: int = 100, device="cpu", progress: bool = False):
    """(features [N, 2048], logits [N, 1008]) in float64 for images in [-1, 1] or uint8.

    Images go in as 8-bit RGB (grayscale repeated to 3 channels); the extractor resizes to 299x299.
    """
    images = images if images.dtype == torch.uint8 else to_uint8(images)
    feats, logits = [], []
    for start in viz.maybe_tqdm(range(0, len(images), batch_size), progress, "inception"):
        batch = images[start:start + batch_size].to(device)
        batch = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
        f, z = extractor(batch)
        feats.append(f.double().cpu())
        logits.append(z.double().cpu())
    return torch.cat(feats), torch.cat(logits)


class InceptionMetrics:
    """FID against a dataset's test images (statistics cached) and the Inception score."""

    def __init__(self, extractor, ref_mu: torch.Tensor, ref_sigma: torch.Tensor, device="cpu", batch_size: int = 100):
        self.extractor, self.ref_mu, self.ref_sigma = extractor, ref_mu, ref_sigma
        self.device, self.batch_size = device, batch_size

    @staticmethod
    def for_dataset(name: str, data_dir=None, image_size: Optional[int] = None, weights=None, device="cpu",
                    download: bool = True, progress: bool = True) -> "InceptionMetrics":
        """Raises InceptionUnavailable (one line) when torch-fidelity or the weights are missing."""
        _extractor_class()
        weights = inception_weights(weights, download, progress)
        extractor = load_inception(weights, device)
        test = load_dataset(name, "test", data_dir, image_size, progress=progress)
        images = test.images[:MAX_REFERENCE]
        stats_path = cache_dir() / "inception" / f"{test.info.name}-{_images_key(images, weights)}-stats.safetensors"
        if stats_path.is_file():
            stats = load_file(stats_path)
        else:
            feats, _ = inception_features(extractor, images, device=device, progress=progress)
            stats = dict(zip(("mu", "sigma"), feature_stats(feats)))
            atomic_write(stats_path, save(stats))
        return InceptionMetrics(extractor, stats["mu"], stats["sigma"], device)

    def score(self, images: torch.Tensor, progress: bool = False) -> dict:
        feats, logits = inception_features(self.extractor, images, self.batch_size, self.device, progress)
        is_mean, is_std = inception_score(logits)
        return {"fid": frechet_distance(*feature_stats(feats), self.ref_mu, self.ref_sigma),
                "inception_score": is_mean, "inception_score_std": is_std}


def _images_key(images: torch.Tensor, weights: Path) -> str:
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    digest.update(sha256_file(weights).encode())
    return digest.hexdigest()[:16]


# ---- image degradations for reference rows -------------------------------------------------------


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (std `sigma` pixels, reflected edges) of float images [N, C, H, W]."""
    if sigma <= 0:
        return images
    radius = max(1, min(int(3 * sigma + 0.5), images.shape[-1] - 1))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.pad(images.float(), (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.reshape(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, kernel.reshape(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


# ---- `ddpmkit eval`: one report per evaluation -------------------------------------------------


def evaluate_run(run_dir: Path, *, n: int, settings, seed: int = 0, batch_size: int = 256, nll_n: int = 0,
                 nll_stride: int = 10, inception: str = "auto", inception_weights_path=None, device="cpu",
                 which: str = "ema", progress: bool = True) -> dict:
    """Draw n samples from a run (classes balanced), score them, and estimate bits/dim on nll_n test images."""
    from . import checkpoint
    from .likelihood import nll_bpd
    from .sampling import check_guidance, generate, load_denoiser

    config, denoiser = load_denoiser(run_dir, device, which)
    check_guidance(config, settings.guidance)
    labels = torch.arange(n) % config.num_classes if config.data.conditional else None
    shape = (config.in_channels, config.image_size, config.image_size)
    images = generate(denoiser, n, shape, labels=labels, settings=settings, seed=seed, batch_size=batch_size,
                      device=device, progress=progress)
    data = {"name": config.data.dataset, "data_dir": config.data.data_dir, "image_size": config.data.image_size}
    results = score_images(images, labels, data, inception, inception_weights_path, device, progress)
    if nll_n > 0:
        test = load_dataset(data["name"], "test", data["data_dir"], data["image_size"], progress=progress)
        pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:nll_n]
        denoiser.precision = "fp32"  # the bound is sensitive to small errors in eps_hat at small t
        results["nll"] = nll_bpd(denoiser, test.images[pick], test.labels[pick] if config.data.conditional else None,
                                 stride=nll_stride, batch_size=batch_size,
                                 generator=torch.Generator().manual_seed(seed), progress=progress)
        results["nll"]["conditional"] = bool(config.data.conditional)
    ckpt = checkpoint.latest_checkpoint(run_dir)
    return {"kind": "run", "run_dir": str(Path(run_dir).resolve()), "checkpoint": ckpt.name, "weights": which,
            "dataset": data, "n": n, "seed": seed, "batch_size": batch_size, "device": str(device),
            "sampling": dict(settings.__dict__), "nll_n": nll_n, "nll_stride": nll_stride, "results": results}


def evaluate_reference(dataset: str, *, n: int, data_dir=None, image_size: Optional[int] = None, blur: float = 0.0,
                       seed: int = 0, inception: str = "auto", inception_weights_path=None, device="cpu",
                       progress: bool = True) -> dict:
    """The same metrics for n real TRAIN images (optionally blurred), scored against the TEST set:
    a held-out floor for each metric at this n, and what a given degradation costs."""
    train = load_dataset(dataset, "train", data_dir, image_size, progress=progress)
    if n > len(train):
        raise DdpmkitError(f"--n {n} exceeds the {len(train)} training images of {dataset}")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    images = gaussian_blur(to_model_range(train.images[pick]), blur)
    labels = train.labels[pick] if bool((train.labels[pick] >= 0).all()) else None
    data = {"name": dataset, "data_dir": data_dir, "image_size": image_size}
    results = score_images(images, labels, data, inception, inception_weights_path, device, progress)
    return {"kind": "reference", "dataset": data, "split": "train", "blur_sigma": blur, "n": n, "seed": seed,
            "device": str(device), "results": results}


def score_images(images, labels, data: dict, inception: str, weights, device, progress) -> dict:
    """Domain metrics, plus Inception's when asked for (inception "on", or "auto" on a GPU) and
    available; a skipped group gets one line on stderr saying why and how to get it."""
    from .domain import DomainMetrics
    results = {}
    try:
        domain = DomainMetrics.for_dataset(data["name"], data["data_dir"], data["image_size"], device, progress)
        results["domain"] = domain.score(images, labels)
        results["classifier"] = domain.info
    except DdpmkitError as why:  # e.g. a folder dataset without classes
        print(f"domain metrics skipped: {why}", file=sys.stderr)
        results["domain"] = {"skipped": str(why)}
    if inception == "off":
        return results
    try:
        if inception == "auto" and not str(device).startswith("cuda"):
            raise InceptionUnavailable(INCEPTION_ON_CPU)
        metrics = InceptionMetrics.for_dataset(data["name"], data["data_dir"], data["image_size"], weights,
                                               device, progress=progress)
        results["inception"] = metrics.score(images, progress)
    except InceptionUnavailable as why:
        print(str(why), file=sys.stderr)
        results["inception"] = {"skipped": str(why)}
    return results


def provenance(argv, inception_weights_path, seconds: float) -> dict:
    """What a report needs to be reproduced: the command, the time, the software versions."""
    import platform
    import time
    import numpy
    from . import __version__
    return {"command": ["ddpmkit", *argv], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inception_weights": None if inception_weights_path is None else str(inception_weights_path),
            "seconds": round(seconds, 1),
            "versions": {"ddpmkit": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
                         "python": platform.python_version()}}


def metrics_table(report: dict) -> str:
    """The headline numbers as a two-column table."""
    r, rows = report["results"], []
    for group in ("domain", "inception"):
        values = r.get(group, {})
        rows += [(group, "skipped")] if "skipped" in values else [(f"{group} {k}", v) for k, v in values.items()]
    rows += [(f"nll {k}", r["nll"][k]) for k in ("bpd", "bpd_sem", "prior_bpd", "decoder_bpd", "kl_bpd", "n")
             if "nll" in r]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{name:<{width}}  {_fmt(value)}" for name, value in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
