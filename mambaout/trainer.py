"""One training run from a resolved config: build everything, resume if asked, loop over epochs, evaluate,
checkpoint, and stop cleanly on preemption.

Read top to bottom: ``train`` is the whole story; the helpers below it each build or decide one thing. The public
ones (resuming, the loop over epochs, checkpoint payload, provenance, loaders) are what every training command
shares: the fine-tuning runs of ``mambaout.downstream`` are built from them too.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields
from typing import Any, Callable, Collection, Iterator

import torch
from torch.utils.data import DataLoader

from . import checkpoint
from .checkpoint import CheckpointFolder
from .config import (Config, ConfigError, Schema, TrackingConfig, config_from_dict, derive, diff_configs, load_config,
                     parse_cli)
from .data import EvalBatchSampler, MicroBatchSampler, build_dataset, build_mixup, dataset_fingerprint
from .data.pipeline import Pipeline, build_pipeline
from .data.sources import describe_data_change, plan_reads, shuffle_for, source_options
from .data.sampling import derive_seed, with_drop_draws
from .engine import (NonFiniteLossError, StepClock, StepLog, TrainHooks, TrainState, create_criterion, evaluate,
                     train_one_epoch)
from .models import create_model, freeze
from .models.info import count_macs
from .optim import LrSchedule, create_optimizer
from .runtime import Runtime, runtime_from_config
from .runtime.peaks import matmul_math, peak_tflops
from .tracking import Progress, RunFolder, RunLock, build_manifest, holds_a_run
from .validation import build_eval_dataset

log = logging.getLogger("mambaout")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; scripts/train_until_done.sh relaunches on it
NONFINITE_EXIT_CODE = 3

# Keys that may change between a run and its resumption without changing what is computed.
# (train.compile and runtime.device are not: they change float rounding, so the run would not be bit-identical.)
HARMLESS_ON_RESUME = frozenset({
    "data.root", "data.num_workers", "data.cache_dir", "data.cache_limit_gb", "data.read_ahead_steps",
    "data.read_threads", "data.read_request_mb", "data.read_gap_mb", "data.read_retries", "train.max_steps",
    "train.output_dir", "train.log_interval",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "train.skip_nonfinite", "eval.every_epochs",
    "eval.batch_size", "runtime.dist_timeout_s", "runtime.peak_tflops",
    *(f"tracking.{key.name}" for key in fields(TrackingConfig)),  # trackers watch the run, never change it
})


class ResumeError(RuntimeError):
    pass


def command_main(parser: argparse.ArgumentParser, argv, program: str, schema: type[Schema],
                 run: Callable[[Any, str], Any]) -> int:
    """The body of a training command (train.py, scripts/finetune_*.py): ``--resume`` and the config arguments
    parsed, ``run(cfg, resume)`` run; the exit status: 0 done, 3 non-finite loss (its message printed),
    ``PREEMPTED_EXIT_CODE`` when preempted (and the marker file of scripts/train_until_done.sh touched)."""
    parser.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                        help="auto (default): continue from the run folder's newest checkpoint when there is one "
                             "of a compatible config; never: always start fresh; PATH: continue from that checkpoint")
    args, cfg = parse_cli(parser, argv, schema)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        outcome = run(cfg, args.resume)
    except NonFiniteLossError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return NONFINITE_EXIT_CODE
    if not outcome.preempted:
        return 0
    # torchrun reports any worker failure as status 1, so the relaunch wrapper also looks for this file.
    marker = os.environ.get("MAMBAOUT_PREEMPTED_MARKER")
    if marker:
        Path(marker).touch()
    return PREEMPTED_EXIT_CODE


@dataclass
class TrainOutcome:
    final_eval: dict[str, Any]
    best_top1: float
    step: int
    preempted: bool = False


def train(cfg: Config, resume: str = "auto") -> TrainOutcome:
    """Trains as ``cfg`` says. ``resume``: "auto" (continue the checkpoint in the run folder, if any, when its
    config is compatible), "never", or the path of a checkpoint to continue from."""
    runtime = runtime_from_config(cfg)
    with runtime.session(), ExitStack() as held:
        derived = derive(cfg, runtime.num_shards)
        # One job per run folder, from before anything in it is read for resuming or written until the end.
        held.enter_context(RunLock(derived.output_dir, enabled=runtime.is_main))
        folder = CheckpointFolder(derived.output_dir, keep=cfg.train.keep_checkpoints)
        saved = checkpoint_to_resume(folder, resume)
        runtime.assert_same("the step to resume from", saved and saved["train_state"]["step"])
        pipeline = build_pipeline(cfg, runtime.kind, runtime.fixed_shapes)
        train_set, val_set = _build_datasets(cfg, pipeline)
        fingerprint = dataset_fingerprint(train_set)
        if saved is not None:
            check_resumable(cfg, saved, fingerprint, HARMLESS_ON_RESUME)
        try:  # before the run folder exists: a mistake here leaves nothing behind
            sampler = MicroBatchSampler(len(train_set), cfg.optim.global_batch_size, cfg.train.micro_batch_size,
                                        runtime.num_shards, runtime.shard_ids, cfg.train.seed,
                                        shuffle=shuffle_for(cfg.data, train_set))
        except ValueError as error:
            raise ConfigError(f"data.root={cfg.data.root}: {error}") from None
        num_classes = _num_classes(cfg, train_set)
        torch.manual_seed(derive_seed(cfg.train.seed, "init"))  # the same initial weights on every rank
        try:
            model = create_model(cfg.model.name, checkpoint=cfg.model.checkpoint if saved is None else None,
                                 num_classes=num_classes, drop_path_rate=cfg.model.drop_path_rate,
                                 head_dropout=cfg.model.head_dropout,
                                 grad_checkpointing=cfg.model.grad_checkpointing)
        except ValueError as error:  # an unknown name, with the closest ones
            raise ConfigError(f"model.name: {error}") from None
        drop_sites = _drop_sites(model, cfg)
        mfu = mfu_meter(model, cfg, runtime)  # counted on the host model, before it moves
        reuse_folder = saved is not None or (
            resume == "auto" and same_config_without_checkpoint(folder, cfg, HARMLESS_ON_RESUME))
        run = held.enter_context(RunFolder(derived.output_dir, enabled=runtime.is_main, resume=reuse_folder))
        if saved is not None and runtime.is_main:
            folder.set_aside_after(saved["train_state"]["step"])  # resuming an older one discards its future
        announce(runtime, derived, cfg, saved)
        if runtime.is_main:
            log.info("input pipeline: %s, augmentation on the %s", pipeline.name,
                     "device" if pipeline.augment_on == "device" else "data workers")
        if saved is not None:
            model.load_state_dict(saved["model"])
        freeze(model, cfg.model.freeze)
        train_model = runtime.prepare_model(model, cfg.train.channels_last)
        if cfg.train.compile:
            train_model = runtime.compile(train_model)
        optimizer = create_optimizer(model, derived.lr, cfg.optim.weight_decay, cfg.optim.eps,
                                     tuple(cfg.optim.betas), cfg.optim.layer_decay)
        ema = build_ema(model, cfg)
        mixup = build_mixup(cfg.aug.mixup_alpha, cfg.aug.cutmix_alpha, cfg.aug.mixup_prob,
                            cfg.aug.mixup_switch_prob, cfg.aug.mixup_mode, cfg.aug.label_smoothing, num_classes)
        criterion = create_criterion(mixup is not None, cfg.aug.label_smoothing)
        state = TrainState()
        if saved is not None:
            restore(saved, optimizer, ema, runtime, state)

        schedule = LrSchedule(optimizer, epochs=cfg.sched.epochs, warmup_epochs=cfg.sched.warmup_epochs,
                              warmup_lr=cfg.sched.warmup_lr, min_lr=cfg.sched.min_lr,
                              steps_per_epoch=sampler.steps_per_epoch, per_step=cfg.sched.per_step)
        collate = with_drop_draws(pipeline.train.collate, drop_sites) if drop_sites else pipeline.train.collate
        train_batches = plan_reads(train_set, sampler, cfg.data, host_shard_ids=runtime.host_shard_ids,
                                   plans=runtime.plans_reads)
        train_loader = build_loader(train_set, train_batches, cfg.data.num_workers, runtime, collate)
        val_batches = plan_reads(val_set, _eval_sampler(len(val_set), cfg, runtime), cfg.data)
        val_loader = build_loader(val_set, val_batches, cfg.data.num_workers, runtime, pipeline.eval.collate)
        prepare_train, prepare_eval = pipeline.train.prepare(runtime), pipeline.eval.prepare(runtime)
        record_provenance(run, cfg, derived, runtime, train_set.classes, state, saved,
                          input_pipeline=pipeline.describe(),
                          dataset={"train": fingerprint, "val": dataset_fingerprint(val_set)})

        total_steps = derived.total_epochs * sampler.steps_per_epoch
        if cfg.train.max_steps is not None:
            total_steps = min(total_steps, cfg.train.max_steps)
        plan = RunPlan(sampler.steps_per_epoch, total_steps, eval_every_epochs=cfg.eval.every_epochs,
                       checkpoint_every_steps=cfg.train.checkpoint_every_steps)

        def train_steps(hooks: TrainHooks, stop_at: int) -> bool:
            return train_one_epoch(
                train_model, optimizer, schedule, train_loader, sampler, criterion, runtime, state,
                seed=cfg.train.seed, mixup=mixup, ema=ema, clip_grad=cfg.optim.clip_grad,
                skip_nonfinite=cfg.train.skip_nonfinite, max_steps=stop_at,
                log_interval=cfg.train.log_interval, hooks=hooks, prepare_batch=prepare_train)

        final_eval: dict[str, Any] = {}

        def evaluate_and_log(timing: EpochTiming) -> bool:
            nonlocal final_eval
            with timing.part("eval"):
                final_eval = _evaluate_epoch(model, ema, val_loader, runtime, prepare_eval)
            _log_epoch(run, state, optimizer, final_eval, cfg, timing, runtime.peak_memory_mib())
            score = final_eval["ema_top1" if cfg.eval.use_ema and ema is not None else "top1"]
            is_best = score > state.best_top1
            if is_best:
                state.best_top1, state.best_epoch = score, state.epoch
            return is_best

        def payload() -> dict[str, Any]:
            return checkpoint_payload(model, ema, optimizer, runtime, state, cfg, train_set.classes, fingerprint)

        preempted = run_epochs(plan, state, sampler, runtime, folder, payload=payload,
                               on_log=step_logger(run, plan, state, runtime, mfu, data_counters(train_set)),
                               train_steps=train_steps,
                               evaluate_and_log=evaluate_and_log)
        return TrainOutcome(final_eval, state.best_top1, state.step, preempted=preempted)


@dataclass(frozen=True)
class RunPlan:
    """When a run stops its steps to evaluate (and checkpoint), and when it checkpoints between evaluations."""

    steps_per_epoch: int
    total_steps: int
    eval_every_epochs: int | None = None  # at the end of every n-th epoch ...
    eval_every_steps: int | None = None  # ... or every n optimizer steps; and at the end of the run either way
    checkpoint_every_steps: int | None = None

    def evaluated_after(self, step: int) -> bool:
        if step >= self.total_steps:
            return True
        if self.eval_every_steps is not None:
            return step % self.eval_every_steps == 0
        return step % self.steps_per_epoch == 0 and (step // self.steps_per_epoch) % self.eval_every_epochs == 0

    def stop_at(self, step: int) -> int:
        """The step at which the steps started at ``step`` return at the latest (they also return at the end of
        the epoch): the end of the run, or the next evaluation by steps."""
        if self.eval_every_steps is None:
            return self.total_steps
        return min(self.total_steps, (step // self.eval_every_steps + 1) * self.eval_every_steps)

    def checkpoint_due(self, step: int) -> bool:
        """A periodic checkpoint, where no evaluation writes one anyway."""
        every = self.checkpoint_every_steps
        return every is not None and step % every == 0 and not self.evaluated_after(step)


@dataclass(frozen=True)
class EpochTimes:
    """Where the wall time between two metrics.csv rows went (``EpochTiming.cut``), in seconds."""

    seconds: float  # the wall time since the previous row (or since the steps started)
    steps: int  # optimizer steps taken meanwhile
    first_batch: float  # waits for the first batch of each stretch of steps (the loader's start-up included)
    train: float  # the steps, from their first batch on
    data_wait: float  # of which waiting for the loader
    eval: float
    checkpoint: float  # checkpoint writes and the syncs before them
    log: float  # step rows, the previous metrics row, TensorBoard, curves.png, the log lines
    since: str  # what the time is counted from, in words

    @property
    def train_seconds(self) -> float:
        """The steps' wall time (the first batch's wait included; evaluation, checkpoints and logging excluded)."""
        return self.first_batch + self.train

    def img_per_s(self, images_per_step: int) -> float:
        return self.steps * images_per_step / max(self.train_seconds, 1e-9)

    def columns(self) -> dict[str, float]:
        """metrics.csv's ``epoch_seconds`` and ``tracking.EPOCH_TIME_COLUMNS``."""
        return {"epoch_seconds": self.seconds, "first_batch_s": self.first_batch, "train_s": self.train,
                "data_wait_s": self.data_wait, "eval_s": self.eval, "checkpoint_s": self.checkpoint,
                "log_s": self.log}

    def summary(self) -> str:
        """The one-line breakdown train.py prints with each metrics row."""
        return (f"took {_secs(self.seconds)} s {self.since}: train {_secs(self.train)} (data wait "
                f"{_secs(self.data_wait)}), first batch {_secs(self.first_batch)}, eval {_secs(self.eval)}, "
                f"checkpoint {_secs(self.checkpoint)}, logging {_secs(self.log)}")


def _secs(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds >= 10 else f"{seconds:.2f}"


class EpochTiming:
    """Where a run's wall time goes, row by row of metrics.csv: each row accounts for the time since the previous
    row was taken (``cut``), so the rows partition the run from its first step to its last evaluation. The parts:
    the stretches of steps (``training``: their first batch, the steps, of which data waits, from the loop's
    ``StepClock``) and what the trainer times itself (``part``: eval, checkpoint, log; nested parts count in the
    innermost). A row is written before its checkpoint (a run killed in between writes it again), so the writing
    of a row, the figure and the checkpoint after it count in the next row."""

    PARTS = ("first_batch", "train", "data_wait", "eval", "checkpoint", "log")
    _OUTSIDE_TRAIN = ("eval", "checkpoint", "log")

    def __init__(self) -> None:
        self._nested: list[float] = []  # per open part: the seconds of the parts opened inside it
        self._since = "since the steps started"
        self._begin(time.perf_counter())

    def _begin(self, now: float) -> None:
        self.start = now
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.steps = 0

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Counts the time inside as ``name`` (one of eval, checkpoint, log)."""
        started = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.seconds[name] += elapsed - self._nested.pop()
            if self._nested:
                self._nested[-1] += elapsed

    @contextmanager
    def training(self, clock: StepClock, state: TrainState) -> Iterator[None]:
        """A stretch of steps, timed by ``clock`` (the loop's): its wall time less the parts timed inside it (log
        rows, periodic checkpoints) is its first batch's wait and its steps'."""
        started, step = time.perf_counter(), state.step
        outside = sum(self.seconds[name] for name in self._OUTSIDE_TRAIN)
        yield
        wall = time.perf_counter() - started
        inside = sum(self.seconds[name] for name in self._OUTSIDE_TRAIN) - outside
        self.seconds["first_batch"] += clock.first_batch
        self.seconds["train"] += wall - inside - clock.first_batch
        self.seconds["data_wait"] += clock.data - clock.first_batch
        self.steps += state.step - step

    def cut(self) -> EpochTimes:
        """The breakdown since the previous cut, for a metrics row; what follows counts towards the next."""
        now = time.perf_counter()
        times = EpochTimes(seconds=now - self.start, steps=self.steps, since=self._since, **self.seconds)
        self._since = "since the last evaluation"
        self._begin(now)
        return times


def run_epochs(plan: RunPlan, state: TrainState, sampler, runtime: Runtime, folder: CheckpointFolder, *,
               payload: Callable[[], dict[str, Any]], on_log: Callable[[StepLog], None],
               train_steps: Callable[[TrainHooks, int], bool], evaluate_and_log: Callable[[EpochTiming], bool]
               ) -> bool:
    """The loop every training command runs: steps (``train_steps(hooks, stop_at)``, ``engine.run_steps`` with
    the task's loss) epoch by epoch until ``plan.total_steps``; an evaluation where the plan says
    (``evaluate_and_log`` returns whether it is the best so far; it times its evaluation as ``timing.part("eval")``
    and takes its row's times with ``timing.cut()``) followed by a checkpoint; periodic checkpoints; preemption
    (SIGTERM/SIGINT) checkpointed at the next step boundary on every rank. Returns True when preempted."""
    timing = EpochTiming()

    def save(is_best: bool = False) -> None:
        with timing.part("checkpoint"):
            runtime.read_pending()  # the host state of every step taken so far goes into the checkpoint
            state_to_save = payload()
            if runtime.is_main:
                folder.save(state_to_save, state.step, is_best=is_best)
            runtime.barrier()

    def log_step(entry: StepLog) -> None:
        with timing.part("log"):
            on_log(entry)

    def on_step_end() -> None:
        if plan.checkpoint_due(state.step):
            save()

    with _preemption_signals() as stop_requested:
        hooks = TrainHooks(on_log=log_step, on_step_end=on_step_end, stop_requested=stop_requested)
        while state.step < plan.total_steps:
            state.start_epoch(state.step // plan.steps_per_epoch)
            sampler.set_epoch(state.epoch, start_step=state.step % plan.steps_per_epoch)
            try:
                with timing.training(hooks.clock, state):
                    preempted = train_steps(hooks, plan.stop_at(state.step))
            except NonFiniteLossError as error:
                raise NonFiniteLossError(f"{error}. Last good checkpoint: {folder.latest() or 'none yet'}") from None
            if plan.evaluated_after(state.step):  # also when preempted on an evaluation's step
                save(evaluate_and_log(timing))
            elif preempted:
                save()
            if preempted:
                log.info("preempted: checkpoint of step %d saved; rerun the same command to continue", state.step)
                return True
    return False


def step_logger(run: RunFolder, plan: RunPlan, state: TrainState, runtime: Runtime,
                mfu: Callable[[float], float | None] = lambda img_per_s: None,
                counters: Callable[[], dict[str, int]] = dict) -> Callable[[StepLog], None]:
    """A steps.csv/TensorBoard row and a progress line per logged step (``mfu``: img/s -> utilisation;
    ``counters``: columns read at logging time, e.g. the data source's retries)."""
    progress = Progress(plan.total_steps, "train", enabled=runtime.is_main, unit="step")
    progress.done = state.step

    def on_log(entry: StepLog) -> None:
        utilisation = mfu(entry.img_per_s)
        run.log_step({**vars(entry), "mfu": utilisation, **counters()})
        progress.update(entry.step - progress.done,
                        f"loss {entry.loss:.4f} lr {entry.lr:.3g} {entry.img_per_s:.1f} img/s "
                        f"data {entry.data_s:.3f}s compute {entry.compute_s:.3f}s"
                        + (f" MFU {100 * utilisation:.1f}%" if utilisation is not None else ""))
    return on_log


def data_counters(dataset) -> Callable[[], dict[str, int]]:
    """steps.csv's ``read_retries``: transient read faults retried so far by this host (0 for local folders)."""
    source = getattr(dataset, "source", None)
    return lambda: {"read_retries": getattr(source, "read_retries", 0)}


def _log_epoch(run: RunFolder, state: TrainState, optimizer, result: dict[str, Any], cfg: Config,
               timing: EpochTiming, peak_memory_mib: float | None) -> None:
    """A metrics.csv row and its log lines: ``img_per_s`` is the steps' throughput (evaluation, checkpoints and
    logging excluded), ``epoch_seconds`` the wall time since the previous row and the ``*_s`` columns its parts
    (``EpochTiming``), ``peak_memory_mib`` the runtime's peak so far."""
    times = timing.cut()
    with timing.part("log"):  # counts in the next row
        run.log_epoch({
            "epoch": state.epoch, "step": state.step, "lr": optimizer.param_groups[0]["lr"],
            "train_loss": state.epoch_loss, "eval_loss": result["loss"], "top1": result["top1"],
            "top5": result["top5"], "ema_top1": result.get("ema_top1"),
            "img_per_s": times.img_per_s(cfg.optim.global_batch_size), **times.columns(),
            "bad_images": state.bad_images, "nonfinite_skips": state.nonfinite_skips,
            "peak_memory_mib": peak_memory_mib})
        log.info("epoch %d step %d: train loss %.4f, eval top-1 %.2f top-5 %.2f loss %.4f", state.epoch,
                 state.step, state.epoch_loss, result["top1"], result["top5"], result["loss"])
        log.info("epoch %d %s", state.epoch, times.summary())


def _num_classes(cfg: Config, train_set) -> int:
    found = len(train_set.classes)
    if cfg.model.num_classes is not None and cfg.model.num_classes < found:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} is fewer than the {found} classes of "
                          f"data.root={cfg.data.root}; leave it null to use the dataset's count")
    return cfg.model.num_classes or found


# --- resuming ----------------------------------------------------------------------------------------------------

def checkpoint_to_resume(folder: CheckpointFolder, resume: str) -> dict[str, Any] | None:
    """The checkpoint ``--resume`` designates: "auto" the run folder's newest (or None), "never" None, else the
    path's (refused when the run folder holds another run)."""
    if resume == "never":
        return None
    if resume == "auto":
        return folder.load_latest()
    saved = checkpoint.load_training_checkpoint(resume)
    own_folder = Path(resume).resolve().parent
    own_folder = own_folder.parent if own_folder.name == "checkpoints" else own_folder
    if holds_a_run(folder.path) and folder.path.resolve() != own_folder:
        raise ResumeError(f"--resume {resume}: train.output_dir={folder.path} already holds another run; continue "
                          f"in the checkpoint's own run folder ({own_folder}) or an empty train.output_dir")
    return saved


def check_resumable(cfg: Schema, saved: dict[str, Any], fingerprint: dict[str, Any], harmless: Collection[str]
                    ) -> None:
    """Refuses a resume that would not continue the same run (a change of a key outside ``harmless``, or of the
    training data); lists what changed."""
    try:
        saved_cfg = config_from_dict(saved["config"], source="checkpoint", schema=type(cfg))
    except ConfigError as error:
        raise ResumeError(f"the checkpoint's config no longer fits the schema: {error}") from None
    changes = diff_configs(saved_cfg, cfg)
    breaking = [f"{key}: {old!r} -> {new!r}" for key, old, new in changes if key not in harmless]
    if saved.get("dataset") not in (None, fingerprint):
        breaking.append(describe_data_change(saved["dataset"], fingerprint))
    if breaking:
        raise ResumeError(
            "cannot resume: the config differs from the checkpoint's in ways that change the run:\n  "
            + "\n  ".join(breaking) + "\nStart a new run with another train.output_dir, or undo these changes.")
    for key, old, new in changes:
        log.info("resume: %s changed from %r to %r (allowed)", key, old, new)


def same_config_without_checkpoint(folder: CheckpointFolder, cfg: Schema, harmless: Collection[str]) -> bool:
    """A run killed before its first checkpoint left nothing to lose: the same config may start over there."""
    saved_yaml = folder.path / "config.yaml"
    if not saved_yaml.exists():
        return False
    try:
        return not [k for k, _, _ in diff_configs(load_config(saved_yaml, schema=type(cfg)), cfg) if k not in harmless]
    except ConfigError:
        return False


def restore(saved: dict[str, Any], optimizer, ema, runtime: Runtime, state: TrainState) -> None:
    """Optimizer, EMA, loss scale and the run's position from a checkpoint (the model is loaded before it moves
    to the device)."""
    optimizer.load_state_dict(saved["optimizer"])
    if ema is not None:
        if "state_dict_ema" not in saved:
            raise ResumeError("train.ema is on but the checkpoint holds no EMA weights")
        ema.module.load_state_dict(saved["state_dict_ema"])
    runtime.load_state_dict(saved.get("runtime", {}))
    state.load_state_dict(saved["train_state"])


@contextmanager
def _preemption_signals() -> Iterator[Any]:
    """SIGTERM/SIGINT ask the loop to checkpoint and stop at the next optimizer-step boundary."""
    received: list[int] = []

    def handler(signum, frame) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        received.append(signum)
        log.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield lambda: bool(received)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --- building ----------------------------------------------------------------------------------------------------

def announce(runtime: Runtime, derived, cfg: Schema, saved: dict[str, Any] | None) -> None:
    """The batch split the run derived (``derived``: the config's ``derived(num_shards)``), and where it resumes."""
    if runtime.is_main:
        log.info("%s on %s x%d: global batch %d = micro batch %d x %d shards x %d accumulation steps, lr %.3g",
                 cfg.model.name, runtime.kind, runtime.num_shards, cfg.optim.global_batch_size,
                 derived.micro_batch_size, derived.num_shards, derived.accum_steps, derived.lr)
        if saved is not None:
            log.info("resuming %s at optimizer step %d", derived.output_dir, saved["train_state"]["step"])


def _build_datasets(cfg: Config, pipeline: Pipeline):
    data = cfg.data
    if data.format != "synthetic" and data.root is None:
        raise ConfigError("data.root is not set: pass data.root=DIR (a folder holding train/ and val/, or for "
                          "data.format=wds/parquet a path or URL of the shards), or data.format=synthetic for a "
                          "benchmark")
    train_set = build_dataset(data.root, data.train_split, pipeline.train.reader, train=True, format=data.format,
                              num_samples=data.synthetic_train_size, num_classes=data.synthetic_num_classes,
                              img_size=data.img_size, seed=cfg.train.seed, **source_options(data))
    return train_set, build_eval_dataset(cfg, pipeline.eval.reader, classes=train_set.classes)  # validate.py's


def _eval_sampler(num_samples: int, cfg: Config, runtime: Runtime) -> EvalBatchSampler:
    """Evaluation is split by process (each feeds all of its devices), every image exactly once."""
    batch_size = cfg.eval.batch_size * len(runtime.shard_ids)
    return EvalBatchSampler(num_samples, batch_size, runtime.world_size, runtime.rank,
                            pad_to_full=runtime.fixed_shapes)


def _drop_sites(model, cfg: Config) -> int:
    """How many keyed drop decisions each training sample carries (``with_drop_draws``): MambaOut takes them as
    input; a timm architecture would draw its stochastic depth and dropout from the device's generator, which
    differs between devices and breaks bit-exact resume, so it must train without them."""
    sites = getattr(model, "num_drop_sites", None)
    if sites is not None:
        return sites
    if cfg.model.drop_path_rate > 0 or cfg.model.head_dropout > 0:
        raise ConfigError(
            f"model.name={cfg.model.name} draws stochastic depth and dropout from the device's random generator, "
            "so its runs would differ between devices and after a resume; set model.drop_path_rate=0 and "
            "model.head_dropout=0, or train a MambaOut variant, whose drop decisions are keyed per sample")
    return 0


def mfu_meter(model, cfg: Config, runtime: Runtime) -> Callable[[float], float | None]:
    """img/s -> model FLOPs utilisation: 3 x the forward FLOPs of an image at the training resolution (forward
    and backward, as in PaLM's MFU) x img/s / (devices x peak). None where the peak is unknown (CPUs) and
    ``runtime.peak_tflops`` is unset."""
    math = matmul_math(runtime.kind, cfg.train.precision, cfg.runtime.matmul_precision)
    peak = cfg.runtime.peak_tflops or peak_tflops(runtime.device_name(), math)
    if peak is None:
        return lambda img_per_s: None
    flops_per_image = 3 * 2 * count_macs(model, cfg.data.img_size, getattr(model, "in_chans", 3))
    total_peak = peak * 1e12 * runtime.num_shards
    log.info("MFU against %s x %.4g TFLOP/s (%s): %.3g GFLOPs per training image", runtime.num_shards, peak, math,
             flops_per_image / 1e9)
    return lambda img_per_s: img_per_s * flops_per_image / total_peak


def build_loader(dataset, batch_sampler, num_workers: int, runtime: Runtime, collate) -> DataLoader:
    """The DataLoader of a run: batches as the sampler says, workers that leave signals to the main process."""
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=runtime.device.type == "cuda", persistent_workers=num_workers > 0,
                      worker_init_fn=_leave_signals_to_the_main_process)


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """A preemption signal reaches the whole process group; workers must not die of it mid-batch, the
    main process finishes the step, checkpoints and shuts them down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_ema(model, cfg: Schema):
    """timm's EMA of the weights when ``train.ema`` is on, else None."""
    if not cfg.train.ema:
        return None
    from timm.utils import ModelEmaV3

    # timm gives its EMA a random generator on the model's device (for bf16 stochastic rounding, which
    # engine.EmaTensors does not use), and XLA devices have none: the copy is made on the CPU, then moved.
    ema = ModelEmaV3(model, decay=cfg.train.ema_decay, device=torch.device("cpu"))
    ema.module.to(next(model.parameters()).device)
    return ema


def record_provenance(run: RunFolder, cfg: Schema, derived, runtime: Runtime, classes, state: TrainState,
                      saved: dict[str, Any] | None, *, input_pipeline: dict[str, Any], dataset: dict[str, Any]
                      ) -> None:
    """config.yaml and classes.json (the trackers started); manifest.json on a fresh start, a resume entry appended on
    a resume."""
    run.write_config(cfg, derived)
    run.write_json("classes.json", list(classes))
    manifest = build_manifest(runtime_info=runtime.describe(), input_pipeline=input_pipeline, dataset=dataset,
                              derived=vars(derived))
    if saved is None:
        run.truncate_logs_after(0)
        run.write_manifest(manifest)
        return
    run.truncate_logs_after(state.step)  # rows a killed run wrote after its checkpoint are written again
    previous = run.read_json("manifest.json") or manifest
    previous.setdefault("resumes", []).append(
        {"step": state.step, "created": manifest["created"], "command": manifest["command"],
         "git": manifest["git"], "runtime": manifest["runtime"], "input_pipeline": manifest["input_pipeline"],
         "derived": manifest["derived"]})
    run.write_manifest(previous)


def _evaluate_epoch(model, ema, loader, runtime: Runtime, prepare_batch) -> dict[str, Any]:
    result = evaluate(model, loader, runtime, prepare_batch=prepare_batch).as_dict()
    if ema is not None:
        result["ema_top1"] = evaluate(ema.module, loader, runtime, prepare_batch=prepare_batch).top1
    return result


def checkpoint_payload(model, ema, optimizer, runtime: Runtime, state: TrainState, cfg: Schema, classes,
                       fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Everything the run depends on. Random draws are keyed by (seed, step, sample), so the position
    (``train_state.step``) replaces the RNG states other trainers must save."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "train_state": state.state_dict(),
        "runtime": runtime.state_dict(),
        "config": cfg.to_dict(),
        "classes": list(classes),
        "dataset": fingerprint,
    }
    if ema is not None:
        payload["state_dict_ema"] = ema.module.state_dict()
    return runtime.to_cpu_state(payload)
