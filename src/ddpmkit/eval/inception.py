"""Inception FID and IS with ddpmkit's port of the FID InceptionV3 (eval.inceptionv3).

Its weights are torch-fidelity's published file (the TF 2015-12-05 Inception, converted), from
--inception-weights, the cache, or a download; always read with the safe loaders and checked
against the architecture's names and shapes before they are loaded. Nothing beyond torch is needed.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm import tqdm

from ddpmkit.core.pixels import to_uint8
from ddpmkit.data import load_dataset
from ddpmkit.data.download import cache_dir, sha256_file
from ddpmkit.errors import DdpmkitError
from ddpmkit.eval.inceptionv3 import InceptionV3
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


def load_inception(weights: Path, device="cpu") -> InceptionV3:
    """The FID InceptionV3 with the weights in `weights` (torch-fidelity's .pth, or .safetensors).

    Read with the safe loaders (safetensors, or torch.load(weights_only=True): no code is unpickled);
    the tensors' names and shapes must be the architecture's (BatchNorm's num_batches_tracked aside).
    """
    try:
        state = (
            load_file(str(weights))
            if str(weights).endswith(".safetensors")
            else torch.load(weights, map_location="cpu", weights_only=True)
        )
    except Exception as error:
        raise DdpmkitError(f"cannot read Inception weights {weights}: {_first_line(error)}") from None
    with torch.device("meta"):  # the layout only: no memory, no random init
        net = InceptionV3()
    tensors = _checked_weights(weights, state, net)
    counters = {k: torch.zeros((), dtype=torch.long) for k in net.state_dict() if k.endswith("num_batches_tracked")}
    net.load_state_dict({**counters, **tensors}, assign=True)  # the loaded tensors become the weights
    return net.to(device).eval()


def _checked_weights(weights: Path, state, net: InceptionV3) -> dict:
    """The tensors of `state` if they are exactly the net's weights; BatchNorm's batch counters (not
    read in eval mode) are left out, as some files leave them out."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DdpmkitError(f"{weights} are not the FID InceptionV3's weights: not a dictionary of tensors")
    expected = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    problems = [f"{k} missing" for k in sorted(expected.keys() - given.keys())]
    problems += [f"{k} unexpected" for k in sorted(given.keys() - expected.keys())]
    problems += [
        f"{k} has shape {tuple(given[k].shape)}, not {tuple(expected[k])}"
        for k in sorted(expected.keys() & given.keys())
        if given[k].shape != expected[k]
    ]
    if problems:
        raise DdpmkitError(
            f"{weights} are not the FID InceptionV3's weights: {len(problems)} problem(s), e.g. {problems[0]}"
        )
    return given


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


@torch.inference_mode()
def inception_features(extractor, images: torch.Tensor, batch_size: int = 100, device="cpu", progress: bool = False):
    """(features [N, 2048], logits [N, 1008]) in float64 for images in [-1, 1] or uint8.

    Images go in as 8-bit RGB (grayscale repeated to 3 channels); InceptionV3 resizes them to 299x299.
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
        **decoding,
    ) -> InceptionMetrics:
        """Raises InceptionUnavailable (one line) when the weights are missing and cannot be downloaded.
        `decoding`: load_dataset's fit and background, as the run was trained."""
        weights = inception_weights(weights, download, progress)
        extractor = load_inception(weights, device)
        test = load_dataset(name, "test", data_dir, image_size, progress=progress, **decoding)
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
