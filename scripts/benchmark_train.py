#!/usr/bin/env python3
"""train.py's training step against a bare PyTorch loop, on our model and on timm's, interleaved in one run.

    python scripts/benchmark_train.py [--model mambaout_femto] [--img-size 224] [--batch 32] [--steps 12]
                                      [--rounds 3] [--device auto] [KEY=VALUE ...]

train.py runs as a user runs it (keyed sampler, synthetic dataset, pipeline, the loop with its collectives,
logs and checkpoints), on synthetic data made in the main process (pass data.num_workers=N on a GPU, where making
the images on one core would set the pace), drop path and Mixup/CutMix off; its img/s are
steps.csv's, after ``--warmup`` steps. The bare loop is a page of PyTorch: the same batches already on the device
(contiguous, or channels-last like ours where train.channels_last is on), forward, label-smoothing loss,
backward, gradient clipping norm and the same fused AdamW. Each line gives the median img/s over the rounds, the
ratio to the bare loop on our model, and the MFU where the device's peak is known (or runtime.peak_tflops):

    train.py: 10.1 img/s, 0.98x the bare loop, MFU n/a
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train_py(cfg, warmup: int) -> float:
    """Median img/s of train.py's steps after ``warmup``."""
    from mambaout.config import load_config, to_yaml
    from mambaout.trainer import train

    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "config.yaml"
        config.write_text(to_yaml(cfg))
        train(load_config(config, [f"train.output_dir={Path(work) / 'run'}"]))
        with open(Path(work) / "run" / "steps.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    return statistics.median(float(row["img_per_s"]) for row in rows[warmup:])


def bare_loop(cfg, model, runtime, warmup: int, steps: int) -> float:
    """img/s of forward, loss, backward, norm and fused AdamW on batches already on the device."""
    import torch
    from timm.loss import LabelSmoothingCrossEntropy

    from mambaout.optim import create_optimizer

    model = runtime.prepare_model(model, cfg.train.channels_last).train()
    optimizer = create_optimizer(model, 1e-4, cfg.optim.weight_decay, cfg.optim.eps, tuple(cfg.optim.betas))
    criterion = LabelSmoothingCrossEntropy(smoothing=cfg.aug.label_smoothing)
    batch = cfg.optim.global_batch_size
    images = torch.randn(batch, 3, cfg.data.img_size, cfg.data.img_size, device=runtime.device)
    images = images.contiguous(memory_format=runtime.memory_format)
    targets = torch.randint(0, cfg.data.synthetic_num_classes, (batch,), device=runtime.device)
    for step in range(warmup + steps):
        if step == warmup:
            runtime.synchronize()
            start = time.perf_counter()
        with runtime.autocast():
            loss = criterion(model(images), targets)
        loss.backward()
        torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    runtime.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mambaout_femto")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    import logging

    import timm
    import torch

    from mambaout.config import load_config
    from mambaout.models import create_model
    from mambaout.runtime import runtime_from_config
    from mambaout.trainer import mfu_meter

    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(None, [
        f"model.name={args.model}", "model.drop_path_rate=0", "aug.mixup_alpha=0", "aug.cutmix_alpha=0",
        "data.format=synthetic", f"data.img_size={args.img_size}", "data.num_workers=0",
        f"data.synthetic_train_size={args.batch * (args.warmup + args.steps)}", "data.synthetic_val_size=8",
        f"optim.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}", "train.log_interval=1",
        "sched.warmup_epochs=0", "sched.epochs=1", "sched.cooldown_epochs=0", f"runtime.device={args.device}",
        *args.overrides])
    runtime = runtime_from_config(cfg)
    classes = cfg.data.synthetic_num_classes
    rates: dict[str, list[float]] = {"train.py": [], "bare loop, our model": [], "bare loop, timm's model": []}
    measure = {
        "train.py": lambda: train_py(cfg, args.warmup),
        "bare loop, our model": lambda: bare_loop(cfg, create_model(args.model, num_classes=classes), runtime,
                                                  args.warmup, args.steps),
        "bare loop, timm's model": lambda: bare_loop(cfg, timm.create_model(args.model, num_classes=classes),
                                                     runtime, args.warmup, args.steps),
    }
    names = list(measure)
    for round_index in range(args.rounds):  # the order rotates, so drifts in machine load hit all alike
        for name in names[round_index % 3:] + names[:round_index % 3]:
            torch.manual_seed(0)
            rates[name].append(measure[name]())
    mfu = mfu_meter(create_model(args.model, num_classes=classes), cfg, runtime)
    reference = statistics.median(rates["bare loop, our model"])
    print(f"{args.model} at {args.img_size} px, batch {args.batch}, {cfg.train.precision}, on "
          f"{runtime.device_name()}:")
    for name, values in rates.items():
        rate = statistics.median(values)
        utilisation = mfu(rate)
        print(f"{name}: {rate:.1f} img/s, {rate / reference:.2f}x the bare loop, MFU "
              f"{'n/a' if utilisation is None else f'{100 * utilisation:.1f}%'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
