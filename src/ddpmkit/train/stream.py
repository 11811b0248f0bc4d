"""Feeding the trainer: a dataset in memory, or a folder streamed by DataLoader worker processes.

Either way the trainer asks for the same thing, this rank's slice of micro-batch k of step s's
global batch, so streaming changes neither the examples nor their order (nor resume).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from ddpmkit.data import FolderDataset, ImageData, load_dataset, open_folder_dataset
from ddpmkit.data.folder import decode_all, fits_in_memory
from ddpmkit.errors import DdpmkitError
from ddpmkit.notes import note
from ddpmkit.run.config import RunConfig
from ddpmkit.train import distributed


def training_data(config: RunConfig) -> ImageData | FolderDataset:
    """The training images in memory, or a FolderDataset to stream: with --stream, or when too large.

    A folder is scanned once (its notes said once), then decoded into memory when it fits.
    """
    d = config.data
    split = "all" if d.train_on_all else "train"  # a folder's "train" leaves out the images eval judges against
    if d.dataset != "folder":
        if d.stream:
            raise DdpmkitError(f"--stream is for --dataset folder; {d.dataset} is small enough to load into memory")
        return load_dataset(d.dataset, "train", data_dir=d.data_dir, image_size=d.image_size)
    folder = open_folder_dataset(d.data_dir, d.image_size, split=split, fit=d.fit, background=tuple(d.background))
    if d.stream:
        return folder
    if fits_in_memory(folder):
        return decode_all(folder, Path(d.data_dir))
    note(f"streaming {len(folder)} images from {d.data_dir}: they would not fit in memory")
    return folder


class Stream:
    """This rank's micro-batches from a DataLoader whose worker processes decode the images.

    `global_indices(step)` gives the dataset indices of step's global batch; the batch sampler
    hands the DataLoader this rank's slices of it, step after step, from the step asked for.
    """

    def __init__(
        self,
        dataset: FolderDataset,
        global_indices: Callable[[int], torch.Tensor],
        micro: int,
        accum: int,
        world: distributed.DistInfo,
        workers: int | None = None,
        pin_memory=False,
    ):
        self.dataset, self.global_indices, self.micro, self.accum, self.world = (
            dataset,
            global_indices,
            micro,
            accum,
            world,
        )
        self.workers = min(4, os.cpu_count() or 1) if workers is None else workers
        self.pin_memory = pin_memory
        self.iterator, self.position = None, None

    def batch(self, step: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [micro, C, S, S] and labels [micro] of this rank's micro-batch k of step."""
        if self.position != (step, k):  # the first batch, or the step moved (resume)
            self._start(step)
            for _ in range(k):
                next(self.iterator)
        images, labels = next(self.iterator)
        self.position = (step, k + 1) if k + 1 < self.accum else (step + 1, 0)
        return images, labels

    def _start(self, step: int) -> None:
        self.close()
        sampler = distributed.RankBatchSampler(self.global_indices, self.micro, self.accum, step, self.world)
        self.iterator = iter(
            torch.utils.data.DataLoader(
                self.dataset, batch_sampler=sampler, num_workers=self.workers, pin_memory=self.pin_memory
            )
        )

    def close(self) -> None:
        """Let go of the iterator, which stops its worker processes (a later batch() starts new ones)."""
        self.iterator, self.position = None, None
