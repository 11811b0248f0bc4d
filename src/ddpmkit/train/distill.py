"""Progressive distillation as training: the Distiller, a Trainer whose loss is core.distillation's.

The run's optimizer steps are numbered across rounds: round r (0-based) takes the steps r S to
(r + 1) S - 1, S = --steps-per-round, and its student has N_r = start / 2^(r + 1) steps. Data order
and noise come from (seed, step) as in training, so a run resumed at any step continues exactly.
At the first step of a round the student's EMA weights become the frozen teacher and the new
student's starting point, and the optimizer starts afresh; within the round the learning rate falls
linearly to 0 (the paper's code) and the EMA warms up again. Besides the usual run directory:

    RUN/rounds/teacher.safetensors     the teacher run's EMA weights when distillation began
    RUN/rounds/steps-0032.safetensors  the student of the round that ended at 32 steps (EMA weights)

A resumed run reads the teacher of its round from there, so the teacher run may change or go.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from ddpmkit.core.denoiser import Denoiser
from ddpmkit.core.distillation import DistillLoss, Grids, halvings
from ddpmkit.core.losses import Noise
from ddpmkit.errors import DdpmkitError
from ddpmkit.run import build, checkpoint
from ddpmkit.run.config import RunConfig
from ddpmkit.train.trainer import Trainer, batch_randomness, ema_decay_at

ROUNDS = "rounds"


def teacher_file(run_dir: Path) -> Path:
    return Path(run_dir) / ROUNDS / "teacher.safetensors"


def round_file(run_dir: Path, steps: int) -> Path:
    """The EMA weights of the student that samples in `steps` steps."""
    return Path(run_dir) / ROUNDS / f"steps-{steps:04d}.safetensors"


def load_round(run_dir: Path, steps: int, device="cpu") -> tuple[RunConfig, Denoiser]:
    """A distilled run's config and the student of the round that ended at `steps` steps, as a Denoiser
    (sample it with DDIM, `steps` steps and the run's spacing; `load_denoiser` opens the last one)."""
    config = checkpoint.load_config(run_dir)
    path = round_file(run_dir, steps)
    if config.distill is None or not path.is_file():
        raise DdpmkitError(f"{run_dir} holds no distilled student of {steps} steps ({path} is missing)")
    net = build.net(config)
    checkpoint.load_weights(net, path)
    return config, build.denoiser(config, net.to(device).eval())


class Distiller(Trainer):
    """The Trainer's loop, checkpoints, signals and resume, with rounds of DistillLoss."""

    def __init__(self, config: RunConfig, run_dir: Path, data, device="cpu"):
        if config.distill is None:
            raise DdpmkitError("a Distiller needs a config with distillation settings (run.config.distilled_config)")
        super().__init__(config, run_dir, data, device)
        d = config.distill
        self.counts = halvings(d.start, d.to)  # the students' steps, round after round
        self.per_round = d.steps_per_round
        self.teacher = build.denoiser(config, copy.deepcopy(self.ema), self.schedule, precision="fp32")
        self.teacher.clip_x0 = False  # the exact DDIM steps; an enclosing autocast (the trainer's) applies
        self.loss = self._round_loss(0)

    @property
    def total(self) -> int:
        return len(self.counts) * self.per_round

    def round_of(self, step: int) -> int:
        """The 0-based round that optimizer step `step` (0-based) belongs to."""
        return min(step // self.per_round, len(self.counts) - 1)

    def _round_loss(self, r: int) -> DistillLoss:
        grids = Grids(self.schedule.T, self.counts[r], self.config.distill.spacing)
        return DistillLoss(self.teacher, grids, self.config.distill.guidance)

    # ---- starting, rounds, resuming --------------------------------------------------------------

    def start(self, teacher_weights: Path) -> None:
        """A new run: student and teacher from the teacher run's EMA weights, copied into the run."""
        checkpoint.load_weights(self.ema, Path(teacher_weights))
        self.model.load_state_dict(self.ema.state_dict())
        if self.dist.rank == 0:
            checkpoint.save_weights(teacher_file(self.run_dir), self.ema, {"from": teacher_weights})

    def resume(self) -> None:
        super().resume()
        if self.step == 0:  # killed before its first checkpoint: start again from the teacher
            d = self.config.distill
            if not teacher_file(self.run_dir).is_file():  # killed before even the copy was written
                self.start(Path(d.teacher) / d.teacher_checkpoint / "ema.safetensors")
            checkpoint.load_weights(self.ema, teacher_file(self.run_dir))
            self.model.load_state_dict(self.ema.state_dict())
        elif self.step % self.per_round and self.step < self.total:  # within a round: its teacher
            r = self.round_of(self.step)
            path = teacher_file(self.run_dir) if r == 0 else round_file(self.run_dir, self.counts[r - 1])
            checkpoint.load_weights(self.teacher.net, path)
            self.loss = self._round_loss(r)

    def _begin_round(self) -> None:
        """theta_teacher <- theta_student (its EMA) and the new student starts there (Algorithm 2)."""
        r = self.step // self.per_round
        if r > 0:
            self._keep_student(r - 1)
        weights = self.ema.state_dict()
        self.teacher.net.load_state_dict(weights)
        self.model.load_state_dict(weights)
        self.optimizer = build.optimizer(self.model, self.config)
        self.loss = self._round_loss(r)

    def _keep_student(self, r: int) -> None:
        if self.dist.rank == 0:
            meta = {"student_steps": self.counts[r], "step": self.step}
            checkpoint.save_weights(round_file(self.run_dir, self.counts[r]), self.ema, meta)

    # ---- the Trainer's hooks -----------------------------------------------------------------------

    def fit(self, total_steps: int | None = None, minutes: float | None = None, progress: bool = True) -> int:
        """Distil until `total_steps` (all rounds by default) or `minutes`; returns the step reached."""
        total = self.total if total_steps is None else min(total_steps, self.total)
        step = super().fit(total, minutes, progress)
        if step == self.total:
            self._keep_student(len(self.counts) - 1)
        return step

    def train_step(self) -> torch.Tensor:
        if self.step % self.per_round == 0:
            self._begin_round()
        return super().train_step()

    def randomness_now(self) -> tuple[Noise, torch.Tensor]:
        """t = t_i with i ~ U{1..N} on the student's grid (Algorithm 2: t = i / N), eps ~ N(0, I); flip coins."""
        c, size = self.config.in_channels, self.config.image_size
        shape = (self.global_batch, c, size, size)
        (i, eps, u), flips = batch_randomness(self.config.train.seed, self.step, shape, self.loss.grids.n, self.device)
        return Noise(self.loss.grids.steps(i), eps, u), flips

    def lr_now(self) -> float:
        """lr (1 - k / S) at step k of the round: linear to 0."""
        k = self.step - self.round_of(self.step) * self.per_round
        return self.config.train.lr * (1 - k / self.per_round)

    def ema_decay_now(self) -> float:
        return ema_decay_at(self.step - self.round_of(self.step) * self.per_round, self.config.train.ema_decay)

    def _log(self, bar, loss_sum, t_log, n_log):
        out = super()._log(bar, loss_sum, t_log, n_log)
        r = self.round_of(self.step - 1)
        self.metrics[-1].update(round=r + 1, student_steps=self.counts[r])
        return out

    def write_grid(self, config: RunConfig | None = None) -> None:
        """The grid with the current student's own steps."""
        n = self.counts[self.round_of(max(self.step - 1, 0))]
        super().write_grid(dataclasses.replace(self.config, sample=dataclasses.replace(self.config.sample, steps=n)))
