"""The page's inputs checked and turned into sampling requests, within the server's limits.

Whatever a browser or an API client sends arrives here first: a value that cannot work is refused
with one sentence (DdpmkitError) before any sampling starts. The sampler's own options are the
SampleConfig fields that `core.samplers.sampler_options` names, so a new sampler needs no change here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ddpmkit.core.samplers import SAMPLERS, sampler_options
from ddpmkit.errors import DdpmkitError, either
from ddpmkit.run.config import RunConfig, SampleConfig, check_sample
from ddpmkit.run.sampling import check_guidance, default_labels
from ddpmkit.serve.runs import ServedRun
from ddpmkit.serve.settings import DEFAULT_LIMITS, Limits

EVERY_CLASS = "every class"  # one row per class, as `ddpmkit sample` draws them
UNCONDITIONAL = "none (unconditional)"  # the null class: no label, as trained by label dropout
COMPARE_MIN, COMPARE_MAX = 2, 4


@dataclass(frozen=True)
class Request:
    """One batch of images to draw: how many, from which seed and labels, with which sampler settings."""

    n: int
    seed: int
    labels: torch.Tensor | None  # None: unconditional (or the null class of a conditional model)
    settings: SampleConfig


def option_names() -> list[str]:
    """Every sampler option (a SampleConfig field), in registry order: the page has one control each."""
    names = []
    for sampler in SAMPLERS:
        names += [name for name in sampler_options(sampler) if name not in names]
    return names


def samplers_taking(option: str) -> list[str]:
    return [sampler for sampler in SAMPLERS if option in sampler_options(sampler)]


def option_type(option: str) -> tuple[type, bool]:
    """(bool, int, float or str, whether None is allowed): read from the option's SampleConfig annotation."""
    parts = [part.strip() for part in str(SampleConfig.__dataclass_fields__[option].type).split("|")]
    named = [part for part in parts if part != "None"]
    return _TYPES.get(named[0] if named else "str", str), "None" in parts


_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


# ---- classes ------------------------------------------------------------------------------------


def class_names(config: RunConfig) -> list[str]:
    names = list(config.class_names)
    return names if len(names) == config.num_classes else [str(k) for k in range(config.num_classes)]


def class_choices(config: RunConfig) -> list[str]:
    """The class menu: every class, each class by name, and none where the model trained a null class."""
    if not config.data.conditional:
        return [UNCONDITIONAL]
    return [EVERY_CLASS, *class_names(config)] + ([UNCONDITIONAL] if config.data.label_dropout > 0 else [])


def guidance_allowed(config: RunConfig) -> bool:
    """Classifier-free guidance needs a conditional model that trained its null class."""
    return config.data.conditional and config.data.label_dropout > 0


def labels_for(config: RunConfig, choice, n: int) -> torch.Tensor | None:
    """The labels of n images for a class menu choice (a name, or a class number)."""
    if choice == UNCONDITIONAL:
        if config.data.conditional and config.data.label_dropout <= 0:
            raise DdpmkitError("this run never trained its null class (label dropout 0): choose a class")
        return None
    if not config.data.conditional:
        raise DdpmkitError(f"this run is unconditional: its only class choice is {UNCONDITIONAL!r}")
    if choice == EVERY_CLASS:
        return default_labels(config, n, None)
    names = class_names(config)
    if choice in names:
        return default_labels(config, n, names.index(choice))
    if isinstance(choice, str) and choice.isdigit() and int(choice) < config.num_classes:
        return default_labels(config, n, int(choice))
    raise DdpmkitError(f"unknown class {choice!r}; this run's classes are {either(names)}")


# ---- requests -----------------------------------------------------------------------------------


def generate_request(
    run: ServedRun,
    class_choice,
    guidance,
    sampler,
    steps,
    spacing,
    seed,
    n,
    options: dict | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Request:
    """The Generate tab's inputs as a Request, or DdpmkitError saying what is wrong with them."""
    n, seed, labels, guidance = _common(run, class_choice, guidance, seed, n, limits)
    return Request(n, seed, labels, sample_settings(run, sampler, steps, spacing, guidance, options or {}))


def compare_requests(
    run: ServedRun, class_choice, guidance, seed, n, rows, limits: Limits = DEFAULT_LIMITS
) -> list[Request]:
    """One Request per chosen row (use, sampler, steps, spacing) of the Compare tab: the same seed,
    class and guidance through two to four sampler settings (the run's defaults for their options)."""
    chosen = [row[1:] for row in rows if row[0]]
    if not COMPARE_MIN <= len(chosen) <= COMPARE_MAX:
        raise DdpmkitError(f"choose {COMPARE_MIN} to {COMPARE_MAX} settings to compare, got {len(chosen)}")
    n, seed, labels, guidance = _common(run, class_choice, guidance, seed, n, limits)
    return [
        Request(n, seed, labels, sample_settings(run, sampler, steps, spacing, guidance, {}))
        for sampler, steps, spacing in chosen
    ]


def _common(run: ServedRun, class_choice, guidance, seed, n, limits: Limits):
    """(n, seed, labels, guidance), checked: what every request of a tab shares."""
    n = integer(n, "the number of images")
    if not 1 <= n <= limits.max_images:
        raise DdpmkitError(f"the number of images must be 1 to {limits.max_images} on this server, got {n}")
    seed = integer(seed, "the seed")
    if not 0 <= seed <= limits.max_seed:
        raise DdpmkitError(f"the seed must be 0 to {limits.max_seed}, got {seed}")
    guidance = number(guidance, "guidance")
    labels = labels_for(run.config, class_choice, n)
    if guidance != 1.0:
        if labels is None:
            raise DdpmkitError("guidance steers towards a class: choose one (or every class), or set guidance to 1")
        check_guidance(run.config, guidance)
    return n, seed, labels, guidance


def sample_settings(run: ServedRun, sampler, steps, spacing, guidance: float, options: dict) -> SampleConfig:
    """The run's sampling defaults with the page's values; each sampler option keeps the type of its field."""
    values = {
        "sampler": sampler,
        "steps": integer(steps, "the number of steps"),
        "spacing": spacing,
        "guidance": guidance,
    }
    defaults = run.config.sample
    for name, value in options.items():
        if name not in option_names():
            raise DdpmkitError(f"unknown sampler option {name!r}; the options are {either(option_names())}")
        if value is not None and value != "":  # an empty field keeps the run's default
            values[name] = _typed(value, option_type(name)[0], name)
    settings = dataclasses.replace(defaults, **values)
    check_sample(settings, run.T)
    return settings


# ---- values from a form ------------------------------------------------------------------------


def integer(value, what: str) -> int:
    """A whole number (an integral float such as 15.0 too), or DdpmkitError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DdpmkitError(f"{what} must be a whole number, got {value!r}")
    if value != int(value):
        raise DdpmkitError(f"{what} must be a whole number, got {value}")
    return int(value)


def number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DdpmkitError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _typed(value, kind: type, name: str):
    """`value` as the option's type (the page's numbers arrive as floats; 3.0 is the whole number 3)."""
    if kind is bool:
        if not isinstance(value, bool):
            raise DdpmkitError(f"{name} must be true or false, got {value!r}")
        return value
    if kind is int:
        return integer(value, name)
    if kind is float:
        return number(value, name)
    return kind(value)
