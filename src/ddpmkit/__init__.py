"""ddpmkit: denoising diffusion models you can read, train, sample and evaluate.

The package is layered; each folder imports only the ones above it in this list:

    errors, fileio, progress   foundations (no ddpmkit imports)
    core/      the mathematics: schedules, diffusion, denoiser, samplers, losses, likelihood,
               distillation
    models/    the networks
    data/      pixels in, uint8 tensors out
    viz        pictures (grids, GIFs, figures)
    run/       a run: config, presets, build, checkpoint, load, sampling
    train/     the Trainer, DDP, streaming
    eval/      metrics, domain classifier, Inception, reports
    cli        the command line (and the compatibility modules `sampling`, `denoiser`)

The most used names are importable from here, lazily: `from ddpmkit import samplers, schedules`.
"""

import importlib

__version__ = "0.1.0"

# name -> where it lives; imported on first use, so `import ddpmkit` stays light
_PUBLIC = {
    "schedules": "ddpmkit.core.schedules",
    "diffusion": "ddpmkit.core.diffusion",
    "samplers": "ddpmkit.core.samplers",
    "losses": "ddpmkit.core.losses",
    "likelihood": "ddpmkit.core.likelihood",
    "Denoiser": "ddpmkit.core.denoiser",
    "build_model": "ddpmkit.models",
    "load_denoiser": "ddpmkit.run.load",
    "generate": "ddpmkit.run.sampling",
    "RunConfig": "ddpmkit.run.config",
    "Trainer": "ddpmkit.train.trainer",
}


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ddpmkit' has no attribute {name!r}")
    module = importlib.import_module(_PUBLIC[name])
    return module if module.__name__.endswith("." + name) else getattr(module, name)


def __dir__():
    return sorted([*globals(), *_PUBLIC])
