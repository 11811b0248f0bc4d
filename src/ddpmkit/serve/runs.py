"""The runs a server shows: each loaded once at start-up with what its tabs need.

A served run is its config and denoiser (through the one loader, `run.load.load_denoiser`), a
counter of network evaluations, a few images of its dataset for the forward process, and the
summary of its Run tab: the config, the steps trained, the loss curve and the latest eval table.
Everything is read from the run directory (and the dataset its config names) here, once; requests
read nothing from disk.
"""

from __future__ import annotations

import io
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ddpmkit import viz
from ddpmkit.core.denoiser import Denoiser
from ddpmkit.core.pixels import to_model_range
from ddpmkit.data import load_dataset
from ddpmkit.errors import DdpmkitError
from ddpmkit.eval.report import metrics_table
from ddpmkit.run import checkpoint
from ddpmkit.run.config import RunConfig
from ddpmkit.run.load import load_denoiser

METRICS_MAX_BYTES = 64 << 20  # metrics.jsonl of a very long run is a few MB
EVAL_MAX_BYTES = 4 << 20  # an eval report is a few kB
EXAMPLES_PER_CLASS = 2  # dataset images offered by the forward-process tab, per class


class EvaluationCounter:
    """Counts the denoiser's forward calls (network function evaluations, NFE) per thread.

    Each request samples in a thread of its own, so concurrent requests count only their own calls.
    """

    def __init__(self, denoiser: Denoiser):
        self._local = threading.local()
        denoiser.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self._local.calls = self.calls + 1

    @property
    def calls(self) -> int:
        return getattr(self._local, "calls", 0)

    def reset(self) -> None:
        self._local.calls = 0


@dataclass
class Examples:
    """Training images of the run's dataset in [-1, 1], the classes in turn, and their names."""

    images: torch.Tensor
    names: list[str]


@dataclass
class Summary:
    """What the Run tab shows."""

    config_json: str
    steps_trained: int
    loss_curve: Image.Image | None  # None: no logged losses yet
    eval_name: str | None  # the latest RUN/eval-*.json, or None
    eval_table: str | None  # its metrics table, or why it could not be read


@dataclass
class ServedRun:
    name: str
    run_dir: Path
    config: RunConfig
    denoiser: Denoiser
    device: str
    counter: EvaluationCounter
    examples: Examples | None
    examples_problem: str | None  # why there are no examples (say, the dataset is not on this machine)
    summary: Summary

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.config.in_channels, self.config.image_size, self.config.image_size)

    @property
    def T(self) -> int:
        return self.denoiser.schedule.T


def load_runs(paths, device="cpu", which: str = "ema") -> dict[str, ServedRun]:
    """Every run loaded once, by page name; a run that cannot be loaded raises DdpmkitError naming it."""
    runs = {}
    for name, path in zip(run_names(paths), paths):
        try:
            runs[name] = load_run(name, Path(path), device, which)
        except DdpmkitError as e:
            raise DdpmkitError(f"cannot serve {path}: {e}") from e
    return runs


def run_names(paths) -> list[str]:
    """Each run's name on the page: its directory's name, or the path as given where names clash."""
    resolved = [Path(p).resolve() for p in paths]
    for k, path in enumerate(resolved):
        if path in resolved[:k]:
            raise DdpmkitError(f"{paths[k]} is given twice")
    names = [path.name or str(path) for path in resolved]
    return [str(p) if names.count(name) > 1 else name for p, name in zip(paths, names)]


def load_run(name: str, run_dir: Path, device="cpu", which: str = "ema") -> ServedRun:
    config, denoiser = load_denoiser(run_dir, device, which)
    try:
        examples, problem = load_examples(config), None
    except (DdpmkitError, OSError) as e:  # the forward tab says why; the rest of the page works
        examples, problem = None, f"the run's dataset ({config.data.dataset}) could not be read: {e}"
    return ServedRun(
        name,
        run_dir,
        config,
        denoiser,
        str(device),
        EvaluationCounter(denoiser),
        examples,
        problem,
        summary(run_dir, config),
    )


def load_examples(config: RunConfig) -> Examples:
    """A few training images of the run's dataset (never downloaded: a server makes no network calls)."""
    data = load_dataset(
        config.data.dataset,
        "train",
        config.data.data_dir,
        config.data.image_size,
        download=False,
        channels=config.in_channels,
        progress=False,
    )
    classes = max(1, len(set(data.labels[data.labels >= 0].tolist())))
    index = viz.one_per_class(data.labels, EXAMPLES_PER_CLASS * classes)
    names = [_example_name(int(data.labels[i]), config.class_names, k) for k, i in enumerate(index)]
    return Examples(to_model_range(data.images[index]).clone(), names)


def _example_name(label: int, class_names, k: int) -> str:
    if 0 <= label < len(class_names):
        return f"{k}: {class_names[label]}"
    return f"{k}: image {k}"


# ---- the Run tab ------------------------------------------------------------------------------


def summary(run_dir: Path, config: RunConfig) -> Summary:
    latest = checkpoint.latest_checkpoint(run_dir)
    steps = int(latest.name[len(checkpoint.CKPT_PREFIX) :]) if latest is not None else 0
    metrics = read_metrics(run_dir / "metrics.jsonl")
    curve = _image(viz.figure_png(viz.loss_figure(metrics))) if metrics else None
    eval_name, table = latest_eval(run_dir)
    return Summary(config.to_json(), steps, curve, eval_name, table)


def read_metrics(path: Path) -> list[dict]:
    """The logged steps with a finite positive loss; lines that are not such JSON objects are skipped."""
    if not path.is_file() or path.stat().st_size > METRICS_MAX_BYTES:
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, or nested beyond the parser
            continue
        if isinstance(row, dict) and _number(row.get("step")) and _number(row.get("loss")) and row["loss"] > 0:
            rows.append(row)
    return rows


def latest_eval(run_dir: Path) -> tuple[str | None, str | None]:
    """(name, metrics table) of the newest RUN/eval-*.json (its name holds its time), or (None, None)."""
    reports = sorted(Path(run_dir).glob("eval-*.json"))
    if not reports:
        return None, None
    path = reports[-1]
    try:
        if path.stat().st_size > EVAL_MAX_BYTES:
            raise ValueError(f"larger than {EVAL_MAX_BYTES >> 20} MiB")
        report = json.loads(path.read_text())
        return path.name, _settings_line(report) + metrics_table(report)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        return path.name, f"(could not read {path.name}: {type(e).__name__}: {str(e)[:200]})"


def _settings_line(report: dict) -> str:
    s = report.get("sampling") if isinstance(report.get("sampling"), dict) else {}
    if not s:
        return ""
    what = ", ".join(f"{k} {s[k]}" for k in ("sampler", "steps", "spacing", "guidance") if k in s)
    return f"{report.get('n', '?')} images, {what}\n\n"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _image(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image
