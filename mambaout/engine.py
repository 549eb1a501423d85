"""Training and evaluation loops, apart from the command line.

Both loops talk to the device only through a ``Runtime``; every random draw is keyed by
(seed, step, micro-batch) so the result does not depend on how the global batch is split (docs/DESIGN.md).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from .data.sampling import derive_seed
from .data.transforms import mixup_micro_batch
from .runtime import Runtime


@dataclass
class TrainState:
    """Where the run is; everything else about the position is derived from it."""

    step: int = 0  # optimizer steps done since the start of the run
    epoch: int = 0  # the epoch in progress
    best_top1: float = -1.0
    best_epoch: int = -1
    nonfinite_skips: int = 0
    bad_images: int = 0

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class StepLog:
    """What one optimizer step reports (at ``log_interval``)."""

    step: int
    epoch: int
    lr: float
    loss: float
    grad_norm: float
    img_per_s: float


class NonFiniteLossError(RuntimeError):
    pass


def create_criterion(mixup_enabled: bool, label_smoothing: float) -> nn.Module:
    """Soft-target loss when Mixup/CutMix already smooth the targets, as in DeiT."""
    if mixup_enabled:
        return SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return nn.CrossEntropyLoss()


def mix_micro_batches(mixup, images: torch.Tensor, targets: torch.Tensor, seeds: list[int]):
    """Mixup/CutMix each micro-batch on its own with its own keyed draw (a process may feed several)."""
    if mixup is None:
        return images, targets
    if len(seeds) == 1:
        return mixup_micro_batch(mixup, images, targets, seeds[0])
    parts = [mixup_micro_batch(mixup, x, y, seed)
             for x, y, seed in zip(images.chunk(len(seeds)), targets.chunk(len(seeds)), seeds)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule,
    loader: Iterable[dict[str, torch.Tensor]],
    sampler,
    criterion: nn.Module,
    runtime: Runtime,
    state: TrainState,
    *,
    seed: int,
    mixup=None,
    ema=None,
    clip_grad: float | None = None,
    skip_nonfinite: bool = False,
    max_steps: int | None = None,
    log_interval: int = 50,
    on_log: Callable[[StepLog], None] = lambda log: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> float:
    """Runs the optimizer steps of ``state.epoch`` from ``state.step`` on; returns the epoch's mean loss.

    ``loader`` yields one batch per accumulation micro-step (``sampler.accum_steps`` per optimizer step),
    starting at an optimizer-step boundary. ``should_stop`` is polled at each step boundary (preemption).
    """
    model.train()
    accum_steps = sampler.accum_steps
    params = [p for p in model.parameters() if p.requires_grad]
    images_per_step = sampler.global_batch_size
    step_loss = torch.zeros((), device=runtime.device)
    interval_loss = torch.zeros((), device=runtime.device)
    epoch_loss, epoch_steps, interval_steps = 0.0, 0, 0
    tick = time.perf_counter()

    for micro_step, batch in enumerate(runtime.wrap_loader(loader)):
        accum_index = micro_step % accum_steps
        if accum_index == 0:
            schedule.set_step(state.step)
        state.bad_images += int(batch["bad"].sum())
        images, targets = runtime.batch_to_device(batch)
        micro_ids = sampler.micro_indices(accum_index)
        images, targets = mix_micro_batches(
            mixup, images, targets, [derive_seed(seed, "mix", state.step, m) for m in micro_ids])
        runtime.seed_device_rng(derive_seed(seed, "drop", state.step, micro_ids[0]))

        is_last = accum_index == accum_steps - 1
        with runtime.gradient_sync(model, enabled=is_last):
            with runtime.autocast():
                loss = criterion(model(images), targets)
            runtime.backward(loss / accum_steps)
        step_loss += loss.detach()
        runtime.mark_step()
        if not is_last:
            continue

        grad_norm = runtime.optimizer_step(optimizer, params, clip_grad)
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model, step=state.step)
        state.step += 1
        interval_loss += step_loss / accum_steps
        step_loss.zero_()
        interval_steps += 1
        runtime.mark_step()

        if state.step % log_interval == 0 or state.step == max_steps:
            mean_loss = runtime.sum_across(interval_loss).item() / (interval_steps * runtime.world_size)
            if not math.isfinite(mean_loss):
                raise NonFiniteLossError(f"loss became {mean_loss} at optimizer step {state.step}")
            elapsed = time.perf_counter() - tick
            on_log(StepLog(step=state.step, epoch=state.epoch, lr=optimizer.param_groups[0]["lr"],
                           loss=mean_loss, grad_norm=float(grad_norm),
                           img_per_s=images_per_step * interval_steps / max(elapsed, 1e-9)))
            epoch_loss += mean_loss * interval_steps
            epoch_steps += interval_steps
            interval_loss.zero_()
            interval_steps, tick = 0, time.perf_counter()
        if state.step == max_steps or should_stop():
            break
    if interval_steps:
        epoch_loss += runtime.sum_across(interval_loss).item() / runtime.world_size
        epoch_steps += interval_steps
    return epoch_loss / max(epoch_steps, 1)


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    count: int
    bad_indices: list[int] = field(default_factory=list)
    predictions: list[tuple[int, int, list[int], list[float]]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "count": self.count}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict[str, torch.Tensor]], runtime: Runtime,
             *, collect_predictions: bool = False, on_batch: Callable[[int], None] = lambda n: None
             ) -> EvalResult:
    """Top-1/top-5/loss over every image exactly once across all shards.

    Each shard sees a disjoint part of the set (no padded duplicates); rows with target -1 (padding or an
    unreadable image) are masked out. The sums are reduced once, at the end.
    """
    model.eval()
    # correct@1, correct@5, loss sum, count: float64 so that the counts stay exact at any dataset size
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)
    bad_indices: list[int] = []
    predictions: list[tuple[int, int, list[int], list[float]]] = []
    for batch in runtime.wrap_loader(loader):
        bad_indices += batch["index"][batch["bad"]].tolist()
        images, targets = runtime.batch_to_device(batch)
        with runtime.autocast():
            logits = model(images)
        logits = logits.float()
        valid = targets >= 0
        safe_targets = targets.clamp(min=0)
        top_k = min(5, logits.shape[1])
        top_scores, top_classes = logits.softmax(dim=1).topk(top_k, dim=1)
        hits = top_classes == safe_targets[:, None]
        totals += torch.stack([
            (hits[:, 0] & valid).sum(),
            (hits.any(dim=1) & valid).sum(),
            (F.cross_entropy(logits, safe_targets, reduction="none") * valid).sum(),
            valid.sum(),
        ]).to(torch.float64)
        runtime.mark_step()
        if collect_predictions:
            predictions += _rows(batch["index"], batch["target"], top_classes, top_scores)
        on_batch(len(images))
    correct1, correct5, loss_sum, count = runtime.sum_across(totals).tolist()
    bad_indices = sorted(i for part in runtime.gather_objects(bad_indices) for i in part)
    if collect_predictions:
        predictions = sorted(row for part in runtime.gather_objects(predictions) for row in part)
    count = int(count)
    denominator = max(count, 1)
    return EvalResult(top1=100.0 * correct1 / denominator, top5=100.0 * correct5 / denominator,
                      loss=loss_sum / denominator, count=count, bad_indices=bad_indices,
                      predictions=predictions)


def _rows(indices, targets, classes, scores) -> list[tuple[int, int, list[int], list[float]]]:
    """Per-image (index, target, top-k classes, top-k probabilities), padding rows dropped."""
    classes, scores = classes.cpu().tolist(), scores.cpu().tolist()
    return [(i, t, c, s) for i, t, c, s in zip(indices.tolist(), targets.tolist(), classes, scores) if i >= 0]
