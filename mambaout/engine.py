"""Training and evaluation loops, apart from the command line.

Both loops talk to the device only through a ``Runtime``; every random draw is keyed by
(seed, step, micro-batch) so the result does not depend on how the global batch is split (docs/DESIGN.md).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

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
    gradient norm of the row's own step; the throughput and a step's seconds waiting for data (``data_s``) and
    computing (``compute_s``: the rest of its wall time), over the steps of the row that this stretch of steps
    timed (``StepClock``), so that ``data_s + compute_s = images per step / img_per_s``."""

    step: int
    epoch: int
    lr: float
    loss: float
    grad_norm: float
    img_per_s: float
    data_s: float
    compute_s: float


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


_END = object()  # the end of a loader, for next()


class StepClock:
    """Where the loop's host time goes, on the host's clock alone (``time.perf_counter``: no device read, no
    synchronisation). ``batches`` times each wait for the loader; ``lap`` closes an optimizer step: its data wait
    (the waits for its micro-batches) and the rest of its wall time since the previous lap, its compute, so the two
    add up to the step's wall time. Time spent ``outside`` the steps (the trainer's hooks: log rows, checkpoints)
    counts in neither.

    The host measures what it waits for: on CPU a step's compute is its computation; on CUDA, where the host
    queues work ahead of the GPU, it is the host's time queuing the step plus its waits for the GPU (at the
    deferred read of an earlier step's report), the GPU's pace over a few steps; on XLA, the time tracing the step
    plus the wait for the previous step's graph to run, at its step closure."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        """A new stretch of steps (``run_steps``): the totals cleared, the first step timed from now."""
        self.first_batch = 0.0  # the wait for the stretch's first batch (the loader's start-up included)
        self.data = 0.0  # every wait for the loader in the stretch, the first batch's included
        self._step_data = self._paused = 0.0
        self._outside = 0
        self._mark = time.perf_counter()

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """``loader``'s batches; the wait for each (``iter`` and ``next``, whatever the runtime's wrapper does in
        them) counted as the current step's data wait. The first one's is also ``first_batch``."""
        started = time.perf_counter()
        batches = iter(loader)
        first = True
        while True:
            batch = next(batches, _END)
            waited = time.perf_counter() - started
            self.data += waited
            self._step_data += waited
            if first:
                self.first_batch, first = waited, False
            if batch is _END:
                return
            yield batch
            started = time.perf_counter()

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        """Time the steps do not count (a hook writing a log row or a checkpoint); nested uses count once."""
        self._outside += 1
        started = time.perf_counter()
        try:
            yield
        finally:
            self._outside -= 1
            if self._outside == 0:
                self._paused += time.perf_counter() - started

    def lap(self) -> tuple[float, float]:
        """(data, compute) seconds of the optimizer step that ends now: its waits for the loader, and the rest of
        the wall time since the previous lap (or the start), time ``outside`` the steps excluded."""
        now = time.perf_counter()
        wall = now - self._mark - self._paused
        data = self._step_data
        self._mark, self._step_data, self._paused = now, 0.0, 0.0
        return data, max(wall - data, 0.0)


@dataclass
class TrainHooks:
    """How the trainer hears from the loop: a log row, the end of each optimizer step (periodic
    checkpoints), whether to stop at the next step boundary (preemption), and the clock of the loop's host time
    (``clock.first_batch`` and ``clock.data`` after a stretch of steps)."""

    on_log: Callable[[StepLog], None] = lambda entry: None
    on_step_end: Callable[[], None] = lambda: None
    stop_requested: Callable[[], bool] = lambda: False
    clock: StepClock = field(default_factory=StepClock)


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

    ``hooks.clock`` times each step on the host (its data wait and compute, into its report: read with it, no
    host sync added); the hooks' own time (log rows, checkpoints) is left out of the steps'.
    """
    model.train()
    accum_steps = sampler.accum_steps
    params = [p for p in model.parameters() if p.requires_grad]
    micro_losses: list[torch.Tensor] = []
    step_bad_images = torch.zeros((), dtype=torch.int64, device=runtime.device)
    clock = hooks.clock

    def on_log(entry: StepLog) -> None:
        with clock.outside():
            hooks.on_log(entry)

    reporter = _StepReporter(state, skip_nonfinite, log_interval, max_steps, on_log, sampler.global_batch_size)
    ema_tensors = EmaTensors(ema, runtime.unwrap(model)) if ema is not None else None
    clock.start()

    for micro_step, batch in enumerate(clock.batches(runtime.wrap_loader(loader))):
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
        if ema_tensors is not None:
            ema_tensors.update(state.step + 1, applied)  # counted from 1, like timm
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        # the step ends once the host has issued it: its seconds travel with its report
        times = clock.lap()
        runtime.after_step(reporter.for_step(state.step, optimizer.param_groups[0]["lr"], losses, times), report)
        micro_losses.clear()
        step_bad_images = torch.zeros((), dtype=torch.int64, device=runtime.device)
        runtime.mark_step()
        with clock.outside():
            hooks.on_step_end()
        if state.step == max_steps or reporter.stop_seen:
            runtime.read_pending()  # the last step's values, before the trainer evaluates or checkpoints
            return reporter.stop_seen
    runtime.read_pending()
    return False


class EmaTensors:
    """The EMA's tensors paired with the model's, listed once (not two ``state_dict()`` per step): the floating
    ones are averaged, the rest (integer buffers) copied."""

    def __init__(self, ema, model: nn.Module) -> None:
        self.ema = ema
        self.averaged, self.current, self.copied, self.sources = [], [], [], []
        for ema_value, value in zip(ema.module.state_dict().values(), model.state_dict().values()):
            if ema_value.is_floating_point():
                self.averaged.append(ema_value)
                self.current.append(value)
            else:
                self.copied.append(ema_value)
                self.sources.append(value)

    def update(self, step: int, applied: torch.Tensor) -> None:
        """timm's EMA update (``ModelEmaV3``: the floating tensors moved towards the model's by ``1 - decay``
        for ``step``), with weight 0 where ``applied`` (a device bool) says the optimizer step was skipped: the
        decision stays on the device. Written as three multi-tensor ops: a lerp with a tensor weight has no
        multi-tensor kernel and would launch one kernel per tensor."""
        weight = (1.0 - self.ema.get_decay(step)) * applied.float()
        with torch.no_grad():
            if self.copied:
                torch._foreach_copy_(self.copied, self.sources)
            moves = torch._foreach_sub(self.current, self.averaged)
            torch._foreach_mul_(moves, weight)
            torch._foreach_add_(self.averaged, moves)


class _IntervalTimes:
    """The timed steps of a log row: throughput and mean seconds per step over the steps this stretch timed. A log
    row's interval may have begun in the previous epoch (its losses carry over), but the steps of that stretch were
    timed by its own clock, not this one."""

    def __init__(self, images_per_step: int) -> None:
        self.images_per_step = images_per_step
        self.steps, self.data, self.compute = 0, 0.0, 0.0

    def count_step(self, data: float, compute: float) -> None:
        self.steps += 1
        self.data += data
        self.compute += compute

    def read(self) -> dict[str, float]:
        """img_per_s, data_s and compute_s of the steps counted since the last reading."""
        steps = max(self.steps, 1)
        values = {"img_per_s": self.images_per_step * self.steps / max(self.data + self.compute, 1e-9),
                  "data_s": self.data / steps, "compute_s": self.compute / steps}
        self.steps, self.data, self.compute = 0, 0.0, 0.0
        return values


class _StepReporter:
    """The host side of each optimizer step, run once its values are read (``runtime.after_step``: at once, or
    a step later): a non-finite step stops the run naming it, or counts as skipped; a stop requested on any
    process is noted; the loss and unreadable images (over all processes) are recorded, and a log row written at
    the interval."""

    def __init__(self, state: TrainState, skip_nonfinite: bool, log_interval: int, max_steps: int | None,
                 on_log: Callable[[StepLog], None], images_per_step: int) -> None:
        self.state, self.skip_nonfinite = state, skip_nonfinite
        self.log_interval, self.max_steps, self.on_log = log_interval, max_steps, on_log
        self.times = _IntervalTimes(images_per_step)
        self.stop_seen = False

    def for_step(self, step: int, lr: float, micro_losses: torch.Tensor,
                 times: tuple[float, float]) -> Callable[[list[float]], None]:
        """The report of ``step``; ``times``: its (data, compute) seconds from ``StepClock.lap``."""
        def report(values: list[float]) -> None:
            nonfinite, stop, loss, grad_norm, bad_images = values
            if nonfinite:
                self._nonfinite(step, micro_losses, grad_norm)
            self.stop_seen = self.stop_seen or bool(stop)
            self._record(step, lr, loss, grad_norm, bad_images, times, skipped=bool(nonfinite))
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
                times: tuple[float, float], skipped: bool = False) -> None:
        state = self.state
        state.bad_images += int(bad_images)
        self.times.count_step(*times)
        state.interval_losses.append(loss)  # steps.csv shows a skipped step's loss as it was
        if not skipped:  # the epoch's mean is over the steps taken (one NaN would make it NaN)
            state.epoch_loss_sum += loss
            state.epoch_loss_steps += 1
        if step % self.log_interval == 0 or step == self.max_steps:
            losses = state.interval_losses
            self.on_log(StepLog(step=step, epoch=state.epoch, lr=lr, loss=sum(losses) / len(losses),
                                grad_norm=grad_norm, **self.times.read()))
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
