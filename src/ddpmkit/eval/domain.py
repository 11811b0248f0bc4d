"""Domain metrics: a small CNN classifier per dataset, trained once and cached, whose penultimate
features and predictions judge generated images where Inception (ImageNet photos) is a poor judge,
as for 28x28 digits and clothes, or a folder of 32x32 emoji.

The classifier learns the train split and is judged on the test split (a folder's: the images
held out by data.split). Its test accuracy, balanced accuracy (unbalanced classes count alike),
the train split's class counts and the test set's feature statistics live in
cache_dir()/classifiers/<dataset>-<hash>.*; the hash covers the architecture, the training
recipe and the bytes of both splits, so a changed dataset or recipe trains a new one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from ddpmkit.core.pixels import to_model_range, to_uint8
from ddpmkit.data import ImageData, load_dataset
from ddpmkit.data.download import cache_dir
from ddpmkit.data.folder import WHITE
from ddpmkit.errors import DdpmkitError
from ddpmkit.eval.metrics import feature_stats, frechet_distance, precision_recall
from ddpmkit.fileio import atomic_write, atomic_write_text
from ddpmkit.progress import maybe_tqdm

RECIPE = {
    "version": 3,
    "widths": (16, 32, 64),
    "features": 128,
    "epochs": 2,
    # small folders (3,400 emoji: 2 epochs = 53 steps) need more steps; Fashion-MNIST's 2 epochs are 937
    "min_steps": 300,
    "batch_size": 128,
    "lr": 2e-3,
    "class_weights": "balanced",  # unbalanced classes: cross-entropy weighted by N / (K n_c); none if equal
    "seed": 0,
}
MAX_REFERENCE = 10_000  # test images whose features are kept as the reference set


class DomainClassifier(nn.Module):
    """Three 3x3 conv + batch-norm layers (two 2x2 max-pools), pooled to 7x7, then a 128-d feature layer."""

    def __init__(self, channels: int, num_classes: int, widths=RECIPE["widths"], features: int = RECIPE["features"]):
        super().__init__()
        w1, w2, w3 = widths

        def conv(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *conv(channels, w1),
            nn.MaxPool2d(2),
            *conv(w1, w2),
            nn.MaxPool2d(2),
            *conv(w2, w3),
            nn.AdaptiveAvgPool2d(7),
            nn.Flatten(),
            nn.Linear(49 * w3, features),
            nn.ReLU(),
        )
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> (penultimate features [B, 128], logits [B, classes])."""
        h = self.body(x)
        return h, self.head(h)


def fingerprint(train: ImageData, test: ImageData) -> str:
    """A short hash of the recipe and of both splits' pixels and labels."""
    digest = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    for data in (train, test):
        digest.update(str(tuple(data.images.shape)).encode())
        digest.update(data.images.contiguous().numpy().tobytes())
        digest.update(data.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """N / (K n_c) per class c (what makes every class weigh the same in the loss); None when the
    classes are balanced already, as plain cross-entropy is then the same."""
    counts = torch.bincount(labels, minlength=num_classes)
    if bool((counts == counts[0]).all()):
        return None
    return len(labels) / (num_classes * counts.clamp(min=1).float())


def train_classifier(data: ImageData, progress: bool = True) -> DomainClassifier:
    """Adam on (class-weighted) cross-entropy for RECIPE's epochs (at least min_steps steps); seeded, so repeatable."""
    r = RECIPE
    g = torch.Generator().manual_seed(r["seed"])
    with torch.random.fork_rng():
        torch.manual_seed(r["seed"])
        net = DomainClassifier(data.info.channels, data.info.num_classes)
    optimizer = torch.optim.Adam(net.parameters(), lr=r["lr"])
    batch = min(r["batch_size"], len(data))
    per_epoch = len(data) // batch
    steps = max(math.ceil(r["epochs"] * per_epoch), r["min_steps"])
    order = torch.empty(0, dtype=torch.long)
    weight = class_weights(data.labels, data.info.num_classes)
    net.train()
    for _ in maybe_tqdm(range(steps), progress, "domain classifier"):
        if len(order) < batch:
            order = torch.randperm(len(data), generator=g)
        idx, order = order[:batch], order[batch:]
        _, logits = net(to_model_range(data.images[idx]))
        loss = F.cross_entropy(logits, data.labels[idx], weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.inference_mode()
def classify(net: DomainClassifier, images: torch.Tensor, batch_size: int = 512, device="cpu"):
    """(features [N, 128] float64, logits [N, K]) for uint8 images, or floats in [-1, 1] (quantized to
    8 bits first, as a saved image would be)."""
    images = images if images.dtype == torch.uint8 else to_uint8(images)
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        h, out = net(to_model_range(images[start : start + batch_size].to(device)))
        feats.append(h.double().cpu())
        logits.append(out.float().cpu())
    if not feats:
        raise DdpmkitError("no images to score")
    return torch.cat(feats), torch.cat(logits)


class DomainMetrics:
    """A trained domain classifier and the test set's reference features."""

    def __init__(self, net: DomainClassifier, reference: dict, info: dict, device="cpu"):
        """reference: {"features": float64 [M, 128] of up to 10k test images, "mu", "sigma": their statistics}."""
        self.net, self.info, self.device = net.to(device).eval(), info, device
        self.reference, self.ref_mu, self.ref_sigma = reference["features"], reference["mu"], reference["sigma"]

    @staticmethod
    def for_dataset(
        name: str,
        data_dir=None,
        image_size: int | None = None,
        device="cpu",
        progress: bool = True,
        *,
        fit: str = "crop",
        background=WHITE,
    ) -> DomainMetrics:
        """Load the cached classifier of this dataset, or train it once (and cache it). A folder's
        classifier learns its train split and is judged on its held-out test split (data.split);
        `fit` and `background` decode it as the run's training did."""
        decoding = {"progress": progress, "fit": fit, "background": tuple(background)}
        train = load_dataset(name, "train", data_dir, image_size, **decoding)
        test = load_dataset(name, "test", data_dir, image_size, **decoding)
        if train.info.num_classes < 2 or bool((train.labels < 0).any()) or bool((test.labels < 0).any()):
            raise DdpmkitError(f"domain metrics need class labels, and dataset {name} has none")
        stem = cache_dir() / "classifiers" / f"{train.info.name}-{fingerprint(train, test)}"
        paths = {
            k: stem.with_name(stem.name + suffix)
            for k, suffix in (("weights", ".safetensors"), ("info", ".json"), ("reference", "-reference.safetensors"))
        }
        net = DomainClassifier(train.info.channels, train.info.num_classes)
        if all(p.is_file() for p in paths.values()):
            net.load_state_dict(load_file(paths["weights"]))
            info = json.loads(paths["info"].read_text())
            return DomainMetrics(net, load_file(paths["reference"]), info, device)
        return _train_and_cache(train, test, paths, progress, device)

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """Metrics of images (floats in [-1, 1] or uint8); labels: the class each was drawn for."""
        feats, logits = classify(self.net, images, device=self.device)
        pred = logits.argmax(1)
        hist = torch.bincount(pred, minlength=logits.shape[1]).double() / len(pred)
        entropy = -(hist[hist > 0] * hist[hist > 0].log()).sum().item()  # log K when uniform
        # against all (up to 10k) reference features: precision then does not depend on n. k-NN precision
        # is sensitive to outliers among them, whose large balls can cover even noise: read it with recall
        precision, recall = precision_recall(self.reference, feats)
        return {
            "n": len(feats),
            "fd_dom": frechet_distance(*feature_stats(feats), self.ref_mu, self.ref_sigma),
            "conditional_accuracy": None if labels is None else accuracy(pred, labels.cpu()),
            "conditional_balanced_accuracy": None if labels is None else balanced_accuracy(pred, labels.cpu()),
            "conditional_accuracy_per_class": None if labels is None else class_accuracies(pred, labels.cpu()),
            "class_entropy": entropy,
            "class_entropy_max": math.log(logits.shape[1]),
            "precision": precision,
            "recall": recall,
            "reference_n": len(self.reference),
            "classifier_test_accuracy": self.info["test_accuracy"],
            "classifier_test_balanced_accuracy": self.info["test_balanced_accuracy"],
        }


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of predictions equal to the labels."""
    return (pred == labels).double().mean().item()


def balanced_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean over the classes present in `labels` of each class's accuracy (its recall): on
    unbalanced classes, what plain accuracy would be if every class counted the same."""
    return sum(accuracy(pred[labels == c], c) for c in labels.unique().tolist()) / len(labels.unique())


def class_accuracies(pred: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """Each class's accuracy (its recall) among the images labelled with it: {class: accuracy} for
    the classes present, so that a class the model cannot draw shows even when the others hide it."""
    return {c: accuracy(pred[labels == c], c) for c in labels.unique().tolist()}


def _train_and_cache(train: ImageData, test: ImageData, paths: dict, progress: bool, device) -> DomainMetrics:
    started = time.monotonic()
    net = train_classifier(train, progress)
    seconds = time.monotonic() - started
    feats, logits = classify(net, test.images)
    pred = logits.argmax(1)
    keep = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:MAX_REFERENCE]
    reference = feats[keep.sort().values]
    info = {
        "dataset": train.info.name,
        "test_accuracy": accuracy(pred, test.labels),
        "test_balanced_accuracy": balanced_accuracy(pred, test.labels),
        "train_class_counts": torch.bincount(train.labels, minlength=train.info.num_classes).tolist(),
        "train_seconds": round(seconds, 1),
        "train_images": len(train),
        "test_images": len(test),
        "reference_images": len(reference),
        "recipe": RECIPE,
        "weights": str(paths["weights"]),
    }
    paths["weights"].parent.mkdir(parents=True, exist_ok=True)
    mu, sigma = feature_stats(reference)
    _save_safetensors(net.state_dict(), paths["weights"])
    _save_safetensors({"features": reference, "mu": mu, "sigma": sigma}, paths["reference"])
    atomic_write_text(paths["info"], json.dumps(info, indent=2))  # written last: it marks the cache complete
    return DomainMetrics(net, {"features": reference, "mu": mu, "sigma": sigma}, info, device)


def _save_safetensors(tensors: dict, path: Path) -> None:
    atomic_write(path, save({k: v.contiguous() for k, v in tensors.items()}))
