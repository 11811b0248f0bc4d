"""A folder's held-out split: the same images every time, chosen by a hash of their paths.

An image folder has no test set of its own, so ddpmkit holds one out: in each class, the
round(HOLDOUT_FRACTION * n) images whose relative paths hash lowest (SHA-256), never the last image
of a class. Only the paths decide it (not the file order, not a random seed), so the split is the
same on every machine and every run, and adding or removing one image moves at most one other
image of its class between the splits. Unlabelled folders are one class. `ddpmkit train` trains
on "train" (unless --train-on-all), `ddpmkit eval` judges against "test".
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence

from ddpmkit.errors import DdpmkitError

HOLDOUT_FRACTION = 0.1
FOLDER_SPLITS = ("train", "test", "all")
MIN_CLASS_HELD_OUT = max(2, math.ceil(0.5 / HOLDOUT_FRACTION))  # the smallest class with an image held out (5)


def path_hash(relative_path: str) -> int:
    """A 64-bit number from the SHA-256 of a path relative to the folder, '/'-separated."""
    return int.from_bytes(hashlib.sha256(relative_path.encode("utf-8")).digest()[:8], "big")


def held_out_count(n: int, fraction: float = HOLDOUT_FRACTION) -> int:
    """Images held out of a class of n: fraction * n rounded half up, leaving at least one in train."""
    return min(int(fraction * n + 0.5), n - 1) if n > 0 else 0


def held_out(relative_paths: Sequence[str], labels: Sequence[int], fraction: float = HOLDOUT_FRACTION) -> list[bool]:
    """For each image, whether it is held out: per class, the held_out_count lowest path hashes."""
    by_class = defaultdict(list)
    for i, (path, label) in enumerate(zip(relative_paths, labels, strict=True)):
        by_class[label].append((path_hash(path), path, i))
    test = [False] * len(relative_paths)
    for members in by_class.values():
        for _, _, i in sorted(members)[: held_out_count(len(members), fraction)]:
            test[i] = True
    return test


def split_indices(relative_paths: Sequence[str], labels: Sequence[int], split: str) -> list[int]:
    """Indices of the images in `split`: "train" (not held out), "test" (held out) or "all"."""
    if split not in FOLDER_SPLITS:
        raise DdpmkitError(f"Unknown split {split!r} for an image folder; choose 'train', 'test' or 'all'.")
    if split == "all":
        return list(range(len(relative_paths)))
    test = held_out(relative_paths, labels)
    return [i for i, is_test in enumerate(test) if is_test == (split == "test")]
