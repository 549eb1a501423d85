"""One training run from a resolved config: build everything, loop over epochs, evaluate, checkpoint.

Read top to bottom: ``train`` is the whole story; the helpers below it each build one piece.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import checkpoint
from .config import Config, Derived, derive, to_yaml
from .data import (EvalBatchSampler, MicroBatchSampler, build_dataset, build_eval_transform, build_mixup,
                   build_train_transform, dataset_fingerprint)
from .data.sampling import derive_seed
from .engine import StepLog, TrainState, create_criterion, evaluate, train_one_epoch
from .models import create_model
from .optim import LrSchedule, create_optimizer
from .runtime import Runtime, create_runtime
from .tracking import Progress, RunFolder, build_manifest

log = logging.getLogger("mambaout")


def train(cfg: Config) -> dict[str, Any]:
    """Trains as ``cfg`` says; returns the final evaluation (top1, top5, loss, count, best_top1)."""
    runtime = create_runtime(cfg.runtime.device, cfg.train.precision, cfg.runtime.dist_timeout_s)
    with runtime.session():
        derived = derive(cfg, runtime.num_shards)
        run = RunFolder(derived.output_dir, enabled=runtime.is_main)
        _announce(runtime, derived, cfg)

        train_set, val_set = _build_datasets(cfg, derived)
        num_classes = cfg.model.num_classes or len(train_set.classes)
        torch.manual_seed(derive_seed(cfg.train.seed, "init"))  # the same initial weights on every rank
        model = create_model(cfg.model.name, checkpoint=cfg.model.checkpoint, num_classes=num_classes,
                             drop_path_rate=cfg.model.drop_path_rate, head_dropout=cfg.model.head_dropout,
                             grad_checkpointing=cfg.model.grad_checkpointing)
        train_model = runtime.prepare_model(model, cfg.train.channels_last)
        if cfg.train.compile:
            train_model = torch.compile(train_model)
        optimizer = create_optimizer(model, derived.lr, cfg.optim.weight_decay, cfg.optim.eps,
                                     tuple(cfg.optim.betas))
        ema = _build_ema(model, cfg)
        mixup = build_mixup(cfg.aug.mixup_alpha, cfg.aug.cutmix_alpha, cfg.aug.mixup_prob,
                            cfg.aug.mixup_switch_prob, cfg.aug.mixup_mode, cfg.aug.label_smoothing, num_classes)
        criterion = create_criterion(mixup is not None, cfg.aug.label_smoothing)

        sampler = MicroBatchSampler(len(train_set), cfg.optim.global_batch_size, cfg.train.micro_batch_size,
                                    runtime.num_shards, runtime.shard_ids, cfg.train.seed)
        schedule = LrSchedule(optimizer, epochs=cfg.sched.epochs, warmup_epochs=cfg.sched.warmup_epochs,
                              warmup_lr=cfg.sched.warmup_lr, min_lr=cfg.sched.min_lr,
                              steps_per_epoch=sampler.steps_per_epoch, per_step=cfg.sched.per_step)
        train_loader = _loader(train_set, sampler, cfg.data.num_workers, runtime)
        val_loader = _loader(val_set, _eval_sampler(len(val_set), cfg, runtime), cfg.data.num_workers, runtime)
        state = TrainState()

        run.write_text("config.yaml", to_yaml(cfg, derived))
        run.write_json("classes.json", list(train_set.classes))
        run.write_json("manifest.json", build_manifest(
            runtime_info=runtime.describe(), dataset={"train": dataset_fingerprint(train_set),
                                                      "val": dataset_fingerprint(val_set)},
            derived=vars(derived)))

        total_steps = derived.total_epochs * sampler.steps_per_epoch
        if cfg.train.max_steps is not None:
            total_steps = min(total_steps, cfg.train.max_steps)
        progress = Progress(total_steps, "train", enabled=runtime.is_main, unit="step")
        result: dict[str, Any] = {}
        while state.step < total_steps:
            state.epoch = state.step // sampler.steps_per_epoch
            sampler.set_epoch(state.epoch, start_step=state.step % sampler.steps_per_epoch)
            epoch_start, first_step = time.perf_counter(), state.step

            def on_log(entry: StepLog) -> None:
                run.log_step(vars(entry))
                progress.update(entry.step - progress.done,
                                f"loss {entry.loss:.4f} lr {entry.lr:.3g} {entry.img_per_s:.1f} img/s")

            train_loss = train_one_epoch(
                train_model, optimizer, schedule, train_loader, sampler, criterion, runtime, state,
                seed=cfg.train.seed, mixup=mixup, ema=ema, clip_grad=cfg.optim.clip_grad,
                max_steps=total_steps, log_interval=cfg.train.log_interval, on_log=on_log)
            epoch_seconds = time.perf_counter() - epoch_start
            epoch_done = state.step % sampler.steps_per_epoch == 0 or state.step >= total_steps
            is_final = state.step >= total_steps
            if not (epoch_done and ((state.epoch + 1) % cfg.eval.every_epochs == 0 or is_final)):
                continue
            result = _evaluate_epoch(model, ema, val_loader, runtime)
            is_best = result["top1"] > state.best_top1
            if is_best:
                state.best_top1, state.best_epoch = result["top1"], state.epoch
            run.log_epoch({
                "epoch": state.epoch, "step": state.step, "lr": optimizer.param_groups[0]["lr"],
                "train_loss": train_loss, "eval_loss": result["loss"], "top1": result["top1"],
                "top5": result["top5"], "ema_top1": result.get("ema_top1"),
                "img_per_s": (state.step - first_step) * cfg.optim.global_batch_size / epoch_seconds,
                "epoch_seconds": epoch_seconds, "bad_images": state.bad_images})
            log.info("epoch %d step %d: train loss %.4f, eval top-1 %.2f top-5 %.2f loss %.4f",
                     state.epoch, state.step, train_loss, result["top1"], result["top5"], result["loss"])
            payload = _checkpoint_payload(model, ema, optimizer, runtime, state, cfg, train_set.classes)
            if runtime.is_main:
                checkpoint.save_training_checkpoint(payload, run.path / "last.pth")
                if is_best:
                    checkpoint.save_training_checkpoint(payload, run.path / "best.pth")
            runtime.barrier()
        run.close()
        result["best_top1"] = state.best_top1
        return result


def _announce(runtime: Runtime, derived: Derived, cfg: Config) -> None:
    if runtime.is_main:
        log.info("%s on %s x%d: global batch %d = micro batch %d x %d shards x %d accumulation steps, lr %.3g",
                 cfg.model.name, runtime.kind, runtime.num_shards, cfg.optim.global_batch_size,
                 derived.micro_batch_size, derived.num_shards, derived.accum_steps, derived.lr)


def _build_datasets(cfg: Config, derived: Derived):
    aug = cfg.aug
    train_tf = build_train_transform(
        cfg.data.img_size, rand_augment=aug.rand_augment, random_erase_prob=aug.random_erase_prob,
        random_erase_mode=aug.random_erase_mode, random_erase_count=aug.random_erase_count,
        crop_scale=tuple(aug.crop_scale), crop_ratio=tuple(aug.crop_ratio), hflip=aug.hflip,
        interpolation=aug.interpolation, mean=tuple(cfg.data.mean), std=tuple(cfg.data.std))
    eval_tf = build_eval_transform(derived.eval_img_size, crop_pct=cfg.eval.crop_pct,
                                   interpolation=cfg.eval.interpolation, mean=tuple(cfg.data.mean),
                                   std=tuple(cfg.data.std))
    data = cfg.data
    synthetic = {"format": data.format, "num_classes": data.synthetic_num_classes, "img_size": data.img_size,
                 "seed": cfg.train.seed}
    train_set = build_dataset(data.root, data.train_split, train_tf, train=True,
                              num_samples=data.synthetic_train_size, **synthetic)
    val_set = build_dataset(data.root, data.val_split, eval_tf, train=False, classes=train_set.classes,
                            num_samples=data.synthetic_val_size, **synthetic)
    return train_set, val_set


def _eval_sampler(num_samples: int, cfg: Config, runtime: Runtime) -> EvalBatchSampler:
    """Evaluation is split by process (each feeds all of its devices), every image exactly once."""
    batch_size = cfg.eval.batch_size * len(runtime.shard_ids)
    return EvalBatchSampler(num_samples, batch_size, runtime.world_size, runtime.rank,
                            pad_to_full=runtime.fixed_shapes)


def _loader(dataset, batch_sampler, num_workers: int, runtime: Runtime) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                      pin_memory=runtime.device.type == "cuda", persistent_workers=num_workers > 0)


def _build_ema(model, cfg: Config):
    if not cfg.train.ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.train.ema_decay)


def _evaluate_epoch(model, ema, loader, runtime: Runtime) -> dict[str, Any]:
    result = evaluate(model, loader, runtime).as_dict()
    if ema is not None:
        result["ema_top1"] = evaluate(ema.module, loader, runtime).top1
    return result


def _checkpoint_payload(model, ema, optimizer, runtime: Runtime, state: TrainState, cfg: Config,
                        classes) -> dict[str, Any]:
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "train_state": state.state_dict(),
        "runtime": runtime.state_dict(),
        "config": cfg.to_dict(),
        "classes": list(classes),
        "rng": _rng_states(),
    }
    if ema is not None:
        payload["state_dict_ema"] = ema.module.state_dict()
    return runtime.to_cpu_state(payload)


def _rng_states() -> dict[str, Any]:
    """For the record: the loop keys every draw by (seed, step, sample), so a resume does not need these."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": torch.from_numpy(np_state[1].astype(np.int64))}
