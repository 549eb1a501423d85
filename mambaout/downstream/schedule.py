"""Learning-rate schedules of the fine-tuning recipes (mmcv's, as the reference configs use them): a linear
warm-up over the first optimizer steps, times a step decay (Mask R-CNN's 1x: x0.1 at epochs 8 and 11) or a
polynomial decay (UperNet's 160k iterations). Both are pure functions of the optimizer step: resuming needs no
scheduler state."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from torch.optim import Optimizer


class WarmupSchedule:
    """``lr x decay(step)``, scaled during the first ``warmup_steps`` by a factor rising linearly from
    ``warmup_ratio`` to 1 (mmcv's linear warm-up); the same lr for every parameter group (no layer-wise decay)."""

    def __init__(self, optimizer: Optimizer, lr: float, *, warmup_steps: int, warmup_ratio: float,
                 decay: Callable[[int], float]) -> None:
        self.optimizer, self.lr = optimizer, lr
        self.warmup_steps, self.warmup_ratio, self.decay = warmup_steps, warmup_ratio, decay

    def lr_at(self, step: int) -> float:
        lr = self.lr * self.decay(step)
        if step < self.warmup_steps:
            lr *= 1 - (1 - self.warmup_ratio) * (1 - step / self.warmup_steps)
        return lr

    def set_step(self, step: int) -> None:
        """Sets the lr of optimizer step ``step`` (0-based, counted over the whole run)."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr


def step_decay(milestones: Sequence[int], gamma: float) -> Callable[[int], float]:
    """x ``gamma`` at each milestone step passed."""
    return lambda step: gamma ** sum(step >= milestone for milestone in milestones)


def poly_decay(total_steps: int, power: float, min_ratio: float) -> Callable[[int], float]:
    """``(1 - step / total_steps) ** power`` from 1 down to ``min_ratio`` (min lr / lr)."""
    return lambda step: (1 - min_ratio) * (1 - step / total_steps) ** power + min_ratio
