"""The named datasets (MNIST, Fashion-MNIST, CIFAR-10) and "folder": a registry and `load_dataset`.

Everything loads into :class:`ImageData` (uint8 ``[N, C, H, W]`` in memory plus labels). Named
datasets are looked up, in order, in ``data_dir``, in ``$DDPMKIT_DATA_DIR``, in the Debian location
``/usr/share/datasets/<name>`` and in the user cache, and are downloaded into the cache (SHA-256
verified) as a last resort.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from ddpmkit.data.cifar import CIFAR10, load_cifar10
from ddpmkit.data.download import find_dataset_files
from ddpmkit.data.folder import WHITE, load_folder
from ddpmkit.data.idx import read_idx
from ddpmkit.data.imagedata import DatasetInfo, ImageData, check_image_size, resize_center_crop
from ddpmkit.data.split import FOLDER_SPLITS
from ddpmkit.errors import DdpmkitError

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# The fixed datasets; "folder" is None because its info is computed from the folder it loads.
DATASETS: dict[str, DatasetInfo | None] = {
    "mnist": DatasetInfo("mnist", 1, 28, 10, tuple(str(digit) for digit in range(10))),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10, FASHION_CLASSES),
    "cifar10": CIFAR10,
    "folder": None,
}

DEBIAN_DATA_ROOT = Path("/usr/share/datasets")
# Base URLs, tried in order; the file name is appended.
MIRRORS: dict[str, list[str]] = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
}
# SHA-256 of the canonical archives (their MD5s are the ones torchvision checks).
SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    "cifar10": {"cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"},
}


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    download: bool = True,
    *,
    channels: int | None = None,
    strict: bool = False,
    progress: bool = True,
    fit: str = "crop",
    background: tuple[int, int, int] = WHITE,
) -> ImageData:
    """Load a dataset into memory as uint8 images and long labels.

    ``split``: "train" or "test"; for "folder", the test split is the 10% held out by a hash of
    each path (data.split) and "all" is both.
    ``data_dir``: for named datasets the directory holding the files (itself or
    ``data_dir/<name>``); when given, nothing else is searched. Required for "folder".
    ``image_size``: resize (shorter side, bicubic) and center-crop to this size.
    ``download``: fetch missing files of named datasets into the user cache (SHA-256 checked).
    ``channels``: 1 or 3 for "folder" (default: 1 only when every image is grayscale).
    ``strict``: for "folder", refuse unreadable images instead of skipping them.
    ``fit``, ``background``: for "folder", how other shapes become square ("crop" or "pad") and the
    colour under transparent pixels (see ``ddpmkit.data.folder``).
    """
    if name not in DATASETS:
        raise DdpmkitError(f"Unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}.")
    if split not in (FOLDER_SPLITS if name == "folder" else ("train", "test")):
        choices = "'train', 'test' or 'all'" if name == "folder" else "'train' or 'test'"
        raise DdpmkitError(f"Unknown split {split!r} for {name}; choose {choices}.")
    check_image_size(image_size)
    if name == "folder":
        return load_folder(data_dir, split, image_size, channels, strict, fit=fit, background=background)
    if channels not in (None, DATASETS[name].channels):
        raise DdpmkitError(f"{name} has {DATASETS[name].channels} channel(s); leave channels unset for it.")
    paths = _locate(name, split, data_dir, download, progress)
    data = load_cifar10(split, paths) if name == "cifar10" else _load_idx_dataset(name, split, paths)
    if image_size is None or image_size == data.info.image_size:
        return data
    info = dataclasses.replace(data.info, image_size=image_size)
    return ImageData(resize_center_crop(data.images, image_size), data.labels, info)


# ---------------------------------------------------------------- finding and fetching files


def _required_files(name: str, split: str) -> list[tuple[str, ...]]:
    """For each file the split needs: the names it may have, the downloadable archive first."""
    if name == "cifar10":
        return [("cifar-10-python.tar.gz", "cifar-10-batches-py")]
    prefix = "train" if split == "train" else "t10k"
    stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    return [(f"{stem}.gz", stem) for stem in stems]


def _locate(name: str, split: str, data_dir, download: bool, progress: bool) -> list[Path]:
    """The split's files from the usual places, or fetched from the dataset's mirrors."""
    return find_dataset_files(
        name,
        _required_files(name, split),
        data_dir,
        debian_root=DEBIAN_DATA_ROOT,
        mirrors=MIRRORS[name] if download else None,
        sha256=SHA256[name],
        progress=progress,
    )


# ---------------------------------------------------------------- MNIST and Fashion-MNIST


def _load_idx_dataset(name: str, split: str, paths: list[Path]) -> ImageData:
    """Read and cross-check an images file and a labels file in IDX format."""
    images_path, labels_path = paths
    images, labels = read_idx(images_path, ndim=3), read_idx(labels_path, ndim=1)
    info = DATASETS[name]
    if images.dtype != np.uint8 or images.shape[1:] != (info.image_size, info.image_size):
        raise DdpmkitError(
            f"{images_path} holds {images.dtype} images of shape {images.shape[1:]}, not "
            f"uint8 {info.image_size}x{info.image_size}; is it a {name} file?"
        )
    if labels.dtype != np.uint8 or len(labels) != len(images) or (len(labels) and labels.max() >= info.num_classes):
        raise DdpmkitError(
            f"{labels_path} does not match {images_path}: expected {len(images)} uint8 labels "
            f"below {info.num_classes}; delete the files and download them again."
        )
    return ImageData(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), info)
