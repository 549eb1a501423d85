#!/usr/bin/env python3
"""A training epoch of train.py against a plain loop, on the same data, model and recipe.

    python scripts/benchmark_epoch.py [--config configs/quickstart_digits.yaml] [--epochs 3] [--rounds 2]

The plain loop is what one writes in a page of PyTorch: torchvision's ImageFolder with timm's train transform
(the config's augmentation), a shuffling DataLoader with the same workers and batch, and forward, loss,
backward and AdamW on the same model. train.py runs as a user runs it (its keyed sampler, its pipeline, run
folder, logs and checkpoints) once per pipeline asked for; its epoch time is the training part of each epoch
(metrics.csv's img/s, the evaluation excluded). Runs alternate over ``--rounds``; each line gives the median
seconds per epoch after the first (worker start-up), and the ratio to the plain loop's:

    train.py (tensor): 4.10 s per epoch, 0.93x the plain loop
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


def plain_epochs(cfg, epochs: int) -> list[float]:
    """Seconds of each epoch of the plain loop."""
    import torch
    from timm.loss import LabelSmoothingCrossEntropy
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from mambaout.data.pipeline import _timm_train_transform
    from mambaout.models import create_model

    dataset = ImageFolder(str(Path(cfg.data.root) / cfg.data.train_split), transform=_timm_train_transform(cfg))
    loader = DataLoader(dataset, batch_size=cfg.optim.global_batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.name, num_classes=len(dataset.classes), drop_path_rate=cfg.model.drop_path_rate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr or 1e-3, weight_decay=cfg.optim.weight_decay)
    criterion = LabelSmoothingCrossEntropy(smoothing=cfg.aug.label_smoothing)
    model.train()
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for images, targets in loader:
            loss = criterion(model(images), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return seconds


def train_py_epochs(cfg, pipeline: str, epochs: int) -> list[float]:
    """Seconds of the training part of each epoch of train.py with ``pipeline``."""
    from mambaout.config import load_config, to_yaml
    from mambaout.trainer import train

    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "config.yaml"
        config.write_text(to_yaml(cfg))
        run = Path(work) / "run"
        train(load_config(config, [f"data.pipeline={pipeline}", f"train.output_dir={run}",
                                   f"sched.epochs={epochs}", "sched.cooldown_epochs=0", "runtime.device=cpu"]))
        with open(run / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    steps = [int(row["step"]) for row in rows]
    images = [cfg.optim.global_batch_size * (b - a) for a, b in zip([0, *steps], steps)]
    return [n / float(row["img_per_s"]) for n, row in zip(images, rows)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart_digits.yaml"))
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is not counted)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pipelines", nargs="+", default=["tensor", "timm"])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    import logging

    from mambaout.config import load_config

    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.config, [*args.overrides, "runtime.device=cpu"])
    if not (Path(cfg.data.root) / cfg.data.train_split).is_dir():
        parser.error(f"no training data at data.root={cfg.data.root} (the quickstart's: "
                     "python scripts/make_digits_dataset.py data/digits)")
    per_epoch: dict[str, list[float]] = {name: [] for name in ["plain", *args.pipelines]}
    for _ in range(args.rounds):
        per_epoch["plain"] += plain_epochs(cfg, args.epochs)[1:]
        for pipeline in args.pipelines:
            per_epoch[pipeline] += train_py_epochs(cfg, pipeline, args.epochs)[1:]
    plain = statistics.median(per_epoch["plain"])
    print(f"plain loop (ImageFolder + timm transform + DataLoader + step): {plain:.2f} s per epoch")
    for pipeline in args.pipelines:
        ours = statistics.median(per_epoch[pipeline])
        print(f"train.py ({pipeline}): {ours:.2f} s per epoch, {ours / plain:.2f}x the plain loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
