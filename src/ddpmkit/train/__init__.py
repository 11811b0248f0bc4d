"""Training: the Trainer loop, DistributedDataParallel helpers, streaming data.

trainer      EMA, learning-rate schedule, data order, the Trainer (log, grid, checkpoint, resume)
distill      progressive distillation: the Distiller, rounds of DistillLoss on the Trainer
distributed  torchrun / DDP helpers only
stream       the training data in memory, or a folder streamed by DataLoader workers
"""

from ddpmkit.train.trainer import Trainer

__all__ = ["Trainer"]
