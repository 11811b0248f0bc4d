"""Training: the loss of one batch, EMA, and a small Trainer loop (log, grid, checkpoint, resume).

Determinism by construction: the data order of epoch e is a permutation seeded by (seed, e),
and the noise and steps of optimizer step k come from a generator seeded by (seed, k) for the
whole global batch, of which each rank takes its slice. So a run resumed at step k, or run on a
different number of processes, sees exactly the same examples, noise and steps.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import signal
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import checkpoint, diffusion, distributed, viz
from .config import RunConfig, model_kwargs
from .data import FolderDataset, ImageData, to_model_range
from .errors import DdpmkitError
from .loader import Stream
from .models import build_model
from .precision import autocast, resolve_precision
from .schedules import Schedule, build_schedule


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta  (all tensors at once)."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm the EMA up so that short runs are not dominated by the random initialisation."""
    return min(decay, (1 + step) / (10 + step))


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then constant."""
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


def batch_noise(seed: int, step: int, shape, T: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, eps, u) for the whole global batch of optimizer step `step`: identical on every rank."""
    g = torch.Generator(device).manual_seed(seed * 1_000_003 + step)
    t = diffusion.sample_t(shape[0], T, device, g)
    eps = torch.randn(shape, generator=g, device=device)
    u = torch.rand(shape[0], 2, generator=g, device=device)  # label dropout and self-conditioning coins
    return t, eps, u


def batch_indices(seed: int, step: int, n_data: int, global_batch: int) -> torch.Tensor:
    """Indices of the global batch of optimizer step `step` (epochs are seeded permutations)."""
    per_epoch = n_data // global_batch
    if per_epoch == 0:
        raise DdpmkitError(f"the dataset has {n_data} images, fewer than one global batch of {global_batch}")
    epoch, k = divmod(step, per_epoch)
    return _epoch_permutation(seed, epoch, n_data)[k * global_batch:(k + 1) * global_batch]


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, n_data: int) -> torch.Tensor:
    """The data order of one epoch (cached: a million-image permutation is not free every step)."""
    return torch.randperm(n_data, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def training_loss(net: nn.Module, schedule: Schedule, config: RunConfig, x0, y, t, eps, u) -> torch.Tensor:
    """Per-example loss [B]: L_simple in the objective's space, min-SNR weighted unless gamma is None;
    with learned variances, L_hybrid (unweighted)."""
    d, objective = config.diffusion, config.diffusion.objective
    if y is not None:  # label dropout: y -> null with probability p, for classifier-free guidance
        y = torch.where(u[:, 0] < config.data.label_dropout, torch.full_like(y, config.num_classes), y)
    x_t = diffusion.q_sample(schedule, x0, t, eps)  # x_t ~ q(x_t | x0)
    x_self_cond = _self_condition(net, schedule, config, x_t, t, y, u) if config.model.self_condition else None
    out = net(x_t, t, y, x_self_cond)
    if d.learn_sigma:
        from .likelihood import hybrid_loss
        return hybrid_loss(schedule, objective, x0, x_t, t, eps, out)
    loss = diffusion.loss_per_example(out, diffusion.target(objective, schedule, x0, t, eps))
    if d.min_snr_gamma:
        loss = loss * diffusion.min_snr_weight(objective, schedule, t, d.min_snr_gamma)
    return loss


def _self_condition(net, schedule, config, x_t, t, y, u):
    """Chen et al. (Analog Bits): on half of the batches, first estimate x0 without gradient and
    feed it back as input; zeros on the other half (the coin is shared by all ranks)."""
    if bool(u[0, 1] >= 0.5):
        return torch.zeros_like(x_t)
    with torch.no_grad():
        out = net(x_t, t, y, torch.zeros_like(x_t)).float()
        if config.diffusion.learn_sigma:
            out = out.chunk(2, dim=1)[0]
        x0_hat, _ = diffusion.to_x0_eps(config.diffusion.objective, schedule, x_t, t, out)
    return x0_hat.clamp(-1, 1).to(x_t.dtype)


def build_net(config: RunConfig) -> nn.Module:
    return build_model(config.model.arch, **model_kwargs(config))


class Trainer:
    """One small stateful loop. Rank 0 alone writes files and shows the progress bar."""

    def __init__(self, config: RunConfig, run_dir: Path, data: ImageData | FolderDataset, device="cpu"):
        """`data` in memory (ImageData), or a FolderDataset streamed by DataLoader workers."""
        self.config, self.run_dir, self.data = config, Path(run_dir), data
        self.device = torch.device(device)
        self.dist = distributed.info()
        self.schedule = build_schedule(config.diffusion.schedule, config.diffusion.timesteps)
        torch.manual_seed(config.train.seed)
        self.model = build_net(config).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        if config.train.grad_checkpointing:
            _enable_grad_checkpointing(self.model, config.model.arch)
        self.net = distributed.wrap(self.model, self.device)
        if config.train.compile:  # the training forward and backward; sampling runs the EMA copy eagerly
            self.net = torch.compile(self.net)
        self.optimizer = _optimizer(self.model, config)
        # fp16 needs loss scaling (its gradients underflow); bf16 and fp32 have fp32's exponent range
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=resolve_precision(config.train.precision, self.device) == "fp16")
        self.stream = None if isinstance(data, ImageData) else self._stream(data)
        self.step, self.metrics, self.nan_skipped = 0, [], 0
        self._stop_signal, self._saved_step = None, None

    @property
    def interrupted_by(self) -> Optional[int]:
        """The signal (SIGINT or SIGTERM) that stopped fit() early, else None."""
        return self._stop_signal

    @property
    def global_batch(self) -> int:
        """The effective batch: images per rank and micro-batch x ranks x accumulated micro-batches."""
        t = self.config.train
        return t.batch_size * self.dist.world_size * t.grad_accum

    def _stream(self, dataset: FolderDataset) -> Stream:
        t = self.config.train
        return Stream(dataset, lambda step: batch_indices(t.seed, step, len(dataset), self.global_batch),
                      t.batch_size, t.grad_accum, self.dist, self.config.data.workers, self.device.type == "cuda")

    # ---- state ---------------------------------------------------------------------------------

    def resume(self) -> None:
        if self.dist.rank == 0:  # what a killed run left: temp checkpoints, temp files, unpruned ones
            checkpoint.tidy(self.run_dir, self.config.train.keep)
        distributed.barrier()
        ckpt = checkpoint.latest_checkpoint(self.run_dir)
        if ckpt is None:
            return
        state, train_state = checkpoint.load_state(ckpt)
        _check_global_batch(state.get("global_batch", self.global_batch), self.global_batch, self.config,
                            self.dist.world_size)
        checkpoint.load_weights(self.model, ckpt / "model.safetensors")
        checkpoint.load_weights(self.ema, ckpt / "ema.safetensors")
        try:
            self.optimizer.load_state_dict(train_state["optimizer"])
            if train_state.get("scaler"):
                self.scaler.load_state_dict(train_state["scaler"])
            torch.set_rng_state(train_state["cpu_rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise DdpmkitError(f"{ckpt / 'train_state.pt'} does not hold this run's optimizer and RNG state "
                               f"({type(e).__name__}: {e})") from e
        self.step, self.nan_skipped = state["step"], state.get("nan_skipped", 0)
        self._saved_step = self.step
        self.metrics = [m for m in _read_metrics(self.run_dir) if m["step"] <= self.step]

    def save(self) -> None:
        """Metrics first, then the checkpoint: a kill in between leaves rows past the checkpoint,
        which resume() drops, rather than a gap. A step already saved is not saved again (its
        metrics are rewritten: a signal can stop the loop after the save and before the log line)."""
        if self._saved_step == self.step:  # a log line may have come after this step's checkpoint
            if self.dist.rank == 0:
                self._write_metrics()
            return
        if self.dist.rank == 0:
            self._write_metrics()
            train_state = {"optimizer": self.optimizer.state_dict(), "cpu_rng": torch.get_rng_state(),
                           "scaler": self.scaler.state_dict()}
            checkpoint.save_checkpoint(self.run_dir, self.step, self.model, self.ema, train_state,
                                       {"nan_skipped": self.nan_skipped, "global_batch": self.global_batch},
                                       keep=self.config.train.keep)
        self._saved_step = self.step
        distributed.barrier()

    # ---- the loop ------------------------------------------------------------------------------

    def fit(self, total_steps: Optional[int], minutes: Optional[float] = None, progress: bool = True) -> int:
        """Train until `total_steps` (the run's total) or `minutes` of wall clock; returns the step."""
        cfg = self.config.train
        deadline = time.monotonic() + 60 * minutes if minutes else None
        bar = viz.progress_bar(self.step, total_steps, minutes, enabled=progress and self.dist.rank == 0)
        loss_sum, t_log, n_log = torch.zeros((), device=self.device), time.monotonic(), 0
        with _signals(self):
            while not self._done(total_steps, deadline):
                loss_sum += self.train_step()
                self.step, n_log = self.step + 1, n_log + 1
                if self.step % cfg.log_every == 0 or self._done(total_steps, deadline):
                    loss_sum, t_log, n_log = self._log(bar, loss_sum, t_log, n_log)
                if self.step % cfg.sample_every == 0:
                    self.write_grid()
                if self.step % cfg.checkpoint_every == 0:
                    self.save()
            if n_log:  # a signal can end the loop between a step and its log line
                loss_sum, t_log, n_log = self._log(bar, loss_sum, t_log, n_log)
            self.save()  # still under the handlers: a second Ctrl-C cannot cut this save short
        bar.close()
        if self.stream is not None:
            self.stream.close()
        if self._stop_signal is None:  # a signal asks to stop now (SIGTERM grace periods are short)
            self.write_grid()
        distributed.barrier()  # the ranks leave together (a rank gone early can abort gloo's peers)
        return self.step

    def _done(self, total_steps, deadline) -> bool:
        if total_steps is not None and self.step >= total_steps:
            return True
        stop = self._stop_signal is not None or (deadline is not None and time.monotonic() >= deadline)
        # all ranks must stop at the same step (a signal may reach them at different steps)
        return distributed.any_rank(stop, self.device) if self.dist.world_size > 1 else stop

    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns the mean loss (a tensor)."""
        cfg, dist = self.config.train, self.dist
        micro, accum = cfg.batch_size, cfg.grad_accum
        idx = batch_indices(cfg.seed, self.step, len(self.data), self.global_batch)
        c, size = self.config.in_channels, self.config.image_size
        t, eps, u = batch_noise(cfg.seed, self.step, (self.global_batch, c, size, size), self.schedule.T, self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg.lr, cfg.warmup)
        total = torch.zeros((), device=self.device)
        for k in range(accum):
            sl = distributed.rank_slice(k, micro, dist)  # this rank's slice of micro-batch k
            images, labels = self._micro_batch(idx[sl], k)
            with distributed.no_sync(self.net, last=k == accum - 1), autocast(self.device, cfg.precision):
                x0 = to_model_range(images.to(self.device, non_blocking=True))
                y = labels.to(self.device) if self.config.data.conditional else None
                loss = training_loss(self.net, self.schedule, self.config, x0, y, t[sl], eps[sl], u[sl]).mean()
                self.scaler.scale(loss / accum).backward()
            total += loss.detach() / accum
        return self._optimizer_step(total)

    def _micro_batch(self, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and labels of this rank's micro-batch k: indexed in memory, or streamed."""
        if self.stream is None:
            return self.data.images[idx], self.data.labels[idx]
        return self.stream.batch(self.step, k)

    def _optimizer_step(self, loss: torch.Tensor) -> torch.Tensor:
        cfg = self.config.train
        params = [p for p in self.model.parameters() if p.grad is not None]
        self.scaler.unscale_(self.optimizer)  # clip the true gradient, not the loss-scaled one
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if self.scaler.is_enabled() and torch.isfinite(loss):
            return self._scaled_step(loss)
        if not (torch.isfinite(norm) and torch.isfinite(loss)):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()  # fp16: close this step's unscale_ (a no-op for bf16/fp32)
            if cfg.on_nan == "skip":
                self.nan_skipped += 1
                return torch.zeros((), device=self.device)
            raise DdpmkitError(f"non-finite loss or gradient at step {self.step + 1}; the last checkpoint "
                               "is intact (lower --lr, or pass --on-nan skip to skip such steps)")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.ema, self.model, ema_decay_at(self.step, cfg.ema_decay))
        return loss

    def _scaled_step(self, loss: torch.Tensor) -> torch.Tensor:
        """fp16: the scaler skips the step (and halves the scale) when the gradient overflowed."""
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.get_scale() >= scale:  # the step was taken; after a skipped one the EMA waits too
            ema_update(self.ema, self.model, ema_decay_at(self.step, self.config.train.ema_decay))
        return loss

    # ---- outputs -------------------------------------------------------------------------------

    def _log(self, bar, loss_sum, t_log, n_log):
        loss_sum = distributed.mean(loss_sum, self.device)
        now = time.monotonic()
        images = n_log * self.config.train.batch_size * self.dist.world_size * self.config.train.grad_accum
        row = {"step": self.step, "loss": float(loss_sum) / max(n_log, 1), "images_per_s": images / (now - t_log),
               "lr": self.optimizer.param_groups[0]["lr"], "nan_skipped": self.nan_skipped}
        self.metrics.append(row)
        bar.update_to(self.step, row)
        return torch.zeros((), device=self.device), now, 0

    def _write_metrics(self) -> None:
        lines = "".join(json.dumps(m) + "\n" for m in self.metrics)
        try:
            checkpoint.atomic_write_text(self.run_dir / "metrics.jsonl", lines)
            viz.loss_curve(self.metrics, self.run_dir / "loss.png")
        except OSError as e:
            raise DdpmkitError(f"could not write the metrics in {self.run_dir}: {e.strerror or e}; "
                               "the previous checkpoint is intact") from e

    def write_grid(self) -> None:
        if self.dist.rank != 0:
            return
        from .sampling import denoiser_for, grid_for_run
        (self.run_dir / "samples").mkdir(exist_ok=True)
        denoiser = denoiser_for(self.config, self.ema, self.schedule)
        grid_for_run(self.config, denoiser, self.run_dir / "samples" / f"step-{self.step:08d}.png",
                     device=self.device)


def _enable_grad_checkpointing(model: nn.Module, arch: str) -> None:
    """Recompute activations in the backward pass instead of storing them (less memory, ~30% slower)."""
    if not hasattr(model, "set_grad_checkpointing"):
        raise DdpmkitError(f"--grad-checkpointing is available for --arch unet, not {arch}")
    model.set_grad_checkpointing(True)


def _check_global_batch(saved: int, now: int, config: RunConfig, world_size: int) -> None:
    """A resumed run keeps its global batch (data order and loss scale depend on it)."""
    if saved != now:
        t = config.train
        raise DdpmkitError(f"this run trained with a global batch of {saved} images per step, but {t.batch_size} "
                           f"per process x {world_size} process(es) x --grad-accum {t.grad_accum} is {now}; "
                           f"choose --batch-size and --grad-accum so that their product x {world_size} is {saved}")


def _optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    cfg = config.train
    classes = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
    if cfg.optimizer not in classes:
        raise DdpmkitError(f"unknown optimizer {cfg.optimizer!r}; choose adamw or adam")
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    try:  # one fused kernel where this torch has it (CPU and CUDA since 2.4); bench/variants.py
        return classes[cfg.optimizer](model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):  # older torch, or a device without the fused kernel
        return classes[cfg.optimizer](model.parameters(), foreach=True, **kwargs)


def _read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _signals:
    """SIGINT/SIGTERM ask the loop to stop after the step in flight; it then saves a checkpoint
    (a repeated signal cannot interrupt that save) and fit() returns, `interrupted_by` set."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.previous = trainer, {}

    def _handler(self, signum, frame):
        self.trainer._stop_signal = signum

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
