"""Training: the loss of one batch, EMA, and a small Trainer loop (log, grid, checkpoint, resume).

Determinism by construction: the data order of epoch e is a permutation seeded by (seed, e),
and the noise and steps of optimizer step k come from a generator seeded by (seed, k) for the
whole global batch, of which each rank takes its slice. So a run resumed at step k, or run on a
different number of processes, sees exactly the same examples, noise and steps.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import checkpoint, diffusion, distributed, viz
from .config import RunConfig, model_kwargs
from .data import ImageData, to_model_range
from .errors import DdpmkitError
from .models import build_model
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
    perm = torch.randperm(n_data, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return perm[k * global_batch:(k + 1) * global_batch]


def training_loss(net: nn.Module, schedule: Schedule, config: RunConfig, x0, y, t, eps, u) -> torch.Tensor:
    """Per-example loss [B]: L_simple in the objective's space (optionally min-SNR weighted)."""
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
    """Chen et al. (Analog Bits): half the time, first estimate x0 without gradient and feed it back."""
    with torch.no_grad():
        out = net(x_t, t, y, torch.zeros_like(x_t)).float()
        if config.diffusion.learn_sigma:
            out = out.chunk(2, dim=1)[0]
        x0_hat, _ = diffusion.to_x0_eps(config.diffusion.objective, schedule, x_t, t, out)
    use = (u[:, 1] < 0.5).reshape(-1, 1, 1, 1)
    return torch.where(use, x0_hat.clamp(-1, 1).to(x_t.dtype), torch.zeros_like(x_t))


def build_net(config: RunConfig) -> nn.Module:
    return build_model(config.model.arch, **model_kwargs(config))


class Trainer:
    """One small stateful loop. Rank 0 alone writes files and shows the progress bar."""

    def __init__(self, config: RunConfig, run_dir: Path, data: ImageData, device="cpu"):
        self.config, self.run_dir, self.data = config, Path(run_dir), data
        self.device = torch.device(device)
        self.dist = distributed.info()
        self.schedule = build_schedule(config.diffusion.schedule, config.diffusion.timesteps)
        torch.manual_seed(config.train.seed)
        self.model = build_net(config).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.net = distributed.wrap(self.model, self.device)
        self.optimizer = _optimizer(self.model, config)
        self.step, self.metrics, self.nan_skipped = 0, [], 0
        self._stop_signal = None

    # ---- state ---------------------------------------------------------------------------------

    def resume(self) -> None:
        ckpt = checkpoint.latest_checkpoint(self.run_dir)
        if ckpt is None:
            return
        state, train_state = checkpoint.load_state(ckpt)
        checkpoint.load_weights(self.model, ckpt / "model.safetensors")
        checkpoint.load_weights(self.ema, ckpt / "ema.safetensors")
        self.optimizer.load_state_dict(train_state["optimizer"])
        torch.set_rng_state(train_state["cpu_rng"])
        self.step, self.nan_skipped = state["step"], state.get("nan_skipped", 0)
        self.metrics = [m for m in _read_metrics(self.run_dir) if m["step"] <= self.step]

    def save(self) -> None:
        if self.dist.rank == 0:
            train_state = {"optimizer": self.optimizer.state_dict(), "cpu_rng": torch.get_rng_state()}
            checkpoint.save_checkpoint(self.run_dir, self.step, self.model, self.ema, train_state,
                                       {"nan_skipped": self.nan_skipped}, keep=self.config.train.keep)
            self._write_metrics()
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
        bar.close()
        self.save()
        self.write_grid()
        return self.step

    def _done(self, total_steps, deadline) -> bool:
        if self._stop_signal is not None:
            return True
        if total_steps is not None and self.step >= total_steps:
            return True
        return deadline is not None and distributed.any_rank(time.monotonic() >= deadline, self.device)

    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns the mean loss (a tensor)."""
        cfg, dist = self.config.train, self.dist
        micro, accum = cfg.batch_size, cfg.grad_accum
        global_batch = micro * dist.world_size * accum
        idx = batch_indices(cfg.seed, self.step, len(self.data.images), global_batch)
        shape = (global_batch, *self.data.images.shape[1:])
        t, eps, u = batch_noise(cfg.seed, self.step, shape, self.schedule.T, self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg.lr, cfg.warmup)
        total = torch.zeros((), device=self.device)
        for k in range(accum):
            start = (k * dist.world_size + dist.rank) * micro  # this rank's slice of micro-batch k
            sl = slice(start, start + micro)
            with distributed.no_sync(self.net, last=k == accum - 1), _autocast(self.device, cfg.precision):
                x0 = to_model_range(self.data.images[idx[sl]].to(self.device, non_blocking=True))
                y = self.data.labels[idx[sl]].to(self.device) if self.config.data.conditional else None
                loss = training_loss(self.net, self.schedule, self.config, x0, y, t[sl], eps[sl], u[sl]).mean()
                (loss / accum).backward()
            total += loss.detach() / accum
        return self._optimizer_step(total)

    def _optimizer_step(self, loss: torch.Tensor) -> torch.Tensor:
        cfg = self.config.train
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not (torch.isfinite(norm) and torch.isfinite(loss)):
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.on_nan == "skip":
                self.nan_skipped += 1
                return torch.zeros((), device=self.device)
            raise DdpmkitError(f"non-finite loss or gradient at step {self.step + 1}; the last checkpoint "
                               "is intact (lower --lr, or pass --on-nan skip to skip such steps)")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.ema, self.model, ema_decay_at(self.step, cfg.ema_decay))
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
        checkpoint.atomic_write_text(self.run_dir / "metrics.jsonl", lines)
        viz.loss_curve(self.metrics, self.run_dir / "loss.png")

    def write_grid(self) -> None:
        if self.dist.rank != 0:
            return
        from .sampling import denoiser_for, grid_for_run
        (self.run_dir / "samples").mkdir(exist_ok=True)
        denoiser = denoiser_for(self.config, self.ema, self.schedule)
        grid_for_run(self.config, denoiser, self.run_dir / "samples" / f"step-{self.step:08d}.png",
                     device=self.device)


def _optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    cfg = config.train
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "foreach": True}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), **kwargs)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), **kwargs)
    raise DdpmkitError(f"unknown optimizer {cfg.optimizer!r}; choose adamw or adam")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is bf16 where the hardware computes it natively (AVX-512 BF16/AMX CPUs, Ampere+ GPUs)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def _autocast(device: torch.device, precision: str):
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _signals:
    """SIGINT/SIGTERM ask the loop to stop; it then saves a checkpoint and returns cleanly."""

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
