"""One fine-tuning run from a resolved config: train.py's run (``mambaout.trainer``'s helpers: run lock, rolling
checkpoints, resume checks, run folder, preemption, torchrun through the runtime; ``engine.run_steps``'s optimizer
step) around a ``Task``'s datasets, model, loss and evaluation.

Read top to bottom: ``finetune`` is the whole story, in the order of ``trainer.train``.
"""
from __future__ import annotations

import argparse
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..checkpoint import CheckpointFolder
from ..config import ConfigError, Schema
from ..data import EvalBatchSampler, MicroBatchSampler, derive_seed
from ..engine import MicroBatchLoss, TrainHooks, TrainState, run_steps
from ..optim import create_optimizer
from ..runtime import Runtime, runtime_from_config
from ..tracking import EPOCH_TIME_COLUMNS, RunFolder, RunLock
from ..trainer import (HARMLESS_ON_RESUME, EpochTiming, RunPlan, announce, build_ema, build_loader, check_resumable,
                       checkpoint_payload, checkpoint_to_resume, command_main, record_provenance, restore,
                       run_epochs, same_config_without_checkpoint, step_logger)

log = logging.getLogger("mambaout")

# The trainer's harmless keys that the fine-tuning schemas have, and the evaluation period by steps.
HARMLESS_ON_FINETUNE_RESUME = HARMLESS_ON_RESUME | {"eval.every_steps"}


@dataclass(frozen=True)
class Task:
    """What a fine-tuning command trains and measures. ``metrics``: the names ``evaluate`` returns, in the
    order of metrics.csv; ``score``: the one that picks ``best.pth``; ``input_pipeline``: the transforms as the
    manifest records them."""

    name: str
    schema: type[Schema]
    metrics: tuple[str, ...]
    score: str
    build_datasets: Callable[[Any], tuple[Any, Any]]
    build_model: Callable[[Any, str | None], nn.Module]
    micro_loss: Callable[[Any, Runtime], MicroBatchLoss]
    evaluate: Callable[[nn.Module, Any, Runtime, Any], dict[str, float | None]]
    schedule: Callable[[Any, torch.optim.Optimizer, float, int], Any]
    plan: Callable[[Any, int], RunPlan]
    input_pipeline: Callable[[Any], dict[str, Any]]

    def epoch_columns(self) -> tuple[str, ...]:
        return ("epoch", "step", "lr", "train_loss", *self.metrics, f"ema_{self.score}", "img_per_s",
                "epoch_seconds", *EPOCH_TIME_COLUMNS, "nonfinite_skips", "peak_memory_mib")


@dataclass
class FinetuneState(TrainState):
    """``TrainState`` with the best evaluation score of the task (its ``score`` metric)."""

    best_score: float = -1.0


@dataclass
class FinetuneOutcome:
    final_eval: dict[str, Any]
    best_score: float
    step: int
    preempted: bool = False


def finetune_command(task: Task, program: str, description: str, argv=None) -> int:
    """A fine-tuning command line (scripts/finetune_*.py): train.py's, with ``task``'s schema and run."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    return command_main(parser, argv, program, task.schema, lambda cfg, resume: finetune(cfg, task, resume))


def finetune(cfg, task: Task, resume: str = "auto") -> FinetuneOutcome:
    """Fine-tunes as ``cfg`` (a ``task.schema`` config) says. ``resume``: as ``trainer.train``'s."""
    if cfg.optim.layer_decay is not None:  # the detector and segmenter group no layers (no group_matcher)
        raise ConfigError("optim.layer_decay applies to classification (train.py); detection and segmentation "
                          "fine-tuning use one lr: remove optim.layer_decay")
    runtime = runtime_from_config(cfg)
    with runtime.session(), ExitStack() as held:
        derived = cfg.derived(runtime.num_shards)
        held.enter_context(RunLock(derived.output_dir, enabled=runtime.is_main))
        folder = CheckpointFolder(derived.output_dir, keep=cfg.train.keep_checkpoints)
        saved = checkpoint_to_resume(folder, resume)
        runtime.assert_same("the step to resume from", saved and saved["train_state"]["step"])
        train_set, val_set = task.build_datasets(cfg)
        fingerprint = train_set.fingerprint()
        if saved is not None:
            check_resumable(cfg, saved, fingerprint, HARMLESS_ON_FINETUNE_RESUME)
        try:  # before the run folder exists: a mistake here leaves nothing behind
            sampler = MicroBatchSampler(len(train_set), cfg.optim.global_batch_size, cfg.train.micro_batch_size,
                                        runtime.num_shards, runtime.shard_ids, cfg.train.seed)
        except ValueError as error:
            raise ConfigError(f"data.root={cfg.data.root}: {error}") from None
        torch.manual_seed(derive_seed(cfg.train.seed, "init"))  # the same initial heads on every rank
        model = task.build_model(cfg, cfg.model.checkpoint if saved is None else None)
        reuse_folder = saved is not None or (
            resume == "auto" and same_config_without_checkpoint(folder, cfg, HARMLESS_ON_FINETUNE_RESUME))
        run = held.enter_context(RunFolder(derived.output_dir, enabled=runtime.is_main, resume=reuse_folder,
                                           epoch_columns=task.epoch_columns()))
        if saved is not None and runtime.is_main:
            folder.set_aside_after(saved["train_state"]["step"])  # resuming an older one discards its future
        announce(runtime, derived, cfg, saved)
        if saved is not None:
            model.load_state_dict(saved["model"])
        train_model = runtime.prepare_model(model, cfg.train.channels_last)
        if cfg.train.compile:
            train_model = runtime.compile(train_model)
        optimizer = create_optimizer(model, derived.lr, cfg.optim.weight_decay, cfg.optim.eps,
                                     tuple(cfg.optim.betas))
        ema = build_ema(model, cfg)
        state = FinetuneState()
        if saved is not None:
            restore(saved, optimizer, ema, runtime, state)

        schedule = task.schedule(cfg, optimizer, derived.lr, sampler.steps_per_epoch)
        train_loader = build_loader(train_set, sampler, cfg.data.num_workers, runtime, train_set.collate)
        # one image per forward: a detection or segmentation result never depends on the images batched with it
        val_loader = build_loader(val_set, EvalBatchSampler(len(val_set), 1, runtime.world_size, runtime.rank),
                                  cfg.data.num_workers, runtime, val_set.collate)
        record_provenance(run, cfg, derived, runtime, train_set.classes, state, saved,
                          input_pipeline=task.input_pipeline(cfg),
                          dataset={"train": fingerprint, "val": val_set.fingerprint()})

        plan = task.plan(cfg, sampler.steps_per_epoch)
        micro_loss = task.micro_loss(cfg, runtime)

        def train_steps(hooks: TrainHooks, stop_at: int) -> bool:
            return run_steps(train_model, optimizer, schedule, train_loader, sampler, micro_loss, runtime, state,
                             ema=ema, clip_grad=cfg.optim.clip_grad, skip_nonfinite=cfg.train.skip_nonfinite,
                             max_steps=stop_at, log_interval=cfg.train.log_interval, hooks=hooks)

        final_eval: dict[str, Any] = {}

        def evaluate_and_log(timing: EpochTiming) -> bool:
            nonlocal final_eval
            with timing.part("eval"):
                final_eval = task.evaluate(model, val_loader, runtime, val_set)
                if ema is not None:
                    final_eval[f"ema_{task.score}"] = task.evaluate(ema.module, val_loader, runtime,
                                                                    val_set)[task.score]
            _log_evaluation(run, task, state, optimizer, final_eval, cfg, timing, runtime.peak_memory_mib())
            score = final_eval[task.score] or 0.0
            is_best = score > state.best_score
            if is_best:
                state.best_score, state.best_epoch = score, state.epoch
            return is_best

        def payload() -> dict[str, Any]:
            return checkpoint_payload(model, ema, optimizer, runtime, state, cfg, train_set.classes, fingerprint)

        preempted = run_epochs(plan, state, sampler, runtime, folder, payload=payload,
                               on_log=step_logger(run, plan, state, runtime), train_steps=train_steps,
                               evaluate_and_log=evaluate_and_log)
        return FinetuneOutcome(final_eval, state.best_score, state.step, preempted=preempted)


def _log_evaluation(run: RunFolder, task: Task, state: TrainState, optimizer, result: dict[str, Any], cfg,
                    timing: EpochTiming, peak_memory_mib: float | None) -> None:
    """A metrics.csv row (as train.py's: the steps' throughput, the wall time since the previous row and its parts)
    and its log lines."""
    times = timing.cut()
    with timing.part("log"):  # counts in the next row
        run.log_epoch({
            "epoch": state.epoch, "step": state.step, "lr": optimizer.param_groups[0]["lr"],
            "train_loss": state.epoch_loss, **result, "img_per_s": times.img_per_s(cfg.optim.global_batch_size),
            **times.columns(), "nonfinite_skips": state.nonfinite_skips, "peak_memory_mib": peak_memory_mib})
        shown = ", ".join(f"{name} {value:.2f}" for name, value in result.items() if value is not None)
        log.info("%s: epoch %d step %d: train loss %.4f, %s", task.name, state.epoch, state.step, state.epoch_loss,
                 shown)
        log.info("%s: epoch %d %s", task.name, state.epoch, times.summary())


def seed_draws(seed: int, step: int, micro_ids: list[int]) -> None:
    """Seeds torch's generators (CPU and the accelerator's) for one micro-batch from (seed, step, micro-batch):
    the random draws of torchvision's samplers, dropout and drop path in the micro-batch's forward then depend on
    that key alone, whatever the process count or an interruption (docs/DESIGN.md, fine-tuning)."""
    torch.manual_seed(derive_seed(seed, "draws", step, *micro_ids))
