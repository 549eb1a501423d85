"""Optimizer and learning-rate schedule of the DeiT/MambaOut recipe, built on torch and timm."""
from __future__ import annotations

from torch import nn
from torch.optim import AdamW
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler


FUSED_DEVICES = ("cpu", "cuda", "tpu")
"""Where torch has a fused AdamW kernel (one pass over every parameter; on a CPU 3x faster than the per-tensor
loop torch picks there by default; TorchTPU registers its own). Elsewhere (XLA) torch's default implementation
runs."""


def create_optimizer(model: nn.Module, lr: float, weight_decay: float, eps: float,
                     betas: tuple[float, float], layer_decay: float | None = None) -> AdamW:
    """AdamW without weight decay on biases and normalisation weights (every 1-d parameter), fused where torch
    has the kernel for the parameters' device; frozen parameters are left out. ``layer_decay``: timm's layer-wise
    groups (by the model's ``group_matcher``), whose ``lr_scale`` the schedule applies."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    if layer_decay is None:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip)
    else:
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                          layer_decay=layer_decay)
    fused = all(p.device.type in FUSED_DEVICES for p in model.parameters())
    return AdamW(groups, lr=lr, eps=eps, betas=betas, fused=fused or None)


class LrSchedule:
    """Linear warm-up from ``warmup_lr``, cosine over ``epochs`` to ``min_lr``, then ``min_lr`` for the
    cool-down epochs (timm's ``CosineLRScheduler``, as in the reference trainer).

    The reference updates the lr once per epoch; ``per_step`` updates it every optimizer step with the same
    curve measured in steps. Either way ``set_step`` is a pure function of the optimizer step, so resuming
    needs no scheduler state.
    """

    def __init__(self, optimizer, *, epochs: int, warmup_epochs: int, warmup_lr: float, min_lr: float,
                 steps_per_epoch: int, per_step: bool) -> None:
        unit = steps_per_epoch if per_step else 1
        self.steps_per_epoch = steps_per_epoch
        self.per_step = per_step
        self._timm = CosineLRScheduler(optimizer, t_initial=epochs * unit, lr_min=min_lr,
                                       warmup_t=warmup_epochs * unit, warmup_lr_init=warmup_lr,
                                       t_in_epochs=not per_step)

    def set_step(self, step: int) -> None:
        """Sets the lr for optimizer step ``step`` (0-based, counted over the whole run)."""
        if self.per_step:
            self._timm.step_update(step)
        else:
            self._timm.step(step // self.steps_per_epoch)
