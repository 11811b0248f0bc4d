"""Folders of images: scanning, decoding (any mode, size or format Pillow reads), streaming."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpmkit.data.imagedata import DatasetInfo, ImageData, check_image_size, resize_center_crop
from ddpmkit.data.split import HOLDOUT_FRACTION, MIN_CLASS_HELD_OUT, split_indices
from ddpmkit.errors import DdpmkitError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
IN_MEMORY_MAX_BYTES = 2 * 1024**3  # load_dataset("folder") refuses more decoded pixels than this
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's decompression-bomb limit; larger images are skipped
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def fits_in_memory(dataset: FolderDataset) -> bool:
    """Whether the decoded pixels of the whole folder stay within IN_MEMORY_MAX_BYTES."""
    info = dataset.info
    return len(dataset) * info.channels * info.image_size**2 <= IN_MEMORY_MAX_BYTES


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


def open_folder_dataset(
    data_dir: str | os.PathLike,
    image_size: int | None = None,
    channels: int | None = None,
    strict: bool = False,
    split: str = "train",
) -> FolderDataset:
    """Scan a folder for the streaming path: files are decoded later, one per ``__getitem__``.

    Images sitting in first-level subfolders are labelled by folder (sorted names -> ids);
    images directly in the folder are unlabelled (-1). Hidden files and folders are ignored.
    ``split``: "train", "test" (the images held out, see data.split) or "all".
    """
    dataset, ignored, bad = _open_folder(data_dir, image_size, channels, strict)
    _report(Path(data_dir), ignored, bad)
    return _take_split(dataset, Path(data_dir), split)


def _take_split(dataset: FolderDataset, root: Path, split: str) -> FolderDataset:
    """The images of one split (data.split: by a hash of each path relative to the folder)."""
    relative = [Path(f).relative_to(root).as_posix() for f in dataset.files]
    keep = split_indices(relative, dataset.labels, split)
    if not keep:
        raise DdpmkitError(
            f"{root} holds out no images: a class needs at least {MIN_CLASS_HELD_OUT} images "
            f"for {HOLDOUT_FRACTION:.0%} of it to be held out as the test split."
        )
    files, labels = [dataset.files[i] for i in keep], [dataset.labels[i] for i in keep]
    return FolderDataset(files, labels, dataset.info, dataset.strict)


def _open_folder(data_dir, image_size, channels, strict) -> tuple[FolderDataset, list[str], list[str]]:
    """Scan and probe headers; returns the dataset, the ignored files and the unreadable images (with why)."""
    check_image_size(image_size)
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
    paths = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    images = [p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES]
    ignored = [str(p.relative_to(root)) for p in paths if p.suffix.lower() not in IMAGE_SUFFIXES]
    depth = [len(p.relative_to(root).parts) for p in images]
    if all(d == 1 for d in depth):
        return images, [-1] * len(images), (), ignored
    if any(d == 1 for d in depth):
        raise DdpmkitError(
            f"{root} mixes images at its top level with images in class subfolders; "
            "move the top-level images into a subfolder (or all out of them)."
        )
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
    raise DdpmkitError(
        f"Images under {root} differ in size or are not square (e.g. {examples}); "
        "set image_size to resize and center-crop them."
    )


def _first_few(items: list[str]) -> str:
    """The first five items, and how many more there are."""
    return "; ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def _refuse_if_strict(root: Path, bad: list[str], strict: bool) -> None:
    """In strict mode any unreadable image is an error listing the first few."""
    if strict and bad:
        raise DdpmkitError(
            f"{len(bad)} unreadable image(s) under {root} (strict mode): {_first_few(bad)}; fix or remove them."
        )


def _report(root: Path, ignored: list[str], bad: list[str]) -> None:
    """Warn about skipped images and ignored non-image files: the count and the first few names."""
    if bad:
        warnings.warn(f"Skipped {len(bad)} unreadable image(s) under {root}: {_first_few(bad)}.", stacklevel=3)
    if ignored:
        warnings.warn(
            f"Ignored {len(ignored)} file(s) without an image extension under {root}: {_first_few(ignored)}.",
            stacklevel=3,
        )


def load_folder(data_dir, split: str, image_size, channels, strict: bool) -> ImageData:
    """Decode one split of a whole (small) folder into memory, skipping and reporting unreadable images."""
    dataset, ignored, bad = _open_folder(data_dir, image_size, channels, strict)
    root, info = Path(data_dir), dataset.info
    dataset = _take_split(dataset, root, split)
    if not fits_in_memory(dataset):
        raise DdpmkitError(
            f"{len(dataset)} images of {info.channels}x{info.image_size}x{info.image_size} exceed "
            f"{IN_MEMORY_MAX_BYTES >> 30} GiB in memory; use open_folder_dataset() to stream them."
        )
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
