"""Folders of images: scanning, decoding (any mode, size or format Pillow reads), streaming.

What a folder may hold and what becomes of it (docs/folders.md says the same for users):

- classes are the first-level subfolders (sorted names -> ids), with images at any depth below
  them; a flat folder is unlabelled. A folder without a readable image is no class (noted).
- hidden files and folders are skipped; other files without an image extension, and images that
  cannot be decoded, are skipped and noted (``strict``: an unreadable image is an error).
- symbolic links are followed; a folder reached a second time (a link loop, or two links to one
  folder) is read once, and noted.
- every image becomes 8-bit grayscale or RGB: EXIF rotation applied, 16-bit scaled to 8 bits,
  palettes expanded, transparency composited on ``background``. The folder is grayscale only when
  every image is.
- ``fit`` makes any shape square: "crop" resizes the shorter side to image_size and centre-crops
  (torchvision's Resize + CenterCrop, as the reference implementations load folders); "pad" resizes
  the longer side and letterboxes on ``background``.

Whatever is skipped is told to the user through ``ddpmkit.notes.note``: one plain line each.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ddpmkit.data.imagedata import DatasetInfo, ImageData, check_image_size, resize_center_crop, resize_pad
from ddpmkit.data.split import HOLDOUT_FRACTION, MIN_CLASS_HELD_OUT, split_indices
from ddpmkit.errors import DdpmkitError, either
from ddpmkit.notes import note

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
IN_MEMORY_MAX_BYTES = 2 * 1024**3  # load_dataset("folder") refuses more decoded pixels than this
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's decompression-bomb limit; larger images are skipped
WHITE = (255, 255, 255)
FITS = ("crop", "pad")  # how an image of another shape becomes image_size x image_size
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
    is replaced by the next good image (with a note) so an epoch never dies half-way;
    with ``strict`` it raises DdpmkitError instead.
    """

    def __init__(
        self,
        files: Sequence[str],
        labels: Sequence[int],
        info: DatasetInfo,
        strict: bool = False,
        fit: str = "crop",
        background: tuple[int, int, int] = WHITE,
    ):
        self.files, self.labels, self.info, self.strict = list(files), list(labels), info, strict
        self.fit, self.background = fit, tuple(background)

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, i: int) -> torch.Tensor:
        """Image i as uint8 ``[C, S, S]``; raises _BadImage when it cannot be read."""
        return _decode_image(self.files[i], self.info.channels, self.info.image_size, self.fit, self.background)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(min(len(self), 16)):
            i = (index + attempt) % len(self)
            try:
                return self.decode(i), self.labels[i]
            except _BadImage as bad:
                if self.strict:
                    raise DdpmkitError(f"Cannot read image {self.files[i]}: {bad}.") from bad
                note(f"Skipping unreadable image {self.files[i]}: {bad}")
        raise DdpmkitError(f"Image {self.files[index]} and the images after it cannot be read; check the folder.")


def open_folder_dataset(
    data_dir: str | os.PathLike,
    image_size: int | None = None,
    channels: int | None = None,
    strict: bool = False,
    *,
    split: str = "train",
    fit: str = "crop",
    background: tuple[int, int, int] = WHITE,
) -> FolderDataset:
    """Scan a folder for the streaming path: files are decoded later, one per ``__getitem__``.

    Images sitting in first-level subfolders are labelled by folder (sorted names -> ids);
    images directly in the folder are unlabelled (-1). Hidden files and folders are ignored.
    What is skipped is noted (``ddpmkit.notes``), one line per kind. ``split``: "train", "test" (the
    images held out, see data.split) or "all".
    """
    _check_options(fit, background)
    check_image_size(image_size)
    if data_dir is None or not Path(data_dir).is_dir():
        raise DdpmkitError(f"The folder dataset needs data_dir set to a directory of images, got {data_dir!r}.")
    root = Path(data_dir)
    images, ignored, unread, top_folders = _scan_folder(root)
    good, bad = [], []
    for path in images:
        try:
            good.append((path, *_probe_image(path)))
        except _BadImage as error:
            bad.append(f"{path.relative_to(root)} ({error})")
    if strict and bad:
        raise DdpmkitError(
            f"{len(bad)} unreadable image(s) under {root} (strict mode): {_first_few(bad)}; fix or remove them."
        )
    _note(f"Skipped {len(bad)} unreadable image(s) under {root}", bad)
    _note(f"Ignored {len(ignored)} file(s) without an image extension under {root}", ignored)
    _note(f"Did not read {len(unread)} item(s) under {root}", unread)
    if not good:
        raise DdpmkitError(f"No readable images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}.")
    paths = [path for path, *_ in good]
    labels, class_names = _classes(root, paths, top_folders)
    channels = _choose_channels(channels, [gray for _, gray, _ in good])
    image_size = image_size or _common_size(root, [size for *_, size in good])
    info = DatasetInfo("folder", channels, image_size, len(class_names), class_names)
    return _take_split(FolderDataset([str(p) for p in paths], labels, info, strict, fit, background), root, split)


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
    return FolderDataset(files, labels, dataset.info, dataset.strict, dataset.fit, dataset.background)


def _check_options(fit: str, background) -> None:
    if fit not in FITS:
        raise DdpmkitError(f"fit must be {either(FITS)}, got {fit!r}.")
    ok = len(tuple(background)) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in background)
    if not ok:
        raise DdpmkitError(f"background must be three integers (R, G, B) in 0..255, got {background!r}.")


# ---------------------------------------------------------------- scanning


def _walk(root: Path) -> tuple[list[Path], list[str], list[str]]:
    """The visible files under root (symbolic links followed), sorted; the first-level folders; and
    what could not be read: folders reached a second time (link loops), broken links, errors."""
    files, top_folders, unread, seen = [], [], [], set()
    stack = [root]
    while stack:
        folder = stack.pop()
        where = str(folder.relative_to(root))
        try:
            stat = folder.stat()
            if (stat.st_dev, stat.st_ino) in seen:
                unread.append(f"{where} (a folder already read: a link loop or a second link to it)")
                continue
            seen.add((stat.st_dev, stat.st_ino))
            with os.scandir(folder) as entries:
                names = sorted((e.name, e) for e in entries if not e.name.startswith("."))
        except OSError as error:
            unread.append(f"{where} ({error.strerror or error})")
            continue
        subfolders = []
        for name, entry in names:
            try:
                if entry.is_dir():  # follows a link
                    subfolders.append(folder / name)
                elif entry.is_file():
                    files.append(folder / name)
                else:
                    unread.append(f"{(folder / name).relative_to(root)} (a broken link or not a regular file)")
            except OSError as error:  # e.g. a link that points at itself
                unread.append(f"{(folder / name).relative_to(root)} ({error.strerror or error})")
        if folder == root:
            top_folders = [p.name for p in subfolders]
        stack.extend(reversed(subfolders))  # depth first, in name order
    return sorted(files), top_folders, unread


def _scan_folder(root: Path) -> tuple[list[Path], list[str], list[str], list[str]]:
    """The image files (sorted), the other files, what could not be read, and the first-level folders."""
    files, top_folders, unread = _walk(root)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    ignored = [str(p.relative_to(root)) for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    depth = [len(p.relative_to(root).parts) for p in images]
    if any(d == 1 for d in depth) and any(d > 1 for d in depth):
        raise DdpmkitError(
            f"{root} mixes images at its top level with images in class subfolders; "
            "move the top-level images into a subfolder (or all out of them)."
        )
    return images, ignored, unread, top_folders


def _classes(root: Path, paths: list[Path], top_folders: list[str]) -> tuple[list[int], tuple[str, ...]]:
    """Labels and class names: first-level folders holding a readable image; a flat folder has none."""
    if all(len(p.relative_to(root).parts) == 1 for p in paths):
        class_names = ()
    else:
        class_names = tuple(sorted({p.relative_to(root).parts[0] for p in paths}))
    empty = sorted(set(top_folders) - set(class_names))
    if class_names:
        _note(f"{len(empty)} folder(s) under {root} hold no readable image and are not classes", empty)
    ids = {name: i for i, name in enumerate(class_names)}
    labels = [ids[p.relative_to(root).parts[0]] if class_names else -1 for p in paths]
    return labels, class_names


# ---------------------------------------------------------------- reading one image


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


def _decode_image(path: str, channels: int, size: int, fit: str = "crop", background=WHITE) -> torch.Tensor:
    """Decode one image file to uint8 ``[channels, size, size]`` (see the module's docstring)."""
    with _open_image(path) as image:
        image = _flatten(_eight_bit(ImageOps.exif_transpose(image)), background)
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    pixels = torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1).copy()).permute(2, 0, 1)
    if fit == "pad":
        return resize_pad(pixels.unsqueeze(0), size, _fill(background, channels))[0]
    return resize_center_crop(pixels.unsqueeze(0), size)[0]


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grayscale scaled to 8 bits, x / 257, instead of clipped at 255."""
    if image.mode.startswith("I"):
        return Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    return image


def _flatten(image: Image.Image, background) -> Image.Image:
    """Composite transparent pixels (an alpha channel, or a palette's transparent colour) on background."""
    if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)
    return image


def _fill(background, channels: int) -> tuple[int, ...]:
    """The background colour in the output's channels (its luma, as Pillow computes L, for grayscale)."""
    if channels == 3:
        return tuple(background)
    return (Image.new("RGB", (1, 1), tuple(background)).convert("L").getpixel((0, 0)),)


# ---------------------------------------------------------------- choosing shape and channels


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
        "give an image size (image_size, --image-size) to resize them to."
    )


def _first_few(items: list[str]) -> str:
    """The first five items, and how many more there are."""
    return "; ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def _note(message: str, items: list[str]) -> None:
    """One note: the message, then the first few items; nothing when there are none."""
    if items:
        note(f"{message}: {_first_few(items)}.")


# ---------------------------------------------------------------- into memory


def load_folder(
    data_dir,
    split: str,
    image_size,
    channels,
    strict: bool,
    *,
    fit: str = "crop",
    background: tuple[int, int, int] = WHITE,
) -> ImageData:
    """Decode one split of a whole (small) folder into memory, skipping and noting unreadable images."""
    dataset = open_folder_dataset(data_dir, image_size, channels, strict, split=split, fit=fit, background=background)
    if not fits_in_memory(dataset):
        info = dataset.info
        raise DdpmkitError(
            f"{len(dataset)} images of {info.channels}x{info.image_size}x{info.image_size} exceed "
            f"{IN_MEMORY_MAX_BYTES >> 30} GiB in memory; use open_folder_dataset() to stream them."
        )
    return decode_all(dataset, Path(data_dir))


def decode_all(dataset: FolderDataset, root: Path) -> ImageData:
    """Every image of a scanned folder decoded into one uint8 tensor (filled in place: the peak memory
    is the tensor, not a list of images and a stacked copy); those that fail are skipped and noted."""
    info = dataset.info
    images = torch.empty((len(dataset), info.channels, info.image_size, info.image_size), dtype=torch.uint8)
    good, bad = [], []
    for i, path in enumerate(dataset.files):
        try:
            images[len(good)] = dataset.decode(i)
            good.append(i)
        except _BadImage as error:
            if dataset.strict:
                raise DdpmkitError(f"Cannot read image {path} (strict mode): {error}; fix or remove it.") from error
            bad.append(f"{Path(path).relative_to(root)} ({error})")
    _note(f"Skipped {len(bad)} unreadable image(s) under {root}", bad)
    if not good:
        raise DdpmkitError(f"None of the images under {root} could be decoded.")
    labels = torch.tensor([dataset.labels[i] for i in good], dtype=torch.long)
    return ImageData(images[: len(good)] if bad else images, labels, info)
