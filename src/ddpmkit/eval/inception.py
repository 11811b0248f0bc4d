"""Inception FID and IS: torch-fidelity's TF-compatible InceptionV3 (the one torchmetrics wraps).

Its weights come from --inception-weights, the cache, or a download, and are always read with the
safe loader. torch-fidelity is the optional `eval` extra; it is imported only when asked for.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm import tqdm

from ddpmkit.core.pixels import to_uint8
from ddpmkit.data import load_dataset
from ddpmkit.data.download import cache_dir, sha256_file
from ddpmkit.errors import DdpmkitError
from ddpmkit.eval.metrics import feature_stats, frechet_distance, inception_score
from ddpmkit.fileio import atomic_write
from ddpmkit.progress import maybe_tqdm

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_HINT = f"download {INCEPTION_URL} and pass --inception-weights PATH (or set DDPMKIT_INCEPTION_WEIGHTS)"
INCEPTION_ON_CPU = (
    "Inception metrics skipped: InceptionV3 takes about a second per image on a CPU (and the "
    "reference statistics 10k images, once); pass --inception on to compute them anyway"
)
MAX_REFERENCE = 10_000  # reference images for statistics


class InceptionUnavailable(Exception):
    """Inception metrics cannot run here; the message is one line saying how to get them."""


def _extractor_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as error:  # ImportError, or a broken dependency such as torchvision
        raise InceptionUnavailable(
            f"Inception metrics skipped: torch-fidelity cannot be imported ({error}); "
            f"pip install 'ddpmkit[eval]', then {INCEPTION_HINT}"
        ) from None
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
        state = (
            load_file(str(weights))
            if str(weights).endswith(".safetensors")
            else torch.load(weights, map_location="cpu", weights_only=True)
        )
    except Exception as error:
        raise DdpmkitError(f"cannot read Inception weights {weights}: {error}") from None
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "inception.pth"
        torch.save({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, plain)
        try:
            net = extractor_class(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(plain)
            )
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
    for start in maybe_tqdm(range(0, len(images), batch_size), progress, "inception"):
        batch = images[start : start + batch_size].to(device)
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
    def for_dataset(
        name: str,
        data_dir=None,
        image_size: int | None = None,
        weights=None,
        device="cpu",
        download: bool = True,
        progress: bool = True,
    ) -> InceptionMetrics:
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
        return {
            "fid": frechet_distance(*feature_stats(feats), self.ref_mu, self.ref_sigma),
            "inception_score": is_mean,
            "inception_score_std": is_std,
        }


def _images_key(images: torch.Tensor, weights: Path) -> str:
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    digest.update(sha256_file(weights).encode())
    return digest.hexdigest()[:16]
