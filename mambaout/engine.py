"""Training and evaluation loops, apart from the command line.

Both loops talk to the device only through a ``Runtime``; every random draw is keyed by
(seed, step, micro-batch) so the result does not depend on how the global batch is split (docs/DESIGN.md).
"""
from __future__ import annotations

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
    """Where the run is, and the loss record of the current log interval and epoch.

    Everything in here goes into a checkpoint; the per-step losses are kept as host floats and summed in
    step order, so a resumed run logs exactly the numbers of an uninterrupted one.
    """

    step: int = 0  # optimizer steps done since the start of the run
    epoch: int = 0  # the epoch in progress
    best_top1: float = -1.0
    best_epoch: int = -1
    nonfinite_skips: int = 0
    bad_images: int = 0
    interval_losses: list[float] = field(default_factory=list)  # per-step losses since the last log row
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, list) else value for key, value in vars(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def start_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.epoch_loss_sum, self.epoch_loss_steps = epoch, 0.0, 0

    @property
    def epoch_loss(self) -> float:
        return self.epoch_loss_sum / max(self.epoch_loss_steps, 1)


@dataclass
class StepLog:
    """One row of steps.csv: the loss averaged over the optimizer steps since the previous row; lr and
    gradient norm of the row's own step."""

    step: int
    epoch: int
    lr: float
    loss: float
    grad_norm: float
    img_per_s: float


PrepareBatch = Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]

MicroBatchLoss = Callable[[nn.Module, dict[str, Any], int, list[int]], torch.Tensor]
"""``(model, loader batch, optimizer step, global micro-batch ids the batch holds) -> loss``: what a task computes
for one micro-batch (its forward under ``runtime.autocast()``); the loop backpropagates it and owns the step.
Random draws are keyed by the step and micro-batch ids, never streamed (docs/DESIGN.md)."""


class NonFiniteLossError(RuntimeError):
    """A loss or gradient that is NaN or infinite; the weights were not updated with it."""


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


@dataclass
class TrainHooks:
    """How the trainer hears from the loop: a log row, the end of each optimizer step (periodic
    checkpoints), and whether to stop at the next step boundary (preemption)."""

    on_log: Callable[[StepLog], None] = lambda entry: None
    on_step_end: Callable[[], None] = lambda: None
    stop_requested: Callable[[], bool] = lambda: False


def classification_loss(criterion: nn.Module, runtime: Runtime, *, seed: int, mixup=None,
                        prepare_batch: PrepareBatch | None = None) -> MicroBatchLoss:
    """The ImageNet task's micro-batch loss: the batch prepared on the device, Mixup/CutMix keyed by (step,
    micro-batch), the keyed drop decisions of its samples, ``criterion`` on the logits. ``prepare_batch``: the
    input pipeline's last stage (default: images and targets moved as they are)."""
    prepare_batch = prepare_batch or runtime.batch_to_device

    def loss(model: nn.Module, batch: dict[str, Any], step: int, micro_ids: list[int]) -> torch.Tensor:
        images, targets = prepare_batch(batch)
        images, targets = mix_micro_batches(
            mixup, images, targets, [derive_seed(seed, "mix", step, m) for m in micro_ids])
        # stochastic depth and dropout decided per sample in the workers (no device generator)
        model_inputs = {"drop_draws": runtime.to_device(batch["drop"])} if "drop" in batch else {}
        with runtime.autocast():
            return criterion(model(images, **model_inputs), targets)
    return loss


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
    prepare_batch: PrepareBatch | None = None,
    **loop_options,
) -> bool:
    """The classification steps of ``state.epoch`` from ``state.step`` on: ``run_steps`` with
    ``classification_loss``; ``loop_options`` are ``run_steps``'s."""
    micro_loss = classification_loss(criterion, runtime, seed=seed, mixup=mixup, prepare_batch=prepare_batch)
    return run_steps(model, optimizer, schedule, loader, sampler, micro_loss, runtime, state, **loop_options)


def run_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule,
    loader: Iterable[dict[str, Any]],
    sampler,
    micro_loss: MicroBatchLoss,
    runtime: Runtime,
    state: TrainState,
    *,
    ema=None,
    clip_grad: float | None = None,
    skip_nonfinite: bool = False,
    max_steps: int | None = None,
    log_interval: int = 50,
    hooks: TrainHooks = TrainHooks(),
) -> bool:
    """Runs the optimizer steps of ``state.epoch`` from ``state.step`` on, until the epoch ends or ``state.step``
    reaches ``max_steps``: the task's ``micro_loss`` per micro-batch, the rest (accumulation, agreement, the
    update skipped on the device when not finite, EMA, reports) shared by every task.

    ``loader`` yields one batch per accumulation micro-step (``sampler.accum_steps`` per optimizer step),
    starting at an optimizer-step boundary. Returns True when it stopped early because a stop was requested on
    any process; every process stops at the same step.
    """
    model.train()
    accum_steps = sampler.accum_steps
    params = [p for p in model.parameters() if p.requires_grad]
    micro_losses: list[torch.Tensor] = []
    step_bad_images = torch.zeros((), dtype=torch.int64, device=runtime.device)
    reporter = _StepReporter(state, skip_nonfinite, log_interval, max_steps, hooks.on_log, sampler.global_batch_size)

    for micro_step, batch in enumerate(runtime.wrap_loader(loader)):
        accum_index = micro_step % accum_steps
        if accum_index == 0:
            schedule.set_step(state.step)
        if "bad" in batch:  # flags of unreadable images a dataset stood in for (the fine-tuning sets refuse them)
            # counted on the device, sharded like the targets: over every host's rows under SPMD
            step_bad_images = step_bad_images + runtime.to_device(batch["bad"]).sum()
        # the micro-batches this batch holds on the device: this process's, or under SPMD every host's
        micro_ids = sampler.micro_indices(accum_index, runtime.batch_shard_ids)

        is_last = accum_index == accum_steps - 1
        with runtime.gradient_sync(model, enabled=is_last):
            loss = micro_loss(model, batch, state.step, micro_ids)
            runtime.backward(loss / accum_steps)
        micro_losses.append(loss.detach())
        runtime.mark_step()
        if not is_last:
            continue

        losses = torch.stack(micro_losses)
        step_loss = losses.mean()
        grad_norm = runtime.unscale_and_clip(optimizer, params, clip_grad)
        finite, report = runtime.agree(runtime.step_is_finite(step_loss, grad_norm), hooks.stop_requested(),
                                       step_loss, grad_norm, step_bad_images)
        # the update, and the EMA's, are skipped on the device where the step is not finite: no host read here
        applied = runtime.optimizer_step(optimizer, finite)
        if ema is not None:
            update_ema(ema, runtime.unwrap(model), state.step + 1, applied)  # counted from 1, like timm
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        runtime.after_step(reporter.for_step(state.step, optimizer.param_groups[0]["lr"], losses), report)
        micro_losses.clear()
        step_bad_images = torch.zeros((), dtype=torch.int64, device=runtime.device)
        runtime.mark_step()
        hooks.on_step_end()
        if state.step == max_steps or reporter.stop_seen:
            runtime.read_pending()  # the last step's values, before the trainer evaluates or checkpoints
            return reporter.stop_seen
    runtime.read_pending()
    return False


def update_ema(ema, model: nn.Module, step: int, applied: torch.Tensor) -> None:
    """timm's EMA update (``ModelEmaV3``: lerp of the floating tensors towards the model's at its decay for
    ``step``), with weight 0 where ``applied`` (a device bool) says the optimizer step was skipped: the decision
    stays on the device."""
    weight = (1.0 - ema.get_decay(step)) * applied.float()
    averaged, current = [], []
    for ema_value, value in zip(ema.module.state_dict().values(), model.state_dict().values()):
        if ema_value.is_floating_point():
            averaged.append(ema_value)
            current.append(value)
        else:
            ema_value.copy_(value)
    with torch.no_grad():
        torch._foreach_lerp_(averaged, current, [weight] * len(averaged))


class _IntervalClock:
    """Throughput since the clock started or its last reading, over the steps it has counted: a log row's interval
    may have begun in the previous epoch (its losses carry over), but this clock only saw the steps since it
    started."""

    def __init__(self, images_per_step: int) -> None:
        self.images_per_step = images_per_step
        self.tick = time.perf_counter()
        self.steps = 0

    def count_step(self) -> None:
        self.steps += 1

    def img_per_s(self) -> float:
        now = time.perf_counter()
        rate = self.images_per_step * self.steps / max(now - self.tick, 1e-9)
        self.tick, self.steps = now, 0
        return rate


class _StepReporter:
    """The host side of each optimizer step, run once its values are read (``runtime.after_step``: at once, or
    a step later): a non-finite step stops the run naming it, or counts as skipped; a stop requested on any
    process is noted; the loss and unreadable images (over all processes) are recorded, and a log row written at
    the interval."""

    def __init__(self, state: TrainState, skip_nonfinite: bool, log_interval: int, max_steps: int | None,
                 on_log: Callable[[StepLog], None], images_per_step: int) -> None:
        self.state, self.skip_nonfinite = state, skip_nonfinite
        self.log_interval, self.max_steps, self.on_log = log_interval, max_steps, on_log
        self.clock = _IntervalClock(images_per_step)
        self.stop_seen = False

    def for_step(self, step: int, lr: float, micro_losses: torch.Tensor) -> Callable[[list[float]], None]:
        def report(values: list[float]) -> None:
            nonfinite, stop, loss, grad_norm, bad_images = values
            if nonfinite:
                self._nonfinite(step, micro_losses, grad_norm)
            self.stop_seen = self.stop_seen or bool(stop)
            self._record(step, lr, loss, grad_norm, bad_images, skipped=bool(nonfinite))
        return report

    def _nonfinite(self, step: int, micro_losses: torch.Tensor, grad_norm: float) -> None:
        if self.skip_nonfinite:
            self.state.nonfinite_skips += 1
            return
        raise NonFiniteLossError(
            f"non-finite training values at optimizer step {step}: micro-batch losses "
            f"{[round(v, 6) for v in micro_losses.tolist()]}, gradient norm {grad_norm:.6g}; the weights "
            "were not updated with them. Lower optim.lr or set optim.clip_grad, or set train.skip_nonfinite=true "
            "to skip such steps")

    def _record(self, step: int, lr: float, loss: float, grad_norm: float, bad_images: float,
                skipped: bool = False) -> None:
        state = self.state
        state.bad_images += int(bad_images)
        self.clock.count_step()
        state.interval_losses.append(loss)  # steps.csv shows a skipped step's loss as it was
        if not skipped:  # the epoch's mean is over the steps taken (one NaN would make it NaN)
            state.epoch_loss_sum += loss
            state.epoch_loss_steps += 1
        if step % self.log_interval == 0 or step == self.max_steps:
            losses = state.interval_losses
            self.on_log(StepLog(step=step, epoch=state.epoch, lr=lr, loss=sum(losses) / len(losses),
                                grad_norm=grad_norm, img_per_s=self.clock.img_per_s()))
            state.interval_losses = []


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
             *, collect_predictions: bool = False, on_batch: Callable[[int], None] = lambda n: None,
             prepare_batch: PrepareBatch | None = None) -> EvalResult:
    """Top-1/top-5/loss over every image exactly once across all shards.

    Each shard sees a disjoint part of the set (no padded duplicates); rows with target -1 (padding or an
    unreadable image) are masked out. The sums are reduced once, at the end. ``prepare_batch``: as in
    ``train_one_epoch``.
    """
    prepare_batch = prepare_batch or runtime.batch_to_device
    model.eval()
    # correct@1, correct@5, count as integers (exact at any dataset size, also on TPUs, which have no float64)
    counts = torch.zeros(3, dtype=torch.int64, device=runtime.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    bad_indices: list[int] = []
    predictions: list[tuple[int, int, list[int], list[float]]] = []
    for batch in runtime.wrap_loader(loader):
        bad_indices += batch["index"][batch["bad"]].tolist()
        images, targets = prepare_batch(batch)
        with runtime.autocast():
            logits = model(images)
        logits = logits.float()
        valid = targets >= 0
        safe_targets = targets.clamp(min=0)
        top_k = min(5, logits.shape[1])
        top_scores, top_classes = logits.softmax(dim=1).topk(top_k, dim=1)
        hits = top_classes == safe_targets[:, None]
        counts += torch.stack([(hits[:, 0] & valid).sum(), (hits.any(dim=1) & valid).sum(), valid.sum()])
        loss_sum += (F.cross_entropy(logits, safe_targets, reduction="none") * valid).sum().to(loss_sum.dtype)
        runtime.mark_step()
        if collect_predictions:
            predictions += _rows(batch["index"], batch["target"], runtime.host_rows(top_classes),
                                 runtime.host_rows(top_scores))
        on_batch(len(images))
    correct1, correct5, count = runtime.sum_across(counts).tolist()
    loss_sum = runtime.sum_across(loss_sum).item()
    bad_indices = sorted(i for part in runtime.gather_objects(bad_indices) for i in part)
    if collect_predictions:
        predictions = sorted(row for part in runtime.gather_objects(predictions) for row in part)
    denominator = max(count, 1)
    return EvalResult(top1=100.0 * correct1 / denominator, top5=100.0 * correct5 / denominator,
                      loss=loss_sum / denominator, count=count, bad_indices=bad_indices,
                      predictions=predictions)


def _rows(indices, targets, classes, scores) -> list[tuple[int, int, list[int], list[float]]]:
    """Per-image (index, target, top-k classes, top-k probabilities) of this process's images (host tensors),
    padding rows dropped."""
    if len(classes) != len(indices):
        raise RuntimeError(f"{len(classes)} output rows for the {len(indices)} images of this process's batch")
    classes, scores = classes.tolist(), scores.tolist()
    return [(i, t, c, s) for i, t, c, s in zip(indices.tolist(), targets.tolist(), classes, scores) if i >= 0]
