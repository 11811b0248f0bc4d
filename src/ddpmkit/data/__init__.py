"""Pixels in, uint8 tensors out: the named datasets, image folders, IDX files and downloads.

datasets    the registry of named datasets and `load_dataset` (mirrors, checksums, the Debian path)
imagedata   ImageData / DatasetInfo: a dataset in memory, and resizing
folder      folders of images: scan, decode, stream
split       a folder's held-out test split, chosen by a hash of each path
cifar       CIFAR-10's pickles through a numpy-only unpickler
idx         the IDX format of MNIST and Fashion-MNIST
download    finding dataset files; resumable, checksummed downloads
"""

from ddpmkit.core.pixels import to_model_range, to_uint8
from ddpmkit.data.cifar import CIFAR10_CLASSES, safe_unpickle
from ddpmkit.data.datasets import DATASETS, FASHION_CLASSES, load_dataset
from ddpmkit.data.folder import FITS, IN_MEMORY_MAX_BYTES, FolderDataset, open_folder_dataset
from ddpmkit.data.imagedata import DatasetInfo, ImageData, resize_center_crop

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "FITS",
    "FASHION_CLASSES",
    "IN_MEMORY_MAX_BYTES",
    "DatasetInfo",
    "FolderDataset",
    "ImageData",
    "load_dataset",
    "open_folder_dataset",
    "resize_center_crop",
    "safe_unpickle",
    "to_model_range",
    "to_uint8",
]
