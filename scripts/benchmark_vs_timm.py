#!/usr/bin/env python3
"""The same job trained end to end by this project's train.py and by timm's own train.py, interleaved.

    python scripts/benchmark_vs_timm.py --timm-train ../pytorch-image-models/train.py [--rounds 3]
                                        [--config configs/quickstart_digits.yaml] [KEY=VALUE ...]

Each round runs both, one after the other (which goes first alternates), as a user runs them: a fresh process,
start-up, every epoch's training and evaluation, logs and checkpoints, timed from launch to exit. timm's run gets
the config's recipe as its command-line flags (``timm_arguments``: model, image size, batch, schedule,
RandAugment, erasing, smoothing, Mixup/CutMix, workers, seed); both use the machine's default thread count. The
medians over the rounds:

    train.py: 140.2 s, timm train.py: 158.6 s, 1.13x timm; top-1 97.67% vs 97.33%

Without ``--timm-train`` (timm's train.py is not part of the timm package: clone pytorch-image-models for it), the
plain loop of ``benchmark_epoch.py`` (ImageFolder, timm's transform, a DataLoader and the step, no evaluation)
stands in as the reference.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timm_arguments(cfg, output: Path) -> list[str]:
    """timm train.py's flags for the recipe of ``cfg`` (one process: its batch is the global batch)."""
    from mambaout.config import derive

    data, optim, sched, aug = cfg.data, cfg.optim, cfg.sched, cfg.aug
    arguments = [
        "--data-dir", str(data.root), "--train-split", data.train_split, "--val-split", data.val_split,
        "--model", cfg.model.name, "--num-classes", str(len(list((Path(data.root) / data.train_split).iterdir()))),
        "--input-size", "3", str(data.img_size), str(data.img_size),
        "--mean", *map(str, data.mean), "--std", *map(str, data.std),
        "--crop-pct", str(cfg.eval.crop_pct), "--interpolation", cfg.eval.interpolation,
        "-b", str(optim.global_batch_size), "-vb", str(cfg.eval.batch_size), "-j", str(data.num_workers),
        "--opt", "adamw", "--lr", str(derive(cfg, 1).lr), "--weight-decay", str(optim.weight_decay),
        "--opt-eps", str(optim.eps), "--opt-betas", *map(str, optim.betas),
        "--sched", "cosine", "--epochs", str(sched.epochs), "--warmup-epochs", str(sched.warmup_epochs),
        "--cooldown-epochs", str(sched.cooldown_epochs), "--warmup-lr", str(sched.warmup_lr),
        "--min-lr", str(sched.min_lr),
        "--scale", *map(str, aug.crop_scale), "--ratio", *map(str, aug.crop_ratio), "--hflip", str(aug.hflip),
        "--train-interpolation", aug.interpolation,
        "--reprob", str(aug.random_erase_prob), "--remode", aug.random_erase_mode,
        "--recount", str(aug.random_erase_count), "--smoothing", str(aug.label_smoothing),
        "--mixup", str(aug.mixup_alpha), "--cutmix", str(aug.cutmix_alpha), "--mixup-prob", str(aug.mixup_prob),
        "--mixup-switch-prob", str(aug.mixup_switch_prob), "--mixup-mode", aug.mixup_mode,
        "--drop-path", str(cfg.model.drop_path_rate), "--seed", str(cfg.train.seed),
        "--log-interval", str(cfg.train.log_interval), "--checkpoint-hist", "1",
        "--output", str(output.parent), "--experiment", output.name, "--device", "cpu",
    ]
    if aug.rand_augment:
        arguments += ["--aa", aug.rand_augment]
    if sched.per_step:
        arguments.append("--sched-on-updates")
    if optim.clip_grad is not None:
        arguments += ["--clip-grad", str(optim.clip_grad)]
    if cfg.train.ema:
        arguments += ["--model-ema", "--model-ema-decay", str(cfg.train.ema_decay)]
    return arguments


def timed(command: list[str], log: Path) -> float:
    """Seconds from launch to exit of ``command`` (its output to ``log``); raises if it fails."""
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{command[1]} failed (exit {done.returncode}); its output: {log}")
    return seconds


def last_value(csv_path: Path, column: str) -> float:
    with open(csv_path, newline="") as f:
        return float(list(csv.DictReader(f))[-1][column])


BREAKDOWN = ("first_batch_s", "train_s", "data_wait_s", "eval_s", "checkpoint_s", "log_s")


def breakdown(metrics_csv: Path, wall: float) -> dict[str, float]:
    """train.py's time by part, summed over its epochs (metrics.csv), and ``outside``: the rest of the wall time
    (start-up, the last checkpoint, exit)."""
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    parts = {column: sum(float(row[column]) for row in rows) for column in BREAKDOWN}
    parts["outside"] = wall - sum(float(row["epoch_seconds"]) for row in rows)
    return parts


def ours(config: str, overrides: list[str], work: Path) -> tuple[float, float, dict[str, float]]:
    run = work / "ours"
    seconds = timed([sys.executable, "train.py", "--config", config, *overrides, f"train.output_dir={run}"],
                    work / "ours.log")
    return seconds, last_value(run / "metrics.csv", "top1"), breakdown(run / "metrics.csv", seconds)


def timms(timm_train: Path, cfg, work: Path) -> tuple[float, float, dict[str, float]]:
    run = work / "timm" / "run"
    run.parent.mkdir()
    seconds = timed([sys.executable, str(timm_train), *timm_arguments(cfg, run)], work / "timm.log")
    return seconds, last_value(run / "summary.csv", "eval_top1"), {}


def plain_loop(config: str, overrides: list[str], work: Path) -> tuple[float, float, dict[str, float]]:
    """benchmark_epoch.py's plain loop over the config's epochs, in a fresh process like the others."""
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/scripts']; import benchmark_epoch; "
            "from mambaout.config import load_config; "
            "cfg = load_config(sys.argv[2], sys.argv[3:]); benchmark_epoch.plain_epochs(cfg, cfg.sched.epochs)")
    return timed([sys.executable, "-c", code, str(REPO), config, *overrides], work / "plain.log"), float("nan"), {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-train", type=Path, help="timm's train.py (from a pytorch-image-models clone)")
    parser.add_argument("--config", default="configs/quickstart_digits.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    from mambaout.config import load_config

    cfg = load_config(args.config, args.overrides)
    if not (REPO / cfg.data.root / cfg.data.train_split).is_dir():
        parser.error(f"no training data at data.root={cfg.data.root} (the quickstart's: "
                     "python scripts/make_digits_dataset.py data/digits)")
    if args.timm_train is not None and not args.timm_train.is_file():
        parser.error(f"--timm-train {args.timm_train}: no such file (timm's train.py, from "
                     "git clone https://github.com/huggingface/pytorch-image-models)")
    name = "timm train.py" if args.timm_train else "the plain loop"
    results: dict[str, list[tuple[float, float, dict[str, float]]]] = {"ours": [], "reference": []}
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory() as work:
            runners = [("ours", lambda: ours(args.config, args.overrides, Path(work))),
                       ("reference", lambda: timms(args.timm_train.resolve(), cfg, Path(work)) if args.timm_train
                        else plain_loop(args.config, args.overrides, Path(work)))]
            for key, runner in runners[::-1] if round_ % 2 else runners:
                results[key].append(runner())
        print(f"round {round_ + 1}: train.py {results['ours'][-1][0]:.1f} s, {name} "
              f"{results['reference'][-1][0]:.1f} s", flush=True)
    seconds = {key: statistics.median(run[0] for run in runs) for key, runs in results.items()}
    top1 = {key: statistics.median(run[1] for run in runs) for key, runs in results.items()}
    parts = {part: statistics.median(run[2][part] for run in results["ours"]) for part in results["ours"][0][2]}
    print("train.py's time (medians, s): " + ", ".join(f"{part.removesuffix('_s')} {value:.1f}"
                                                      for part, value in parts.items()))
    print(f"train.py: {seconds['ours']:.1f} s, {name}: {seconds['reference']:.1f} s, "
          f"{seconds['reference'] / seconds['ours']:.2f}x {'timm' if args.timm_train else 'the plain loop'}; "
          f"top-1 {top1['ours']:.2f}% vs {top1['reference']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
