"""The run directory: config.json, checkpoints, metrics, pictures. Atomic writes; never clobbers.

    RUN/config.json                   the RunConfig (JSON)
    RUN/metrics.jsonl                 one JSON object per logged step
    RUN/ckpt-00001000/                one complete checkpoint, renamed into place when complete:
        ema.safetensors               EMA weights (used for sampling)
        model.safetensors             raw weights
        train_state.pt                optimizer state and RNG states (tensors only; weights_only load)
        state.json                    step, epoch position, format version
    RUN/samples/step-00001000.png     sample grids; RUN/loss.png the loss curve
    RUN/.tmp-ckpt-*/                  a checkpoint being written or deleted; never read, and
                                      removed by tidy() when a killed run is resumed

Weights are only ever read through safetensors and configs as JSON; the optimizer state goes
through `torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ddpmkit.errors import DdpmkitError
from ddpmkit.fileio import atomic_write_text
from ddpmkit.run.config import RunConfig

FORMAT_VERSION = 2
# format 1: before the linear schedule was scaled by 1000 / T; same files, so read unless that changed its maths
READABLE_FORMATS = (1, 2)
CKPT_PREFIX = "ckpt-"
TEMP_PREFIX = ".tmp-ckpt-"  # checkpoints being written or deleted; never read, removed by tidy()
_UMASK = os.umask(0)  # read once, so that checkpoint directories get the usual permissions
os.umask(_UMASK)


# ---- the run directory -----------------------------------------------------------------------


def is_run(run_dir: Path) -> bool:
    return (Path(run_dir) / "config.json").is_file()


def create_run(run_dir: Path, config: RunConfig) -> Path:
    """Make a new run directory; refuse if it already holds anything (nothing is modified)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise DdpmkitError(f"{run_dir} exists and is not a directory")
    # a create_run killed mid-write leaves only a temp file of config.json: still an empty directory
    if run_dir.exists() and any(not p.name.startswith(".config.json.") for p in run_dir.iterdir()):
        what = "a run" if is_run(run_dir) else "files"
        raise DdpmkitError(
            f"{run_dir} already holds {what}; add --resume to continue it, or choose a new --out directory"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", config.to_json())
    except OSError as e:
        raise DdpmkitError(f"cannot create run directory {run_dir}: {e.strerror or e}") from e
    return run_dir


def load_config(run_dir: Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not is_run(run_dir):
        raise DdpmkitError(
            f"{run_dir} is not a ddpmkit run directory (no config.json); train one with `ddpmkit train --out DIR`"
        )
    try:
        return RunConfig.from_json((run_dir / "config.json").read_text())
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise DdpmkitError(f"{run_dir / 'config.json'} is not a valid ddpmkit config: {e}") from e


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (incomplete ones never get their final name)."""
    found = [
        p
        for p in Path(run_dir).glob(CKPT_PREFIX + "*")
        if p.name[len(CKPT_PREFIX) :].isdigit() and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX) :]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    train_state: dict,
    state: dict,
    keep: int = 2,
) -> Path:
    """Write a complete checkpoint into a temp directory, then rename it into place.

    A crash at any moment leaves either the previous checkpoints or the new one, never a partial
    one under a final name. Refuses NaN/inf weights. Keeps the newest `keep` checkpoints.
    """
    run_dir = Path(run_dir)
    final = run_dir / f"{CKPT_PREFIX}{step:08d}"
    for name, module in (("model", model), ("ema", ema)):
        _check_finite(module, name, step)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=run_dir))
        save_file(_state_dict(model), str(tmp / "model.safetensors"))
        save_file(_state_dict(ema), str(tmp / "ema.safetensors"))
        torch.save(train_state, tmp / "train_state.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "format": FORMAT_VERSION}))
        _fsync_dir_files(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)
        _rename_into_place(tmp, final)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise DdpmkitError(
                f"could not save a checkpoint in {run_dir}: {e.strerror or e}; the previous checkpoint is intact"
            ) from e
        raise
    for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        _remove_dir(old)
    return final


def tidy(run_dir: Path, keep: int) -> int:
    """Clear what a killed process left behind: temp checkpoint directories, temp files of atomic
    writes, and checkpoints beyond `keep` (a kill can land between a save and its pruning).
    Returns how many entries it removed."""
    run_dir = Path(run_dir)
    leftovers = [*run_dir.glob(TEMP_PREFIX + "*"), *run_dir.glob(".*.tmp"), *run_dir.glob("samples/.*.tmp")]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    extra = checkpoints(run_dir)[:-keep] if keep > 0 else []
    for old in extra:
        _remove_dir(old)
    return len(leftovers) + len(extra)


def _rename_into_place(tmp: Path, final: Path) -> None:
    """rename(tmp, final); a checkpoint already at `final` (the same step saved again) is moved
    aside first and deleted only once the new one is in place."""
    if not final.exists():
        os.rename(tmp, final)
        return
    aside = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=final.parent)) / final.name
    try:
        os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except OSError:
            os.rename(aside, final)
            raise
    finally:
        shutil.rmtree(aside.parent, ignore_errors=True)


def _remove_dir(path: Path) -> None:
    """Rename to a temp name (atomic), then delete: a kill never leaves part of a checkpoint under
    its final name. Failing to delete an old checkpoint loses nothing, so errors are ignored."""
    try:
        trash = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=path.parent))
    except OSError:
        return
    try:
        os.rename(path, trash / path.name)
    except OSError:
        pass
    shutil.rmtree(trash, ignore_errors=True)


def _state_dict(module: torch.nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _check_finite(module: torch.nn.Module, name: str, step: int) -> None:
    for key, value in module.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise DdpmkitError(f"refusing to save step {step}: {name} weight {key} holds NaN or inf")


def _fsync_dir_files(directory: Path) -> None:
    for p in directory.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights, naming any mismatch with the architecture in one sentence."""
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise DdpmkitError(f"cannot read weights {path}: {_first_line(e)}") from e
    expected = module.state_dict()
    missing, extra = [k for k in expected if k not in tensors], sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or extra or wrong:
        detail = "; ".join(
            filter(
                None,
                [
                    f"shape of {wrong[0]} is {tuple(tensors[wrong[0]].shape)}, model wants "
                    f"{tuple(expected[wrong[0]].shape)}"
                    if wrong
                    else "",
                    f"missing {', '.join(missing[:3])}" if missing else "",
                    f"unexpected {', '.join(extra[:3])}" if extra else "",
                ],
            )
        )
        raise DdpmkitError(f"weights {path} do not fit this architecture: {detail}")
    module.load_state_dict(tensors)


def load_state(ckpt: Path, config: RunConfig | None = None) -> tuple[dict, dict]:
    """(state.json, train_state) of a checkpoint; the latter through the weights-only unpickler.

    With the run's `config`, a format-1 checkpoint whose schedule has changed since is refused."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise DdpmkitError(f"cannot read {ckpt / 'state.json'}: {_first_line(e)}") from e
    version = state.get("format") if isinstance(state, dict) else None
    if version not in READABLE_FORMATS:
        raise DdpmkitError(
            f"{ckpt} has checkpoint format {version}, this ddpmkit reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}"
        )
    d = config.diffusion if config is not None else None
    if version == 1 and d is not None and d.schedule == "linear" and d.timesteps != 1000:
        raise DdpmkitError(
            f"{ckpt} was trained with the linear schedule at T = {d.timesteps} before ddpmkit scaled it "
            "by 1000 / T (its x_T kept part of the image); this ddpmkit cannot sample it faithfully: retrain it"
        )
    try:
        with warnings.catch_warnings():  # an odd pickle protocol warns on stderr before it is refused
            warnings.simplefilter("ignore")
            train_state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise DdpmkitError(
            f"refusing to load {ckpt / 'train_state.pt'}: it is not a plain tensor "
            f"file ({type(e).__name__}: {_first_line(e, 'GLOBAL')})"
        ) from e
    if not isinstance(train_state, dict):
        raise DdpmkitError(
            f"refusing to load {ckpt / 'train_state.pt'}: it holds a "
            f"{type(train_state).__name__}, not a dictionary of training state"
        )
    return state, train_state


def _first_line(error: Exception, prefer: str = "") -> str:
    """One line of an exception's message (the first containing `prefer`, if any)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in lines if prefer and prefer in line), lines[0])[:300]
