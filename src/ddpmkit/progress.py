"""Progress bars (tqdm) for every layer: optional wrappers that cost nothing when turned off."""

from __future__ import annotations

import time
from collections.abc import Iterable

from tqdm import tqdm


def maybe_tqdm(iterable: Iterable, enabled: bool, desc: str) -> Iterable:
    """`iterable` with a transient progress bar when enabled, else unchanged."""
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True) if enabled else iterable


class TrainingBar:
    """A tqdm bar over steps (or minutes) showing loss, images/s and the time left."""

    def __init__(self, step: int, total_steps: int | None, minutes: float | None, enabled: bool):
        self.enabled, self.minutes, self.t0 = enabled, minutes, time.monotonic()
        self.bar = (
            tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True) if enabled else None
        )

    def update_to(self, step: int, row: dict) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        post = {"loss": f"{row['loss']:.4f}", "img/s": f"{row['images_per_s']:.0f}"}
        if self.minutes:
            post["left"] = f"{max(0.0, self.minutes - (time.monotonic() - self.t0) / 60):.1f}min"
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
