"""One training run from a resolved config: build everything, resume if asked, loop over epochs, evaluate,
checkpoint, and stop cleanly on preemption.

Read top to bottom: ``train`` is the whole story; the helpers below it each build or decide one thing.
"""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader

from . import checkpoint
from .checkpoint import CheckpointFolder
from .config import Config, ConfigError, Derived, config_from_dict, derive, diff_configs, load_config, to_yaml
from .data import EvalBatchSampler, MicroBatchSampler, build_dataset, build_mixup, dataset_fingerprint
from .data.pipeline import Pipeline, Stage, build_pipeline
from .data.sampling import derive_seed, with_drop_draws
from .engine import NonFiniteLossError, StepLog, TrainHooks, TrainState, create_criterion, evaluate, train_one_epoch
from .models import create_model
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
    "data.root", "data.num_workers", "train.max_steps", "train.output_dir", "train.log_interval",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "train.skip_nonfinite", "eval.every_epochs",
    "eval.batch_size", "runtime.dist_timeout_s", "runtime.peak_tflops",
})


class ResumeError(RuntimeError):
    pass


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
        saved = _checkpoint_to_resume(folder, resume)
        runtime.assert_same("the step to resume from", saved and saved["train_state"]["step"])
        pipeline = build_pipeline(cfg, runtime.kind, runtime.fixed_shapes)
        train_set, val_set = _build_datasets(cfg, pipeline)
        fingerprint = dataset_fingerprint(train_set)
        if saved is not None:
            _check_resumable(cfg, saved, fingerprint)
        try:  # before the run folder exists: a mistake here leaves nothing behind
            sampler = MicroBatchSampler(len(train_set), cfg.optim.global_batch_size, cfg.train.micro_batch_size,
                                        runtime.num_shards, runtime.shard_ids, cfg.train.seed)
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
        reuse_folder = saved is not None or (resume == "auto" and _same_config_without_checkpoint(folder, cfg))
        run = RunFolder(derived.output_dir, enabled=runtime.is_main, resume=reuse_folder)
        if saved is not None and runtime.is_main:
            folder.set_aside_after(saved["train_state"]["step"])  # resuming an older one discards its future
        _announce(runtime, derived, cfg, pipeline, saved)
        if saved is not None:
            model.load_state_dict(saved["model"])
        train_model = runtime.prepare_model(model, cfg.train.channels_last)
        if cfg.train.compile:
            train_model = torch.compile(train_model)
        optimizer = create_optimizer(model, derived.lr, cfg.optim.weight_decay, cfg.optim.eps,
                                     tuple(cfg.optim.betas))
        ema = _build_ema(model, cfg)
        mixup = build_mixup(cfg.aug.mixup_alpha, cfg.aug.cutmix_alpha, cfg.aug.mixup_prob,
                            cfg.aug.mixup_switch_prob, cfg.aug.mixup_mode, cfg.aug.label_smoothing, num_classes)
        criterion = create_criterion(mixup is not None, cfg.aug.label_smoothing)
        state = TrainState()
        if saved is not None:
            _restore(saved, optimizer, ema, runtime, state)

        schedule = LrSchedule(optimizer, epochs=cfg.sched.epochs, warmup_epochs=cfg.sched.warmup_epochs,
                              warmup_lr=cfg.sched.warmup_lr, min_lr=cfg.sched.min_lr,
                              steps_per_epoch=sampler.steps_per_epoch, per_step=cfg.sched.per_step)
        train_loader = _loader(train_set, sampler, cfg.data.num_workers, runtime, pipeline.train, drop_sites)
        val_loader = _loader(val_set, _eval_sampler(len(val_set), cfg, runtime), cfg.data.num_workers, runtime,
                             pipeline.eval)
        prepare_train, prepare_eval = pipeline.train.prepare(runtime), pipeline.eval.prepare(runtime)
        _record_provenance(run, cfg, derived, runtime, pipeline, train_set, val_set, fingerprint, state, saved)

        total_steps = derived.total_epochs * sampler.steps_per_epoch
        if cfg.train.max_steps is not None:
            total_steps = min(total_steps, cfg.train.max_steps)
        progress = Progress(total_steps, "train", enabled=runtime.is_main, unit="step")
        progress.done = state.step

        def save(is_best: bool = False) -> None:
            runtime.read_pending()  # the host state of every step taken so far goes into the checkpoint
            payload = _checkpoint_payload(model, ema, optimizer, runtime, state, cfg, train_set.classes,
                                          fingerprint)
            if runtime.is_main:
                folder.save(payload, state.step, is_best=is_best)
            runtime.barrier()

        def on_log(entry: StepLog) -> None:
            utilisation = mfu(entry.img_per_s)
            run.log_step({**vars(entry), "mfu": utilisation})
            progress.update(entry.step - progress.done,
                            f"loss {entry.loss:.4f} lr {entry.lr:.3g} {entry.img_per_s:.1f} img/s"
                            + (f" MFU {100 * utilisation:.1f}%" if utilisation is not None else ""))

        def evaluated_after(step: int) -> bool:
            """Whether the epoch that ends at ``step`` (if one does) is evaluated, and checkpointed then."""
            epoch_ends = step % sampler.steps_per_epoch == 0 or step >= total_steps
            due = step >= total_steps or (step // sampler.steps_per_epoch) % cfg.eval.every_epochs == 0
            return epoch_ends and due

        def on_step_end() -> None:
            every = cfg.train.checkpoint_every_steps
            if every and state.step % every == 0 and not evaluated_after(state.step):
                save()

        final_eval: dict[str, Any] = {}
        with _preemption_signals() as stop_requested:
            hooks = TrainHooks(on_log=on_log, on_step_end=on_step_end, stop_requested=stop_requested)
            while state.step < total_steps:
                state.start_epoch(state.step // sampler.steps_per_epoch)
                sampler.set_epoch(state.epoch, start_step=state.step % sampler.steps_per_epoch)
                epoch_start, first_step = time.perf_counter(), state.step
                try:
                    preempted = train_one_epoch(
                        train_model, optimizer, schedule, train_loader, sampler, criterion, runtime, state,
                        seed=cfg.train.seed, mixup=mixup, ema=ema, clip_grad=cfg.optim.clip_grad,
                        skip_nonfinite=cfg.train.skip_nonfinite, max_steps=total_steps,
                        log_interval=cfg.train.log_interval, hooks=hooks, prepare_batch=prepare_train)
                except NonFiniteLossError as error:
                    raise NonFiniteLossError(f"{error}. Last good checkpoint: {folder.latest() or 'none yet'}") \
                        from None
                train_seconds = time.perf_counter() - epoch_start
                if evaluated_after(state.step):  # also when preempted on an epoch's last step
                    final_eval = _evaluate_epoch(model, ema, val_loader, runtime, prepare_eval)
                    _log_epoch(run, state, optimizer, final_eval, cfg, time.perf_counter() - epoch_start,
                               train_seconds, state.step - first_step, runtime.peak_memory_mib())
                    score = final_eval["ema_top1" if cfg.eval.use_ema and ema is not None else "top1"]
                    is_best = score > state.best_top1
                    if is_best:
                        state.best_top1, state.best_epoch = score, state.epoch
                    save(is_best)
                elif preempted:
                    save()
                if preempted:
                    log.info("preempted: checkpoint of step %d saved; rerun the same command to continue",
                             state.step)
                    run.close()
                    return TrainOutcome(final_eval, state.best_top1, state.step, preempted=True)
        run.close()
        return TrainOutcome(final_eval, state.best_top1, state.step)


def _log_epoch(run: RunFolder, state: TrainState, optimizer, result: dict[str, Any], cfg: Config,
               seconds: float, train_seconds: float, steps: int, peak_memory_mib: float | None) -> None:
    """A metrics.csv row: ``img_per_s`` is the training throughput (the evaluation excluded), ``epoch_seconds``
    the epoch's wall time with its evaluation, ``peak_memory_mib`` the runtime's peak so far."""
    run.log_epoch({
        "epoch": state.epoch, "step": state.step, "lr": optimizer.param_groups[0]["lr"],
        "train_loss": state.epoch_loss, "eval_loss": result["loss"], "top1": result["top1"], "top5": result["top5"],
        "ema_top1": result.get("ema_top1"), "img_per_s": steps * cfg.optim.global_batch_size / train_seconds,
        "epoch_seconds": seconds, "bad_images": state.bad_images, "nonfinite_skips": state.nonfinite_skips,
        "peak_memory_mib": peak_memory_mib})
    log.info("epoch %d step %d: train loss %.4f, eval top-1 %.2f top-5 %.2f loss %.4f", state.epoch, state.step,
             state.epoch_loss, result["top1"], result["top5"], result["loss"])


def _num_classes(cfg: Config, train_set) -> int:
    found = len(train_set.classes)
    if cfg.model.num_classes is not None and cfg.model.num_classes < found:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} is fewer than the {found} classes of "
                          f"data.root={cfg.data.root}; leave it null to use the dataset's count")
    return cfg.model.num_classes or found


# --- resuming ----------------------------------------------------------------------------------------------------

def _checkpoint_to_resume(folder: CheckpointFolder, resume: str) -> dict[str, Any] | None:
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


def _check_resumable(cfg: Config, saved: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Refuses a resume that would not continue the same run; lists what changed."""
    try:
        saved_cfg = config_from_dict(saved["config"], source="checkpoint")
    except ConfigError as error:
        raise ResumeError(f"the checkpoint's config no longer fits the schema: {error}") from None
    changes = diff_configs(saved_cfg, cfg)
    breaking = [f"{key}: {old!r} -> {new!r}" for key, old, new in changes if key not in HARMLESS_ON_RESUME]
    if saved.get("dataset") not in (None, fingerprint):
        breaking.append(f"training data: {saved['dataset']} -> {fingerprint}")
    if breaking:
        raise ResumeError(
            "cannot resume: the config differs from the checkpoint's in ways that change the run:\n  "
            + "\n  ".join(breaking) + "\nStart a new run with another train.output_dir, or undo these changes.")
    for key, old, new in changes:
        log.info("resume: %s changed from %r to %r (allowed)", key, old, new)


def _same_config_without_checkpoint(folder: CheckpointFolder, cfg: Config) -> bool:
    """A run killed before its first checkpoint left nothing to lose: the same config may start over there."""
    saved_yaml = folder.path / "config.yaml"
    if not saved_yaml.exists():
        return False
    try:
        return not [k for k, _, _ in diff_configs(load_config(saved_yaml), cfg) if k not in HARMLESS_ON_RESUME]
    except ConfigError:
        return False


def _restore(saved: dict[str, Any], optimizer, ema, runtime: Runtime, state: TrainState) -> None:
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

def _announce(runtime: Runtime, derived: Derived, cfg: Config, pipeline: Pipeline, saved: dict[str, Any] | None
              ) -> None:
    if runtime.is_main:
        log.info("%s on %s x%d: global batch %d = micro batch %d x %d shards x %d accumulation steps, lr %.3g",
                 cfg.model.name, runtime.kind, runtime.num_shards, cfg.optim.global_batch_size,
                 derived.micro_batch_size, derived.num_shards, derived.accum_steps, derived.lr)
        log.info("input pipeline: %s, augmentation on the %s", pipeline.name,
                 "device" if pipeline.augment_on == "device" else "data workers")
        if saved is not None:
            log.info("resuming %s at optimizer step %d", derived.output_dir, saved["train_state"]["step"])


def _build_datasets(cfg: Config, pipeline: Pipeline):
    data = cfg.data
    if data.format == "folder" and data.root is None:
        raise ConfigError("data.root is not set: pass data.root=DIR (a folder holding train/ and val/), or "
                          "data.format=synthetic for a benchmark")
    train_set = build_dataset(data.root, data.train_split, pipeline.train.reader, train=True, format=data.format,
                              num_samples=data.synthetic_train_size, num_classes=data.synthetic_num_classes,
                              img_size=data.img_size, seed=cfg.train.seed)
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


def _loader(dataset, batch_sampler, num_workers: int, runtime: Runtime, stage: Stage, drop_sites: int = 0
            ) -> DataLoader:
    """``drop_sites``: keyed drop decisions to add to each training batch (0: none)."""
    collate = with_drop_draws(stage.collate, drop_sites) if drop_sites else stage.collate
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=runtime.device.type == "cuda", persistent_workers=num_workers > 0,
                      worker_init_fn=_leave_signals_to_the_main_process)


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """A preemption signal reaches the whole process group; workers must not die of it mid-batch, the
    main process finishes the step, checkpoints and shuts them down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _build_ema(model, cfg: Config):
    if not cfg.train.ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.train.ema_decay)


def _record_provenance(run: RunFolder, cfg: Config, derived: Derived, runtime: Runtime, pipeline: Pipeline,
                       train_set, val_set, fingerprint: dict[str, Any], state: TrainState,
                       saved: dict[str, Any] | None) -> None:
    """config.yaml and classes.json; manifest.json on a fresh start, a resume entry appended on a resume."""
    run.write_text("config.yaml", to_yaml(cfg, derived))
    run.write_json("classes.json", list(train_set.classes))
    manifest = build_manifest(runtime_info=runtime.describe(), input_pipeline=pipeline.describe(),
                              dataset={"train": fingerprint, "val": dataset_fingerprint(val_set)},
                              derived=vars(derived))
    if saved is None:
        run.truncate_logs_after(0)
        run.write_json("manifest.json", manifest)
        return
    run.truncate_logs_after(state.step)  # rows a killed run wrote after its checkpoint are written again
    previous = run.read_json("manifest.json") or manifest
    previous.setdefault("resumes", []).append(
        {"step": state.step, "created": manifest["created"], "command": manifest["command"],
         "git": manifest["git"], "runtime": manifest["runtime"], "input_pipeline": manifest["input_pipeline"],
         "derived": manifest["derived"]})
    run.write_json("manifest.json", previous)


def _evaluate_epoch(model, ema, loader, runtime: Runtime, prepare_batch) -> dict[str, Any]:
    result = evaluate(model, loader, runtime, prepare_batch=prepare_batch).as_dict()
    if ema is not None:
        result["ema_top1"] = evaluate(ema.module, loader, runtime, prepare_batch=prepare_batch).top1
    return result


def _checkpoint_payload(model, ema, optimizer, runtime: Runtime, state: TrainState, cfg: Config, classes,
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
