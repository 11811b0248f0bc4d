"""Real images of a folder, one row per class, framed as a run sees them: what a sample grid aims at.

    python docs/real_grid.py ../shared/data/emoji-noto docs/img/emoji-real.png --image-size 32

Training images (never the held-out ones), drawn at random per class with a fixed seed.
"""

import argparse
from pathlib import Path

import torch

from ddpmkit.core.pixels import to_model_range
from ddpmkit.data.datasets import load_dataset
from ddpmkit.viz import save_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("out", type=Path)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_dataset("folder", "train", data_dir=args.data_dir, image_size=args.image_size, progress=False)
    gen = torch.Generator().manual_seed(args.seed)
    picks = []
    for c in range(data.info.num_classes):
        members = (data.labels == c).nonzero().flatten()
        picks += members[torch.randperm(len(members), generator=gen)[: args.per_class]].tolist()
    save_grid(to_model_range(data.images[picks]), args.out, data.labels[picks], data.info.class_names)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
