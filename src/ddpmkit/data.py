"""Datasets as uint8 image tensors: MNIST, Fashion-MNIST, CIFAR-10 and folders of images.

Everything loads into :class:`ImageData` (uint8 ``[N, C, H, W]`` in memory plus labels);
:func:`to_model_range` and :func:`to_uint8` are the only conversions between those pixels
and the model's ``[-1, 1]``. Named datasets are looked up, in order, in ``data_dir``, in
``$DDPMKIT_DATA_DIR``, in the Debian location ``/usr/share/datasets/<name>`` and in the
user cache, and are downloaded into the cache (SHA-256 verified) as a last resort.
Nothing is unpickled except through an allow-list of numpy's array constructors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
import tarfile
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ddpmkit.download import find_dataset_files
from ddpmkit.errors import DdpmkitError
from ddpmkit.idx import read_idx


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: image shape and the classes."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    class_names: tuple[str, ...]


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# The fixed datasets; "folder" is None because its info is computed from the folder it loads.
DATASETS: dict[str, DatasetInfo | None] = {
    "mnist": DatasetInfo("mnist", 1, 28, 10, tuple(str(digit) for digit in range(10))),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10, FASHION_CLASSES),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, CIFAR10_CLASSES),
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

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
IN_MEMORY_MAX_BYTES = 2 * 1024**3  # load_dataset("folder") refuses more decoded pixels than this
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's decompression-bomb limit; larger images are skipped
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


@dataclass(frozen=True)
class ImageData:
    """A whole dataset in memory: uint8 ``images [N, C, H, W]``, long ``labels [N]`` (-1: unlabelled)."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.long or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be long [{len(self.images)}], "
                             f"got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.images)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float in [-1, 1]: ``x / 127.5 - 1``."""
    return images.float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] -> uint8 pixels, rounded and clamped; inverts :func:`to_model_range` exactly."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 ``[N, C, H, W]`` so the shorter side is ``size`` (bicubic, antialiased), then center-crop."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    new_h, new_w = max(size, round(h * size / min(h, w))), max(size, round(w * size / min(h, w)))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, 4096):  # chunks bound the float copy's memory
        chunk = F.interpolate(images[start:start + 4096].float(), size=(new_h, new_w),
                              mode="bicubic", antialias=True, align_corners=False)
        out[start:start + 4096] = chunk[..., top:top + size, left:left + size].round().clamp(0, 255)
    return out


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
) -> ImageData:
    """Load a dataset into memory as uint8 images and long labels.

    ``data_dir``: for named datasets the directory holding the files (itself or
    ``data_dir/<name>``); when given, nothing else is searched. Required for "folder".
    ``image_size``: resize (shorter side, bicubic) and center-crop to this size.
    ``download``: fetch missing files of named datasets into the user cache (SHA-256 checked).
    ``channels``: 1 or 3 for "folder" (default: 1 only when every image is grayscale).
    ``strict``: for "folder", refuse unreadable images instead of skipping them.
    """
    if name not in DATASETS:
        raise DdpmkitError(f"Unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}.")
    if split not in ("train", "test"):
        raise DdpmkitError(f"Unknown split {split!r}; choose 'train' or 'test'.")
    _check_image_size(image_size)
    if name == "folder":
        return _load_folder(data_dir, split, image_size, channels, strict)
    if channels not in (None, DATASETS[name].channels):
        raise DdpmkitError(f"{name} has {DATASETS[name].channels} channel(s); leave channels unset for it.")
    load = _load_cifar10 if name == "cifar10" else _load_idx_dataset
    data = load(name, split, _locate(name, split, data_dir, download, progress))
    if image_size is None or image_size == data.info.image_size:
        return data
    info = dataclasses.replace(data.info, image_size=image_size)
    return ImageData(resize_center_crop(data.images, image_size), data.labels, info)


def _check_image_size(image_size) -> None:
    """image_size is None (keep the native size) or a positive int."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise DdpmkitError(f"image_size must be a positive integer, got {image_size!r}.")


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
    return find_dataset_files(name, _required_files(name, split), data_dir, debian_root=DEBIAN_DATA_ROOT,
                              mirrors=MIRRORS[name] if download else None, sha256=SHA256[name], progress=progress)


# ---------------------------------------------------------------- MNIST and Fashion-MNIST

def _load_idx_dataset(name: str, split: str, paths: list[Path]) -> ImageData:
    """Read and cross-check an images file and a labels file in IDX format."""
    images_path, labels_path = paths
    images, labels = read_idx(images_path, ndim=3), read_idx(labels_path, ndim=1)
    info = DATASETS[name]
    if images.dtype != np.uint8 or images.shape[1:] != (info.image_size, info.image_size):
        raise DdpmkitError(f"{images_path} holds {images.dtype} images of shape {images.shape[1:]}, not "
                           f"uint8 {info.image_size}x{info.image_size}; is it a {name} file?")
    if labels.dtype != np.uint8 or len(labels) != len(images) or (len(labels) and labels.max() >= info.num_classes):
        raise DdpmkitError(f"{labels_path} does not match {images_path}: expected {len(images)} uint8 labels "
                           f"below {info.num_classes}; delete the files and download them again.")
    return ImageData(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), info)


# ---------------------------------------------------------------- CIFAR-10

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
            raise DdpmkitError(f"Refusing to unpickle {module}.{name}: a CIFAR-10 batch only needs numpy arrays, "
                               "so this file is corrupt or malicious; delete it and download it again.") from None


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
            return {Path(m.name).name: archive.extractfile(m).read() for m in archive
                    if m.isfile() and Path(m.name).name in names}
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DdpmkitError(f"{source} is not a readable tar.gz archive ({error}); "
                           "delete it and download it again.") from error


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


def _load_cifar10(name: str, split: str, paths: list[Path]) -> ImageData:
    """CIFAR-10 from ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py`` directory."""
    source = paths[0]
    wanted = _CIFAR_BATCHES[split]
    members = _read_cifar_members(source, [*wanted, "batches.meta"])
    if missing := [m for m in wanted if m not in members]:
        raise DdpmkitError(f"{source} lacks {', '.join(missing)}; delete it and download it again.")
    images, labels = zip(*(_cifar_batch(members[m], f"{source}:{m}") for m in wanted), strict=True)
    class_names = _cifar_class_names(members.get("batches.meta"), f"{source}:batches.meta")
    info = dataclasses.replace(DATASETS["cifar10"], class_names=class_names)
    return ImageData(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), info)


# ---------------------------------------------------------------- folders of images

class _BadImage(Exception):
    """An image file that cannot be used; the message says why."""


class FolderDataset(torch.utils.data.Dataset):
    """``(uint8 [C, S, S] tensor, label)`` per image, decoded on access so DataLoader workers decode in parallel.

    Make it with :func:`open_folder_dataset`. A file that stops decoding after the scan
    is replaced by the next good image (with a warning) so an epoch never dies half-way;
    with ``strict`` it raises DdpmkitError instead.
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int], info: DatasetInfo, strict: bool = False):
        self.files, self.labels, self.info, self.strict = list(files), list(labels), info, strict

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(min(len(self), 16)):
            i = (index + attempt) % len(self)
            try:
                return _decode_image(self.files[i], self.info.channels, self.info.image_size), self.labels[i]
            except _BadImage as bad:
                if self.strict:
                    raise DdpmkitError(f"Cannot read image {self.files[i]}: {bad}.") from bad
                warnings.warn(f"Skipping unreadable image {self.files[i]}: {bad}", stacklevel=2)
        raise DdpmkitError(f"Image {self.files[index]} and the images after it cannot be read; check the folder.")


def open_folder_dataset(data_dir: str | os.PathLike, image_size: int | None = None,
                        channels: int | None = None, strict: bool = False) -> FolderDataset:
    """Scan a folder for the streaming path: files are decoded later, one per ``__getitem__``.

    Images sitting in first-level subfolders are labelled by folder (sorted names -> ids);
    images directly in the folder are unlabelled (-1). Hidden files and folders are ignored.
    """
    dataset, ignored, bad = _open_folder(data_dir, image_size, channels, strict)
    _report(Path(data_dir), ignored, bad)
    return dataset


def _open_folder(data_dir, image_size, channels, strict) -> tuple[FolderDataset, list[str], list[str]]:
    """Scan and probe headers; returns the dataset, the ignored files and the unreadable images (with why)."""
    _check_image_size(image_size)
    if data_dir is None or not Path(data_dir).is_dir():
        raise DdpmkitError(f"The folder dataset needs data_dir set to a directory of images, got {data_dir!r}.")
    root = Path(data_dir)
    files, labels, class_names, ignored = _scan_folder(root)
    good, bad = [], []
    for path, label in zip(files, labels, strict=True):
        try:
            good.append((path, label, *_probe_image(path)))
        except _BadImage as error:
            bad.append(f"{path.relative_to(root)} ({error})")
    _refuse_if_strict(root, bad, strict)
    if not good:
        _report(root, ignored, bad)
        raise DdpmkitError(f"No readable images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}.")
    channels = _choose_channels(channels, [gray for *_, gray, _ in good])
    image_size = image_size or _common_size(root, [size for *_, size in good])
    info = DatasetInfo("folder", channels, image_size, len(class_names), class_names)
    return FolderDataset([str(g[0]) for g in good], [g[1] for g in good], info, strict), ignored, bad


def _scan_folder(root: Path) -> tuple[list[Path], list[int], tuple[str, ...], list[str]]:
    """Image files (sorted), their labels, the class names, and the non-image files found."""
    paths = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    images = [p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES]
    ignored = [str(p.relative_to(root)) for p in paths if p.suffix.lower() not in IMAGE_SUFFIXES]
    depth = [len(p.relative_to(root).parts) for p in images]
    if all(d == 1 for d in depth):
        return images, [-1] * len(images), (), ignored
    if any(d == 1 for d in depth):
        raise DdpmkitError(f"{root} mixes images at its top level with images in class subfolders; "
                           "move the top-level images into a subfolder (or all out of them).")
    class_names = tuple(sorted({p.relative_to(root).parts[0] for p in images}))
    ids = {class_name: i for i, class_name in enumerate(class_names)}
    return images, [ids[p.relative_to(root).parts[0]] for p in images], class_names, ignored


@contextlib.contextmanager
def _open_image(path: str | Path):
    """Open an image whose header size is sane; every failure, now or while decoding, becomes _BadImage."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS or width == 0 or height == 0:
                raise _BadImage(f"unusable size {width}x{height}")
            yield image
    except _BadImage:
        raise
    except Exception as error:  # Pillow's plugins raise many exception types on corrupt files
        raise _BadImage(f"{type(error).__name__}: {error}") from error


def _probe_image(path: Path) -> tuple[bool, tuple[int, int]]:
    """Whether an image is grayscale (gray palettes count), and its size, from the header alone."""
    with _open_image(path) as image:
        if image.mode == "P" and image.palette is not None and image.palette.mode == "RGB":
            rgb = np.frombuffer(image.palette.palette, np.uint8)
            rgb = rgb[: len(rgb) // 3 * 3].reshape(-1, 3)
            return bool((rgb == rgb[:, :1]).all()), image.size
        return image.mode in _GRAY_MODES, image.size


def _decode_image(path: str, channels: int, size: int) -> torch.Tensor:
    """Decode one image file to uint8 ``[channels, size, size]``; transparent pixels become white."""
    with _open_image(path) as image:
        if image.mode.startswith("I"):  # 16-bit grayscale: scale to 8 bits instead of clipping
            image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
        if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    pixels = torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1).copy()).permute(2, 0, 1)
    return resize_center_crop(pixels.unsqueeze(0), size)[0]


def _choose_channels(channels: int | None, grays: list[bool]) -> int:
    """1 or 3 as asked; by default 1 only when every image is grayscale."""
    if channels is None:
        return 1 if all(grays) else 3
    if channels not in (1, 3):
        raise DdpmkitError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.")
    return channels


def _common_size(root: Path, sizes: list[tuple[int, int]]) -> int:
    """The image size when every image is the same square size; otherwise image_size is required."""
    if len(set(sizes)) == 1 and sizes[0][0] == sizes[0][1]:
        return sizes[0][0]
    examples = " and ".join(f"{w}x{h}" for w, h in sorted(set(sizes))[:2])
    raise DdpmkitError(f"Images under {root} differ in size or are not square (e.g. {examples}); "
                       "set image_size to resize and center-crop them.")


def _first_few(items: list[str]) -> str:
    """The first five items, and how many more there are."""
    return "; ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def _refuse_if_strict(root: Path, bad: list[str], strict: bool) -> None:
    """In strict mode any unreadable image is an error listing the first few."""
    if strict and bad:
        raise DdpmkitError(f"{len(bad)} unreadable image(s) under {root} (strict mode): {_first_few(bad)}; "
                           "fix or remove them.")


def _report(root: Path, ignored: list[str], bad: list[str]) -> None:
    """Warn about skipped images and ignored non-image files: the count and the first few names."""
    if bad:
        warnings.warn(f"Skipped {len(bad)} unreadable image(s) under {root}: {_first_few(bad)}.", stacklevel=3)
    if ignored:
        warnings.warn(f"Ignored {len(ignored)} file(s) without an image extension under {root}: "
                      f"{_first_few(ignored)}.", stacklevel=3)


def _load_folder(data_dir, split: str, image_size, channels, strict: bool) -> ImageData:
    """Decode a whole (small) folder into memory, skipping and reporting unreadable images."""
    if split != "train":
        raise DdpmkitError("An image folder has only a train split; use split='train' "
                           "(to hold images out, keep them in a separate folder).")
    dataset, ignored, bad = _open_folder(data_dir, image_size, channels, strict)
    root, info = Path(data_dir), dataset.info
    if len(dataset) * info.channels * info.image_size**2 > IN_MEMORY_MAX_BYTES:
        raise DdpmkitError(f"{len(dataset)} images of {info.channels}x{info.image_size}x{info.image_size} exceed "
                           f"{IN_MEMORY_MAX_BYTES >> 30} GiB in memory; use open_folder_dataset() to stream them.")
    images, labels = [], []
    for path, label in zip(dataset.files, dataset.labels, strict=True):
        try:
            images.append(_decode_image(path, info.channels, info.image_size))
            labels.append(label)
        except _BadImage as error:
            bad.append(f"{Path(path).relative_to(root)} ({error})")
    _refuse_if_strict(root, bad, strict)
    _report(root, ignored, bad)
    if not images:
        raise DdpmkitError(f"None of the images under {root} could be decoded.")
    return ImageData(torch.stack(images), torch.tensor(labels, dtype=torch.long), info)
