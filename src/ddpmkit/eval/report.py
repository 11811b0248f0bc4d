"""`ddpmkit eval`: one report per evaluation (samples of a run, or real images), and its table."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy
import torch

from ddpmkit import __version__
from ddpmkit.core.likelihood import bound_blocks, nll_bpd
from ddpmkit.core.pixels import to_model_range
from ddpmkit.data import load_dataset
from ddpmkit.data.folder import WHITE
from ddpmkit.errors import DdpmkitError
from ddpmkit.eval.domain import DomainMetrics
from ddpmkit.eval.inception import INCEPTION_ON_CPU, InceptionMetrics, InceptionUnavailable
from ddpmkit.eval.metrics import gaussian_blur
from ddpmkit.run import checkpoint
from ddpmkit.run.load import load_denoiser
from ddpmkit.run.sampling import check_guidance, generate, proportional_labels

# ---- `ddpmkit eval`: one report per evaluation -------------------------------------------------


def evaluate_run(
    run_dir: Path,
    *,
    n: int,
    settings,
    seed: int = 0,
    batch_size: int = 256,
    nll_n: int | str = 0,
    nll_stride: int = 10,
    inception: str = "auto",
    inception_weights_path=None,
    device="cpu",
    which: str = "ema",
    progress: bool = True,
) -> dict:
    """Draw n samples from a run (classes in the training data's proportions), score them, and
    estimate bits/dim on nll_n test images ("auto": auto_nll_n)."""
    config, denoiser = load_denoiser(run_dir, device, which)
    check_guidance(config, settings.guidance)
    data = dataset_of(config)
    if config.data.train_on_all:
        data["train_on_all"] = True
        print(
            "note: this run trained on the whole folder (--train-on-all), so the held-out images that "
            "eval judges against are not held out from it",
            file=sys.stderr,
        )
    domain = load_domain_metrics(data, device, progress)
    labels = sample_labels(config, n, domain) if config.data.conditional else None
    shape = (config.in_channels, config.image_size, config.image_size)
    images = generate(
        denoiser,
        n,
        shape,
        labels=labels,
        settings=settings,
        seed=seed,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    results = score_images(images, labels, data, inception, inception_weights_path, device, progress, domain)
    if nll_n == "auto":
        nll_n = auto_nll_n(config.image_size, device)
    if nll_n > 0:
        test = load_dataset(
            data["name"], "test", data["data_dir"], data["image_size"], progress=progress, **decoding(data)
        )
        nll_n = min(nll_n, len(test))
        bounds = sum(nll_skip_reason(config, quantity) is None for quantity in NLL_QUANTITIES)
        passes = bounds * len(bound_blocks(denoiser.schedule.T, nll_stride))
        note = f"bits/dim on {nll_n} test images, {passes} fp32 network passes each (--nll-n 0 skips it)"
        print(note, file=sys.stderr)
        pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:nll_n]
        denoiser.precision = "fp32"  # the bound is sensitive to small errors in eps_hat at small t
        results["nll"] = bits_per_dim(
            config,
            denoiser,
            test.images[pick],
            test.labels[pick],
            stride=nll_stride,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
    ckpt = checkpoint.latest_checkpoint(run_dir)
    return {
        "kind": "run",
        "run_dir": str(Path(run_dir).resolve()),
        "checkpoint": ckpt.name,
        "weights": which,
        "dataset": data,
        "n": n,
        "seed": seed,
        "batch_size": batch_size,
        "device": str(device),
        "sampling": dict(settings.__dict__),
        "nll_n": nll_n,
        "nll_stride": nll_stride,
        "results": results,
    }


def auto_nll_n(image_size: int, device) -> int:
    """`--nll-n auto`: how many test images the bound is estimated on. 1000 on a GPU. On a CPU each
    image costs about 200 fp32 network passes (two bounds of ~100 stratified terms), more than
    drawing and scoring a sample, and the cost grows with the pixels: 100 images up to 32x32 (a
    standard error of ~0.1-0.2 bits/dim), a quarter as many per doubling of the side (25 at 64x64)."""
    if str(device).startswith("cuda"):
        return 1000
    return max(4, round(100 * min(1.0, (32 / image_size) ** 2)))


# the two likelihoods a run can have: -log p(x | y) with its class, -log p(x) through the null class
NLL_QUANTITIES = {"conditional": "-log p(x|y)", "unconditional": "-log p(x)"}


def nll_skip_reason(config, quantity: str) -> str | None:
    """Why a run has no such likelihood (None: it has one)."""
    if quantity == "conditional" and not config.data.conditional:
        return "the model is unconditional: there is no -log p(x|y)"
    if quantity == "unconditional" and config.data.conditional and config.data.label_dropout <= 0:
        return (
            "the model was trained without label dropout, so its null class (the unconditional model) "
            "is untrained: there is no -log p(x)"
        )
    return None


def bits_per_dim(config, denoiser, images, labels, *, stride: int, batch_size: int, seed: int, progress: bool) -> dict:
    """The bound on -log p(x|y) (each image with its class) and on -log p(x) (the null class, for a
    conditional model trained with label dropout), each with its standard error, or the reason it is
    skipped. Both use the same noise (the same seed), so that their difference is paired."""
    out = {}
    for quantity, label in NLL_QUANTITIES.items():
        why = nll_skip_reason(config, quantity)
        if why is not None:
            print(f"bits/dim {label} skipped: {why}", file=sys.stderr)
            out[quantity] = {"quantity": label, "skipped": why}
            continue
        started = time.monotonic()
        y = labels if quantity == "conditional" else None
        summary = nll_bpd(
            denoiser,
            images,
            y,
            stride=stride,
            batch_size=batch_size,
            generator=torch.Generator().manual_seed(seed),
            progress=progress,
        )
        out[quantity] = {"quantity": label, **summary, "seconds": round(time.monotonic() - started, 1)}
    return out


def evaluate_reference(
    dataset: str,
    *,
    n: int,
    data_dir=None,
    image_size: int | None = None,
    blur: float = 0.0,
    seed: int = 0,
    inception: str = "auto",
    inception_weights_path=None,
    device="cpu",
    progress: bool = True,
    fit: str = "crop",
    background=WHITE,
) -> dict:
    """The same metrics for n real TRAIN images (optionally blurred), scored against the TEST set:
    a held-out floor for each metric at this n, and what a given degradation costs.
    fit, background: how a folder's images are decoded; a run's floor needs the run's own
    (`dataset_of(config)` holds them), else its samples are judged against differently framed images."""
    data = {"name": dataset, "data_dir": data_dir, "image_size": image_size, "fit": fit, "background": list(background)}
    train = load_dataset(dataset, "train", data_dir, image_size, progress=progress, **decoding(data))
    if n > len(train):
        raise DdpmkitError(f"--n {n} exceeds the {len(train)} training images of {dataset}")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    images = gaussian_blur(to_model_range(train.images[pick]), blur)
    labels = train.labels[pick] if bool((train.labels[pick] >= 0).all()) else None
    results = score_images(images, labels, data, inception, inception_weights_path, device, progress)
    return {
        "kind": "reference",
        "dataset": data,
        "split": "train",
        "blur_sigma": blur,
        "n": n,
        "seed": seed,
        "device": str(device),
        "results": results,
    }


def sample_labels(config, n: int, domain: DomainMetrics | None) -> torch.Tensor:
    """The classes to draw n samples of: in the proportions of the classes the domain classifier was
    trained on (the training split's), so that the samples are compared with images distributed like
    them; equal proportions (or no classifier) give the classes in turn."""
    counts = domain.info.get("train_class_counts") if domain is not None else None
    if counts is None or len(counts) != config.num_classes:
        counts = [1] * config.num_classes
    return proportional_labels(n, counts)


def eval_labels(config, n: int, device="cpu", progress: bool = False) -> torch.Tensor | None:
    """The labels `ddpmkit eval` draws n samples of for a run (sample_labels; None when unconditional):
    for scripts that draw and score the same images themselves."""
    if not config.data.conditional:
        return None
    return sample_labels(config, n, load_domain_metrics(dataset_of(config), device, progress))


def dataset_of(config) -> dict:
    """The dataset a run trained on, and how its images were decoded (what eval loads to judge it)."""
    d = config.data
    return {
        "name": d.dataset,
        "data_dir": d.data_dir,
        "image_size": d.image_size,
        "fit": d.fit,
        "background": list(d.background),
    }


def reference_data(config) -> dict:
    """evaluate_reference's data arguments for a run: its dataset, decoded as its training decoded it."""
    data = dataset_of(config)
    keys = {"name": "dataset", "data_dir": "data_dir", "image_size": "image_size"}
    return {**{keys[k]: data[k] for k in keys}, **decoding(data)}


def decoding(data: dict) -> dict:
    """load_dataset's decoding options of a dataset description (the defaults when it has none)."""
    return {"fit": data.get("fit", "crop"), "background": tuple(data.get("background", WHITE))}


def load_domain_metrics(data: dict, device, progress: bool) -> DomainMetrics | None:
    """The dataset's domain metrics, or None when they cannot be had (score_images then says why)."""
    try:
        return DomainMetrics.for_dataset(
            data["name"], data["data_dir"], data["image_size"], device, progress, **decoding(data)
        )
    except DdpmkitError:
        return None


def score_images(images, labels, data: dict, inception: str, weights, device, progress, domain=None) -> dict:
    """Domain metrics, plus Inception's when asked for (inception "on", or "auto" on a GPU) and
    available; a skipped group gets one line on stderr saying why and how to get it.
    domain: the DomainMetrics of `data` when already loaded."""
    results = {}
    try:
        domain = domain or DomainMetrics.for_dataset(
            data["name"], data["data_dir"], data["image_size"], device, progress, **decoding(data)
        )
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
        metrics = InceptionMetrics.for_dataset(
            data["name"], data["data_dir"], data["image_size"], weights, device, progress=progress, **decoding(data)
        )
        results["inception"] = metrics.score(images, progress)
    except InceptionUnavailable as why:
        print(str(why), file=sys.stderr)
        results["inception"] = {"skipped": str(why)}
    return results


def provenance(argv, inception_weights_path, seconds: float) -> dict:
    """What a report needs to be reproduced: the command, the time, the software versions."""
    return {
        "command": ["ddpmkit", *argv],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inception_weights": None if inception_weights_path is None else str(inception_weights_path),
        "seconds": round(seconds, 1),
        "versions": {
            "ddpmkit": __version__,
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "python": platform.python_version(),
        },
    }


def metrics_table(report: dict) -> str:
    """The headline numbers as a two-column table."""
    r, rows = report["results"], []
    for group in ("domain", "inception"):
        values = r.get(group, {})
        rows += [(group, "skipped")] if "skipped" in values else [(f"{group} {k}", v) for k, v in values.items()]
    for quantity in r.get("nll", {}).values():
        name = f"bits/dim {quantity['quantity']}"
        if "skipped" in quantity:
            rows.append((name, "skipped"))
            continue
        rows += [(f"{name} {k}", quantity[k]) for k in ("bpd", "bpd_sem", "prior_bpd", "decoder_bpd", "kl_bpd", "n")]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{name:<{width}}  {_fmt(value)}" for name, value in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):  # per class
        return ", ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in value.items())
    return f"{value:.4f}" if isinstance(value, float) else str(value)
