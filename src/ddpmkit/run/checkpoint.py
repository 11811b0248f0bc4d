"""The run directory: config.json, checkpoints, metrics, pictures. Atomic writes; never clobbers.

    RUN/config.json                   the RunConfig (JSON)
    RUN/metrics.jsonl                 one JSON object per logged step
    RUN/ckpt-00001000/                one complete checkpoint, renamed into place when complete:
        ema.safetensors               EMA weights (used for sampling)
        model.safetensors             raw weights
        train_state.pt                optimizer state and RNG states (tensors only; weights_only load)
        state.json                    step, epoch position, format version
    RUN/samples/step-00001000.png     sample grids; RUN/loss.png the loss curve
    RUN/rounds/*.safetensors          a distilled run's teacher and each round's student (EMA weights)
    RUN/.tmp-ckpt-*/                  a checkpoint being written or deleted; never read, and
                                      removed by tidy() when a killed run is resumed

A run directory may come from someone else, so everything in it is read as untrusted input:
weights only through safetensors, their header checked first (run.weights); config.json and
state.json as bounded JSON, every field typed and within its limits (run.config); the optimizer
state through `torch.load(weights_only=True)`, which refuses pickled code, once its archive is
known to expand to no more than its size on disk.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from ddpmkit.errors import DdpmkitError
from ddpmkit.fileio import atomic_write, atomic_write_text
from ddpmkit.run import weights
from ddpmkit.run.config import RunConfig, from_dict, resolve, validate

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
    """Make a new run directory holding config.json, the config with its derived defaults resolved;
    refuse if the directory already holds anything (nothing is modified)."""
    run_dir = check_new_run(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", resolve(config).to_json())
    except OSError as e:
        raise DdpmkitError(f"cannot create run directory {run_dir}: {e.strerror or e}") from e
    return run_dir


def check_new_run(run_dir: Path) -> Path:
    """Refuse a run directory that exists with anything in it (create_run's check, to make early)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise DdpmkitError(f"{run_dir} exists and is not a directory")
    # a create_run killed mid-write leaves only a temp file of config.json: still an empty directory
    if run_dir.exists() and any(not p.name.startswith(".config.json.") for p in run_dir.iterdir()):
        what = "a run" if is_run(run_dir) else "files"
        raise DdpmkitError(
            f"{run_dir} already holds {what}; add --resume to continue it, or choose a new --out directory"
        )
    return run_dir


def load_config(run_dir: Path) -> RunConfig:
    """The run's config.json, read as untrusted input: bounded JSON (read_json), typed fields and
    every limit of run.config.validate checked, before anything is built from it."""
    run_dir = Path(run_dir)
    if not is_run(run_dir):
        raise DdpmkitError(
            f"{run_dir} is not a ddpmkit run directory (no config.json); train one with `ddpmkit train --out DIR`"
        )
    path = run_dir / "config.json"
    refusal = f"{path} is not a valid ddpmkit config"
    data = read_json(path, refusal)
    if isinstance(data, dict) and isinstance(data.get("data"), dict):
        # runs saved before --class-balance existed drew plain epochs: keep them so (a resume stays
        # bit-identical), rather than derive today's default for them
        data["data"].setdefault("class_balance", 0.0)
    try:
        config = resolve(from_dict(RunConfig, data))
        validate(config)
    except DdpmkitError as e:
        raise DdpmkitError(f"{refusal}: {e}") from None
    return config


# ---- small JSON files, read within bounds ----------------------------------------------------------

MAX_JSON_BYTES = 1 << 20  # config.json is ~2 KB and state.json ~100 bytes: 1 MiB is hundreds of times that
MAX_JSON_DEPTH = 8  # config.json nests 3 deep (a section, a list), state.json 1


def read_json(path: Path, refusal: str):
    """A small JSON file of the run directory, within bounds: at most MAX_JSON_BYTES (a larger file
    is not read), nested at most MAX_JSON_DEPTH deep, finite numbers only (no NaN, Infinity or
    1e999). Anything else raises DdpmkitError(f"{refusal}: why")."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise DdpmkitError(f"{refusal}: {e.strerror or e}") from e
    if len(raw) > MAX_JSON_BYTES:
        raise DdpmkitError(f"{refusal}: it is larger than {MAX_JSON_BYTES:,} bytes")
    try:
        value = json.loads(raw, parse_constant=_not_finite, parse_float=_finite)
    except RecursionError:
        raise DdpmkitError(f"{refusal}: it is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError included
        raise DdpmkitError(f"{refusal}: {_first_line(e)}") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise DdpmkitError(f"{refusal}: it is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _not_finite(name: str):
    raise ValueError(f"{name} is not a finite number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is not a finite number")
    return value


def _depth(value) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iteratively: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


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
        _check_finite(module, f"step {step}: {name}")
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
    leftovers = [
        *run_dir.glob(TEMP_PREFIX + "*"),
        *run_dir.glob(".*.tmp"),
        *run_dir.glob("samples/.*.tmp"),
        *run_dir.glob("rounds/.*.tmp"),
    ]
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


def _check_finite(module: torch.nn.Module, what: str) -> None:
    for key, value in module.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise DdpmkitError(f"refusing to save {what} weight {key} holds NaN or inf")


def _fsync_dir_files(directory: Path) -> None:
    for p in directory.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def load_weights(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Load safetensors weights into `module` once its header fits (run.weights.load)."""
    return weights.load(module, path)


# state.json: what each key may hold (step counts; the global batch is compared, never allocated)
STATE_LIMITS = {
    "format": (min(READABLE_FORMATS), max(READABLE_FORMATS)),
    "step": (0, 10**12),
    "nan_skipped": (0, 10**12),
    "global_batch": (1, 2**40),
}


def read_state(ckpt: Path, config: RunConfig | None = None) -> dict:
    """A checkpoint's state.json (read_json), its format version and each key's type and range checked."""
    path = Path(ckpt) / "state.json"
    refusal = f"cannot read {path}"
    state = read_json(path, refusal)
    version = state.get("format") if isinstance(state, dict) else None
    if version not in READABLE_FORMATS:
        readable = ", ".join(map(str, READABLE_FORMATS))
        raise DdpmkitError(f"{ckpt} has checkpoint format {version}, this ddpmkit reads formats {readable}")
    d = config.diffusion if config is not None else None
    if version == 1 and d is not None and d.schedule == "linear" and d.timesteps != 1000:
        raise DdpmkitError(
            f"{ckpt} was trained with the linear schedule at T = {d.timesteps} before ddpmkit scaled it "
            "by 1000 / T (its x_T kept part of the image); this ddpmkit cannot sample it faithfully: retrain it"
        )
    for key, value in state.items():
        if key not in STATE_LIMITS:
            raise DdpmkitError(f"{refusal}: unknown key {key[:40]!r}")
        low, high = STATE_LIMITS[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
            raise DdpmkitError(f"{refusal}: {key} must be an integer from {low} to {high:,}, got {repr(value)[:40]}")
    if "step" not in state:
        raise DdpmkitError(f"{refusal}: it has no step")
    return state


def load_train_state(ckpt: Path) -> dict:
    """train_state.pt through the weights-only unpickler, once its archive is known not to expand
    beyond its size on disk (torch.load inflates a compressed entry before checking it)."""
    path = Path(ckpt) / "train_state.pt"
    check_archive(path)
    try:
        with warnings.catch_warnings():  # an odd pickle protocol warns on stderr before it is refused
            warnings.simplefilter("ignore")
            train_state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DdpmkitError(
            f"refusing to load {path}: it is not a plain tensor file ({type(e).__name__}: {_first_line(e, 'GLOBAL')})"
        ) from e
    if not isinstance(train_state, dict):
        raise DdpmkitError(
            f"refusing to load {path}: it holds a {type(train_state).__name__}, not a dictionary of training state"
        )
    return train_state


def check_archive(path: Path) -> None:
    """torch.save writes a zip of uncompressed entries: refuse any other file, a compressed entry,
    or entries whose sizes add up to more than the file (so nothing is allocated beyond it)."""
    refusal = f"refusing to load {path}: it is not a plain tensor file"
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
        raise DdpmkitError(f"{refusal} (not a zip archive of tensors: {_first_line(e)})") from e
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise DdpmkitError(f"{refusal} (its entry {packed[0][:80]} is compressed)")
    total = sum(e.file_size for e in entries)
    if total > size:
        raise DdpmkitError(f"{refusal} (its entries claim {total:,} bytes, the file has {size:,})")


def save_weights(path: Path, module: torch.nn.Module, metadata: dict | None = None) -> None:
    """One module's weights as a safetensors file, written atomically; NaN/inf weights refused."""
    _check_finite(module, f"{path}:")
    try:
        data = save(_state_dict(module), metadata={k: str(v) for k, v in (metadata or {}).items()})
        atomic_write(path, data)
    except OSError as e:
        raise DdpmkitError(f"could not write {path}: {e.strerror or e}") from e


def load_state(ckpt: Path, config: RunConfig | None = None) -> tuple[dict, dict]:
    """(state.json, train_state) of a checkpoint; the latter through the weights-only unpickler.
    With the run's `config`, a format-1 checkpoint whose schedule has changed since is refused."""
    state = read_state(ckpt, config)
    return state, load_train_state(ckpt)


def _first_line(error: Exception, prefer: str = "") -> str:
    """One line of an exception's message (the first containing `prefer`, if any)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in lines if prefer and prefer in line), lines[0])[:300]
