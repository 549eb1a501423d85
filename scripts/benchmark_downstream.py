#!/usr/bin/env python3
"""Fine-tuning end to end without COCO or ADE20K: Mask R-CNN and UperNet with a MambaOut backbone, from the shipped
recipe configs, trained from scratch on the synthetic sets of mambaout.downstream.synthetic (coloured squares and
discs on noise), longer and wider than the tests' runs. Prints the final box/mask AP and mIoU, and the seconds per
optimizer step.

    python scripts/benchmark_downstream.py                                   # femto backbone, 256 px
    python scripts/benchmark_downstream.py --tasks segmentation --steps 100 model.name=mambaout_tiny
    python scripts/benchmark_downstream.py --quick                           # the tests' narrow backbone, 128 px

KEY=VALUE overrides apply to both runs (runtime.device=cuda train.precision=bf16 ...). Each run has its own run
folder under --out. The recipes' lr (1e-4 for ImageNet-initialised backbones) becomes --lr: these backbones start
from random weights.
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from mambaout.cli import requires_extra  # noqa: E402

with requires_extra("downstream", "benchmark_downstream.py"):
    from mambaout.config import load_config
    from mambaout.downstream.detection import DETECTION
    from mambaout.downstream.finetune import finetune
    from mambaout.downstream.segmentation import SEGMENTATION
    from mambaout.downstream.synthetic import write_ade20k, write_coco

CONFIGS = {"detection": REPO / "configs/downstream/maskrcnn_mambaout_tiny_coco.yaml",
           "segmentation": REPO / "configs/downstream/upernet_mambaout_tiny_ade20k.yaml"}
NARROW = ["model.depths=[1,1,2,1]", "model.dims=[16,32,64,96]"]
NARROW_HEADS = {"detection": ["model.fpn_channels=32", "model.box_head_width=128", "model.mask_head_channels=32",
                              "model.rpn_proposals=[50,50]", "model.rois_per_image=32"],
                "segmentation": ["model.decoder_channels=32"]}


def synthetic_data(root: Path, size: int, train_images: int, val_images: int) -> Path:
    sizes = ((size, size), (size * 5 // 4, size), (size, size * 5 // 4))
    if not (root / "done").exists():
        write_coco(root / "coco", "train", train_images, seed=1, sizes=sizes)
        write_coco(root / "coco", "val", val_images, seed=2, sizes=sizes)
        write_ade20k(root / "ade20k", "training", train_images, seed=3, sizes=sizes)
        write_ade20k(root / "ade20k", "validation", val_images, seed=4, sizes=sizes)
        (root / "done").touch()
    return root


def settings(task: str, args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    common = ["model.name=mambaout_femto", "model.drop_path_rate=0.1", f"train.output_dir={out}",
              f"train.max_steps={args.steps}", f"optim.lr={args.lr}", f"optim.global_batch_size={args.batch}",
              f"train.micro_batch_size={args.batch}", "train.precision=fp32", "train.log_interval=10",
              "train.checkpoint_every_steps=null", "data.num_workers=2", "runtime.device=cpu"]
    if args.quick:
        common += NARROW + NARROW_HEADS[task]
    size = args.size
    if task == "detection":
        return [f"data.root={data / 'coco'}", "data.train_images=train", "data.val_images=val",
                "data.train_annotations=annotations/instances_train.json",
                "data.val_annotations=annotations/instances_val.json", "model.num_classes=2",
                f"data.short_side={size}", f"data.max_size={size * 5 // 4}", f"sched.epochs={args.steps}",
                f"sched.milestones=[{args.steps},{args.steps}]", "sched.warmup_steps=20",
                f"eval.every_epochs={args.steps}", *common]
    return [f"data.root={data / 'ade20k'}", "model.num_classes=3", f"data.scale=[{size * 5 // 4},{size}]",
            "data.ratio_range=[0.75,1.25]", f"data.crop_size={size}", f"sched.total_steps={args.steps}",
            "sched.warmup_steps=20", f"eval.every_steps={args.steps}", *common]


def seconds_per_image(out: Path) -> float:
    """From steps.csv: the logged rows' throughput, the first row (start-up, first batches) left out."""
    with open(out / "steps.csv") as f:
        rates = [float(row["img_per_s"]) for row in csv.DictReader(f)][1:]
    return float("nan") if not rates else sum(1 / rate for rate in rates) / len(rates)  # s per image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["detection", "segmentation"], choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--size", type=int, default=256, help="shorter image side")
    parser.add_argument("--batch", type=int, default=4, help="global batch (one micro-batch)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--quick", action="store_true", help="the tests' narrow backbone and heads, 128 px")
    parser.add_argument("--out", type=Path, default=Path(f"runs/benchmark-downstream-{time.strftime('%Y%m%d-%H%M%S')}"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.quick:
        args.size = 128
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    data = synthetic_data(args.out / "data", args.size, train_images=64, val_images=16)
    rows = []
    for task in args.tasks:
        definition = DETECTION if task == "detection" else SEGMENTATION
        out = args.out / task
        cfg = load_config(CONFIGS[task], [*settings(task, args, data, out), *args.overrides], definition.schema)
        start = time.perf_counter()
        outcome = finetune(cfg, definition, resume="never")
        shown = {key: value for key, value in outcome.final_eval.items()
                 if key in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50", "mIoU", "aAcc")}
        rows.append((task, cfg.model.name + (" (narrow)" if args.quick else ""), outcome.step,
                     seconds_per_image(out) * args.batch, time.perf_counter() - start, shown))
    print(f"\n| task | backbone | steps | s/step (batch {args.batch}, {args.size} px) | run s | metrics |")
    print("|---|---|---|---|---|---|")
    for task, model, steps, per_step, seconds, metrics in rows:
        shown = ", ".join(f"{key} {value:.1f}" for key, value in metrics.items() if value is not None)
        print(f"| {task} | {model} | {steps} | {per_step:.2f} | {seconds:.0f} | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
