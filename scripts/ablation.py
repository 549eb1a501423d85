#!/usr/bin/env python3
"""Is Mamba needed? The paper's ablation in one command: the Gated CNN and the same network with its SSM, trained
by the same recipe on the same data, then one table.

    python scripts/ablation.py [--configs configs/ablation/femto.yaml configs/ablation/femto_ssm.yaml]
                               [--out runs/ablation-<time>] [KEY=VALUE ...]

The quickstart's digits are made first when the configs use them (data/digits); KEY=VALUE overrides apply to
every run (data.root=DIR for your data, sched.epochs=..., runtime.device=cuda). Each run is train.py in its own
process (its own run folder under --out, resumable as any run); the table gives params, GMACs at the training
resolution, training img/s (metrics.csv, the evaluation excluded: the median over epochs, so that one slowed epoch
does not decide it), peak memory (resident memory on CPU, the allocator's peak on a GPU/TPU) and the best top-1.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_CONFIGS = ["configs/ablation/femto.yaml", "configs/ablation/femto_ssm.yaml"]


def train(config: str, output_dir: Path, overrides: list[str]) -> None:
    command = [sys.executable, "train.py", "--config", config, f"train.output_dir={output_dir}", *overrides]
    print("$ " + shlex.join(["python", *command[1:]]), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def row(config: str, output_dir: Path, overrides: list[str]) -> dict:
    from mambaout.config import load_config
    from mambaout.models import create_model
    from mambaout.models.info import count_macs

    import torch

    cfg = load_config(REPO / config, overrides)
    with open(output_dir / "metrics.csv", newline="") as f:
        epochs = list(csv.DictReader(f))
    classes = len(json.loads((output_dir / "classes.json").read_text()))
    with torch.device("meta"):
        model = create_model(cfg.model.name, num_classes=classes)
    return {"model": cfg.model.name, "img_size": cfg.data.img_size,
            "params": sum(p.numel() for p in model.parameters()),
            "gmacs": count_macs(model, cfg.data.img_size) / 1e9,
            "img_per_s": statistics.median(float(epoch["img_per_s"]) for epoch in epochs),
            "peak_mib": max(float(epoch["peak_memory_mib"] or "nan") for epoch in epochs),
            "top1": max(float(epoch["top1"]) for epoch in epochs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--out", type=Path, default=Path(f"runs/ablation-{time.strftime('%Y%m%d-%H%M%S')}"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    if not any(o.startswith("data.root=") for o in args.overrides) and not (REPO / "data/digits/val").is_dir():
        subprocess.run([sys.executable, "scripts/make_digits_dataset.py", "data/digits"], cwd=REPO, check=True)
    rows = []
    for config in args.configs:
        output_dir = (args.out / Path(config).stem).resolve()
        try:
            train(config, output_dir, args.overrides)
        except subprocess.CalledProcessError as error:
            print(f"{config}: train.py ended with status {error.returncode}; see {output_dir}")
            return error.returncode
        rows.append(row(config, output_dir, args.overrides))
    print(f"\n| model | params | GMACs @{rows[0]['img_size']}px | train img/s | peak memory | top-1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['gmacs']:.3f} | {r['img_per_s']:.1f} | "
              f"{r['peak_mib']:.0f} MiB | {r['top1']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
