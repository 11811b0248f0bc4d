"""CIFAR-10 from its python pickles, unpickled through an allow-list of numpy's array constructors."""

from __future__ import annotations

import dataclasses
import io
import pickle
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ddpmkit.data.imagedata import DatasetInfo, ImageData
from ddpmkit.errors import DdpmkitError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10 = DatasetInfo("cifar10", 3, 32, 10, CIFAR10_CLASSES)

_CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array-rebuilding function, wherever numpy keeps it
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # the name the original (Python 2) files use
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # the name numpy >= 2 writes
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: any other global is refused, never imported."""

    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise DdpmkitError(
                f"Refusing to unpickle {module}.{name}: a CIFAR-10 batch only needs numpy arrays, "
                "so this file is corrupt or malicious; delete it and download it again."
            ) from None


def safe_unpickle(data: bytes, name: str):
    """Load a CIFAR-style pickle without running code from it (see :class:`_NumpyOnlyUnpickler`)."""
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DdpmkitError:
        raise
    except Exception as error:  # a corrupt pickle can fail in many ways; all mean the same to the user
        raise DdpmkitError(f"{name} is not a readable pickle ({type(error).__name__}: {error}).") from error


def _read_cifar_members(source: Path, names: Sequence[str]) -> dict[str, bytes]:
    """The named batch files, from the extracted directory or straight out of the tarball."""
    if source.is_dir():
        return {n: (source / n).read_bytes() for n in names if (source / n).is_file()}
    try:
        with tarfile.open(source, "r:gz") as archive:  # read members in one pass; nothing is extracted
            return {
                Path(m.name).name: archive.extractfile(m).read()
                for m in archive
                if m.isfile() and Path(m.name).name in names
            }
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DdpmkitError(
            f"{source} is not a readable tar.gz archive ({error}); delete it and download it again."
        ) from error


def _cifar_batch(blob: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[n, 3, 32, 32]`` and labels ``[n]`` from one unpickled batch, checked."""
    batch = safe_unpickle(blob, name)
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()} if isinstance(batch, dict) else {}
    images, labels = batch.get("data"), np.asarray(batch.get("labels", []))
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise DdpmkitError(f"{name} has no uint8 'data' array of shape [n, 3072]; is it a CIFAR-10 batch?")
    if labels.shape != images.shape[:1] or labels.dtype.kind not in "iu" or not np.all((labels >= 0) & (labels < 10)):
        raise DdpmkitError(f"{name} does not hold one label in 0..9 per image; is it a CIFAR-10 batch?")
    return images.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_class_names(blob: bytes | None, name: str) -> tuple[str, ...]:
    """Class names from batches.meta when it is present and sane, else the published list."""
    meta = safe_unpickle(blob, name) if blob is not None else None
    names = meta.get(b"label_names", meta.get("label_names")) if isinstance(meta, dict) else None
    if isinstance(names, list) and len(names) == 10 and all(isinstance(n, (bytes, str)) for n in names):
        return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)
    return CIFAR10_CLASSES


def load_cifar10(split: str, paths: list[Path]) -> ImageData:
    """CIFAR-10 from ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py`` directory."""
    source = paths[0]
    wanted = _CIFAR_BATCHES[split]
    members = _read_cifar_members(source, [*wanted, "batches.meta"])
    if missing := [m for m in wanted if m not in members]:
        raise DdpmkitError(f"{source} lacks {', '.join(missing)}; delete it and download it again.")
    images, labels = zip(*(_cifar_batch(members[m], f"{source}:{m}") for m in wanted), strict=True)
    class_names = _cifar_class_names(members.get("batches.meta"), f"{source}:batches.meta")
    info = dataclasses.replace(CIFAR10, class_names=class_names)
    return ImageData(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), info)
