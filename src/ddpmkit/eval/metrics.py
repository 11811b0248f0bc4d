"""Sample-quality maths in any feature space: Fréchet distance, improved precision/recall,
the Inception score, and the Gaussian blur used for reference rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpmkit.errors import DdpmkitError

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
    return torch.cat([torch.cdist(f[i : i + chunk], f).kthvalue(k + 1, dim=1).values for i in range(0, len(f), chunk)])


def coverage(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of points inside the union of balls around `manifold` with `radii`."""
    p, m = points.double(), manifold.double()
    inside = [(torch.cdist(p[i : i + chunk], m) <= radii[None]).any(1) for i in range(0, len(p), chunk)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    precision: fraction of fake samples inside the real manifold (balls of k-NN radius around real points);
    recall: fraction of real samples inside the fake manifold.
    """
    precision = coverage(fake, real, knn_radii(real, k))
    recall = coverage(real, fake, knn_radii(fake, k))
    return precision, recall


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
