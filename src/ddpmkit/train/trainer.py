"""Training: EMA, the learning-rate schedule, the data order, and a small Trainer loop (log, grid,
checkpoint, resume). The loss of a batch is `run.build.loss(config)`, a core.losses object.

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

import torch
from torch import nn

from ddpmkit import viz
from ddpmkit.core.denoiser import Denoiser
from ddpmkit.core.losses import Noise, draw_noise
from ddpmkit.core.pixels import to_model_range
from ddpmkit.core.precision import autocast, resolve_precision
from ddpmkit.data import FolderDataset, ImageData
from ddpmkit.errors import DdpmkitError
from ddpmkit.fileio import atomic_write_text
from ddpmkit.progress import TrainingBar
from ddpmkit.run import build, checkpoint, load
from ddpmkit.run.config import RunConfig, SampleConfig, resolve
from ddpmkit.run.sampling import default_labels, generate
from ddpmkit.train import distributed
from ddpmkit.train.stream import Stream


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta  (all tensors at once)."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def ema_decay_at(step: int, decay: float, power: float | None = None) -> float:
    """The EMA decay at `step`: min(decay, (1 + step) / (10 + step)), a warm-up so that short runs are
    not dominated by the random initialisation; or, with `power` gamma, Karras et al. 2024's power-function
    EMA beta_t = (1 - 1/t)^(gamma + 1), whose length grows with the run (a fixed fraction of it)."""
    if power is not None:
        return (1 - 1 / (step + 1)) ** (power + 1)  # beta_t = (1 - 1/t)^(gamma + 1), t = step + 1
    return min(decay, (1 + step) / (10 + step))


def lr_at(step: int, lr: float, warmup: int, schedule: str = "constant", planned: int | None = None) -> float:
    """Linear warm-up over `warmup` steps; then constant, or decaying to 0 at step `planned` (the end of
    the budget): cosine lr (1 + cos(pi p)) / 2 or linear lr (1 - p), p the progress after the warm-up."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant" or not planned:
        return lr
    p = min(1.0, (step - warmup) / max(1, planned - warmup))
    return lr * (0.5 * (1 + math.cos(math.pi * p)) if schedule == "cosine" else 1 - p)


def step_generator(seed: int, step: int, device) -> torch.Generator:
    """The generator of optimizer step `step`'s randomness: the same on every rank and after a resume."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def batch_randomness(seed: int, step: int, shape, T: int, device, draw=None) -> tuple[Noise, torch.Tensor]:
    """Everything random about the global batch of optimizer step `step`, from one generator seeded
    by (seed, step), so identical on every rank and after a resume: the noise (t, eps, u), then a
    coin per image [B] (bool) that --hflip uses to mirror it. Drawn after the noise, the coins leave
    the noise of every step as it was before flips existed. draw(shape, device, generator) -> Noise
    replaces t ~ U{1..T} (a loss's own noise levels, SimpleLoss.draw)."""
    generator = step_generator(seed, step, device)
    noise = draw_noise(shape, T, device, generator) if draw is None else draw(shape, device, generator)
    return noise, torch.rand(shape[0], generator=generator, device=device) < 0.5


def batch_noise(seed: int, step: int, shape, T: int, device) -> Noise:
    """(t, eps, u) for the whole global batch of optimizer step `step`: identical on every rank."""
    return batch_randomness(seed, step, shape, T, device)[0]


def hflip(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Images [B, C, H, W] mirrored left-right where flips [B] is True (random flips, Ho et al. 2020)."""
    return torch.where(flips[:, None, None, None], x.flip(-1), x)


def batch_indices(
    seed: int, step: int, n_data: int, global_batch: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices of the global batch of optimizer step `step`. Epochs are seeded permutations; with
    per-image `weights` (class_balance_weights), n_data seeded draws with replacement instead."""
    per_epoch = n_data // global_batch
    if per_epoch == 0:
        raise DdpmkitError(f"the dataset has {n_data} images, fewer than one global batch of {global_batch}")
    epoch, k = divmod(step, per_epoch)
    order = _epoch_permutation(seed, epoch, n_data) if weights is None else _epoch_draw(seed, epoch, weights)
    return order[k * global_batch : (k + 1) * global_batch]


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, n_data: int) -> torch.Tensor:
    """The data order of one epoch (cached: a million-image permutation is not free every step)."""
    return torch.randperm(n_data, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


@functools.lru_cache(maxsize=2)
def _epoch_draw(seed: int, epoch: int, weights: torch.Tensor) -> torch.Tensor:
    """One epoch of len(weights) images drawn with replacement, image i with probability ~ weights[i]
    (cached by the weights tensor's identity: the trainer keeps one)."""
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.multinomial(weights, len(weights), replacement=True, generator=generator)


def class_balance_weights(labels: torch.Tensor, balance: float) -> torch.Tensor | None:
    """Per-image sampling weights w_i = n_c(i)^-balance, so that class c is drawn with probability
    ~ n_c^(1 - balance): 0 = as the data falls (None: plain permutations), 1 = every class equally."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    if balance == 0 or len(counts) < 2 or bool((counts == counts[0]).all()):
        return None  # nothing to balance: one class (unlabelled data is one class, -1), or all alike
    return counts.double().pow(-balance)[inverse]  # w_i = n_c(i)^-B


def total_steps(config: RunConfig, n_data: int, world_size: int) -> int | None:
    """The run's total optimizer steps from --steps and --epochs (the smaller); None: --minutes alone."""
    t = resolve(config).train
    if t.steps is None and t.epochs is None and t.minutes is None:
        raise DdpmkitError("give a training budget: --steps N, --epochs N or --minutes N")
    if t.epochs is None:
        return t.steps
    steps = t.epochs * n_data / (t.batch_size * t.grad_accum * world_size)
    if not steps < 2**53:  # inf, or beyond what a float counts exactly
        raise DdpmkitError(f"--epochs {t.epochs} is more optimizer steps than can be counted")
    return min(math.ceil(steps), t.steps) if t.steps is not None else math.ceil(steps)


def write_grid(config: RunConfig, denoiser: Denoiser, path: Path, n: int = 100, device="cpu") -> None:
    """The periodic training grid: one row per class with the run's sampling settings, seed 0."""
    denoiser.eval()
    classes = max(config.num_classes, 1)
    n = max(n // classes, 1) * classes if config.data.conditional else 64
    labels = default_labels(config, n, None)
    # eager: the EMA weights still change (a compiled, frozen network would keep the old ones)
    settings = SampleConfig(**{**config.sample.__dict__, "compile": False})
    if settings.guidance != 1.0 and config.data.label_dropout <= 0:  # no trained null class to guide with
        settings = SampleConfig(**{**settings.__dict__, "guidance": 1.0})
    images = generate(
        denoiser,
        n,
        (config.in_channels, config.image_size, config.image_size),
        labels=labels,
        settings=settings,
        device=device,
    )
    viz.save_grid(images, path, labels=labels, class_names=config.class_names)


class Trainer:
    """One small stateful loop. Rank 0 alone writes files and shows the progress bar."""

    def __init__(self, config: RunConfig, run_dir: Path, data: ImageData | FolderDataset, device="cpu"):
        """`data` in memory (ImageData), or a FolderDataset streamed by DataLoader workers; a config
        not yet resolved (`run.config.resolve`) gets its derived defaults for its image size."""
        config = resolve(config)
        self.config, self.run_dir, self.data = config, Path(run_dir), data
        self.device = torch.device(device)
        self.dist = distributed.info()
        self.schedule = build.schedule(config)
        torch.manual_seed(config.train.seed)
        self.model = build.net(config).to(self.device)
        if len(data) < self.global_batch:  # refused before any file is written (after the model's own checks)
            t = config.train
            raise DdpmkitError(
                f"the dataset has {len(data)} images, fewer than one global batch of {self.global_batch} "
                f"(--batch-size {t.batch_size} x {self.dist.world_size} process(es) x --grad-accum {t.grad_accum}); "
                "lower --batch-size"
            )
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        if config.train.grad_checkpointing:
            _enable_grad_checkpointing(self.model, config.model.arch)
        self.net = distributed.wrap(self.model, self.device)
        if config.train.compile:  # the training forward and backward; sampling runs the EMA copy eagerly
            self.net = build.compiled(self.net, self.device, graphs=self.dist.world_size == 1)
        self.optimizer = build.optimizer(self.model, config)
        self.loss = build.loss(config)
        # the loss sees the (DDP-wrapped, compiled) training network through a Denoiser; no autocast of
        # its own: train_step's autocast applies
        self.denoiser = build.denoiser(config, self.net, self.schedule, precision="fp32")
        # fp16 needs loss scaling (its gradients underflow); bf16 and fp32 have fp32's exponent range
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=resolve_precision(config.train.precision, self.device) == "fp16"
        )
        labels = data.labels if isinstance(data, ImageData) else torch.tensor(data.labels, dtype=torch.long)
        self.weights = class_balance_weights(labels, config.data.class_balance)  # None: plain epochs
        self.stream = None if isinstance(data, ImageData) else self._stream(data)
        self.step, self.metrics, self.nan_skipped = 0, [], 0
        self.planned_steps: int | None = None  # where the lr schedule ends (fit sets it)
        self._stop_signal, self._saved_step = None, None

    @property
    def interrupted_by(self) -> int | None:
        """The signal (SIGINT or SIGTERM) that stopped fit() early, else None."""
        return self._stop_signal

    @property
    def global_batch(self) -> int:
        """The effective batch: images per rank and micro-batch x ranks x accumulated micro-batches."""
        t = self.config.train
        return t.batch_size * self.dist.world_size * t.grad_accum

    def _stream(self, dataset: FolderDataset) -> Stream:
        t = self.config.train
        return Stream(
            dataset,
            lambda step: batch_indices(t.seed, step, len(dataset), self.global_batch, self.weights),
            t.batch_size,
            t.grad_accum,
            self.dist,
            self.config.data.workers,
            self.device.type == "cuda",
        )

    # ---- state ---------------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the latest checkpoint. Everything it holds is checked (run.load.check_resume)
        and loaded before the leftovers of a killed run are cleared, so a refused resume changes nothing."""
        ckpt = load.check_resume(self.run_dir, self.config)
        if ckpt is not None:
            self._load(ckpt)
        if self.dist.rank == 0:  # what a killed run left: temp checkpoints, temp files, unpruned ones
            checkpoint.tidy(self.run_dir, self.config.train.keep)
        distributed.barrier()

    def _load(self, ckpt: Path) -> None:
        state, train_state = checkpoint.load_state(ckpt, self.config)
        _check_global_batch(
            state.get("global_batch", self.global_batch), self.global_batch, self.config, self.dist.world_size
        )
        checkpoint.load_weights(self.model, ckpt / "model.safetensors")
        checkpoint.load_weights(self.ema, ckpt / "ema.safetensors")
        try:
            self.optimizer.load_state_dict(train_state["optimizer"])
            _check_optimizer_state(self.optimizer, self.model)
            if train_state.get("scaler"):
                self.scaler.load_state_dict(train_state["scaler"])
            torch.set_rng_state(train_state["cpu_rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise DdpmkitError(
                f"{ckpt / 'train_state.pt'} does not hold this run's optimizer and RNG state ({type(e).__name__}: {e})"
            ) from e
        metrics = [m for m in _read_metrics(self.run_dir) if m["step"] <= state["step"]]
        self.step, self.nan_skipped = state["step"], state.get("nan_skipped", 0)
        self._saved_step, self.metrics = self.step, metrics

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
            train_state = {
                "optimizer": self.optimizer.state_dict(),
                "cpu_rng": torch.get_rng_state(),
                "scaler": self.scaler.state_dict(),
            }
            checkpoint.save_checkpoint(
                self.run_dir,
                self.step,
                self.model,
                self.ema,
                train_state,
                {"nan_skipped": self.nan_skipped, "global_batch": self.global_batch},
                keep=self.config.train.keep,
            )
        self._saved_step = self.step
        distributed.barrier()

    # ---- the loop ------------------------------------------------------------------------------

    def fit(self, total_steps: int | None, minutes: float | None = None, progress: bool = True) -> int:
        """Train until `total_steps` (the run's total) or `minutes` of wall clock; returns the step."""
        cfg = self.config.train
        deadline = time.monotonic() + 60 * minutes if minutes else None
        self.planned_steps = total_steps  # a time budget alone: estimated at each log line (the lr schedule)
        self._started = (self.step, time.monotonic())
        bar = TrainingBar(self.step, total_steps, minutes, enabled=progress and self.dist.rank == 0)
        loss_sum, t_log, n_log = torch.zeros((), device=self.device), time.monotonic(), 0
        with _signals(self):
            while not self._done(total_steps, deadline):
                loss_sum += self.train_step()
                self.step, n_log = self.step + 1, n_log + 1
                if self.step % cfg.log_every == 0 or self._done(total_steps, deadline):
                    loss_sum, t_log, n_log = self._log(bar, loss_sum, t_log, n_log)
                    if total_steps is None and deadline is not None:
                        self.planned_steps = self._steps_by(deadline)
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

    def _steps_by(self, deadline: float) -> int:
        """The step this run will reach at `deadline` at its rate so far (the same number on every rank)."""
        start_step, start_time = self._started
        now = time.monotonic()
        rate = (self.step - start_step) / max(now - start_time, 1e-9)
        estimate = torch.tensor(self.step + rate * max(deadline - now, 0.0), device=self.device)
        return round(float(distributed.mean(estimate, self.device)))

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
        idx = batch_indices(cfg.seed, self.step, len(self.data), self.global_batch, self.weights)
        noise, flips = self.randomness_now()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_now()
        total = torch.zeros((), device=self.device)
        for k in range(accum):
            sl = distributed.rank_slice(k, micro, dist)  # this rank's slice of micro-batch k
            images, labels = self._micro_batch(idx[sl], k)
            with distributed.no_sync(self.net, last=k == accum - 1), autocast(self.device, cfg.precision):
                x0 = to_model_range(images.to(self.device, non_blocking=True))
                if self.config.data.hflip:
                    x0 = hflip(x0, flips[sl])
                y = labels.to(self.device) if self.config.data.conditional else None
                loss = self.loss(self.denoiser, x0, y, Noise(*(z[sl] for z in noise))).mean()
                self.scaler.scale(loss / accum).backward()
            total += loss.detach() / accum
        return self._optimizer_step(total)

    def randomness_now(self) -> tuple[Noise, torch.Tensor]:
        """(t, eps, u) of this optimizer step's global batch, t drawn as the loss says, and a flip coin per image."""
        c, size = self.config.in_channels, self.config.image_size
        shape = (self.global_batch, c, size, size)

        def draw(shape, device, generator):
            return self.loss.draw(self.schedule, shape, device, generator)

        return batch_randomness(self.config.train.seed, self.step, shape, self.schedule.T, self.device, draw)

    def lr_now(self) -> float:
        t = self.config.train
        return lr_at(self.step, t.lr, t.warmup, t.lr_schedule, self.planned_steps)

    def ema_decay_now(self) -> float:
        return ema_decay_at(self.step, self.config.train.ema_decay, self.config.train.ema_power)

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
            raise DdpmkitError(
                f"non-finite loss or gradient at step {self.step + 1}; the last checkpoint "
                "is intact (lower --lr, or pass --on-nan skip to skip such steps)"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.ema, self.model, self.ema_decay_now())
        return loss

    def _scaled_step(self, loss: torch.Tensor) -> torch.Tensor:
        """fp16: the scaler skips the step (and halves the scale) when the gradient overflowed."""
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.get_scale() >= scale:  # the step was taken; after a skipped one the EMA waits too
            ema_update(self.ema, self.model, self.ema_decay_now())
        return loss

    # ---- outputs -------------------------------------------------------------------------------

    def _log(self, bar, loss_sum, t_log, n_log):
        loss_sum = distributed.mean(loss_sum, self.device)
        now = time.monotonic()
        images = n_log * self.config.train.batch_size * self.dist.world_size * self.config.train.grad_accum
        row = {
            "step": self.step,
            "loss": float(loss_sum) / max(n_log, 1),
            "images_per_s": images / (now - t_log),
            "lr": self.optimizer.param_groups[0]["lr"],
            "nan_skipped": self.nan_skipped,
        }
        self.metrics.append(row)
        bar.update_to(self.step, row)
        return torch.zeros((), device=self.device), now, 0

    def _write_metrics(self) -> None:
        lines = "".join(json.dumps(m) + "\n" for m in self.metrics)
        try:
            atomic_write_text(self.run_dir / "metrics.jsonl", lines)
            viz.loss_curve(self.metrics, self.run_dir / "loss.png")
        except OSError as e:
            raise DdpmkitError(
                f"could not write the metrics in {self.run_dir}: {e.strerror or e}; the previous checkpoint is intact"
            ) from e

    def write_grid(self, config: RunConfig | None = None) -> None:
        """samples/step-N.png with the EMA weights and the sampling settings of `config` (the run's)."""
        if self.dist.rank != 0:
            return
        config = config or self.config
        (self.run_dir / "samples").mkdir(exist_ok=True)
        denoiser = build.denoiser(config, self.ema, self.schedule)
        write_grid(config, denoiser, self.run_dir / "samples" / f"step-{self.step:08d}.png", device=self.device)


def _enable_grad_checkpointing(model: nn.Module, arch: str) -> None:
    """Recompute activations in the backward pass instead of storing them (less memory, ~30% slower)."""
    if not hasattr(model, "set_grad_checkpointing"):
        raise DdpmkitError(f"--grad-checkpointing is available for --arch unet, not {arch}")
    model.set_grad_checkpointing(True)


def _check_global_batch(saved: int, now: int, config: RunConfig, world_size: int) -> None:
    """A resumed run keeps its global batch (data order and loss scale depend on it)."""
    if saved != now:
        t = config.train
        raise DdpmkitError(
            f"this run trained with a global batch of {saved} images per step, but {t.batch_size} "
            f"per process x {world_size} process(es) x --grad-accum {t.grad_accum} is {now}; "
            f"choose --batch-size and --grad-accum so that their product x {world_size} is {saved}"
        )


def _check_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Each parameter's optimizer state (Adam's moments) has the parameter's shape."""
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                raise ValueError(f"{key} of {name} has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}")


MAX_METRICS_BYTES = 64 << 20  # ~400,000 log lines: 20 million steps logged every 50


def _read_metrics(run_dir: Path) -> list[dict]:
    """The logged rows of metrics.jsonl, each an object with an integer step and a numeric loss."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    if path.stat().st_size > MAX_METRICS_BYTES:
        raise DdpmkitError(
            f"{path} is larger than {MAX_METRICS_BYTES:,} bytes; move it aside to resume (the loss history restarts)"
        )
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if not _metrics_row(row):
            raise DdpmkitError(f"{path} line {number} is not a row of metrics (an object with a step and a loss)")
        rows.append(row)
    return rows


def _metrics_row(row) -> bool:
    step, loss = (row.get("step"), row.get("loss")) if isinstance(row, dict) else (None, None)
    return type(step) is int and type(loss) in (int, float)  # type(), not isinstance(): a bool is an int


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
