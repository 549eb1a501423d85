"""Validate released or trained weights: exact top-1/top-5 on one device or many.

    python validate.py --model mambaout_small --checkpoint mambaout_small.pth --data /data/imagenet
    python validate.py --model mambaout_small --pretrained --data /data/imagenet --img-size 288
    python validate.py --config configs/mambaout_small.yaml --checkpoint runs/mambaout_small/best.pth
    torchrun --nproc_per_node=8 validate.py --config configs/mambaout_small.yaml --checkpoint best.pth
    python validate.py --model mambaout_tiny mambaout_small --pretrained --data /data/imagenet-a --class-subset a
    python validate.py --model mambaout_small --pretrained --data /data/imagenet --real-labels real.json

Without --config, preprocessing follows the weights' pretrained config (size, crop, interpolation, mean/std): an
export folder's (scripts/export.py; it also names the model), else the model's; with --config, the config's eval
section. The flags below and KEY=VALUE overrides change either.
"""
import argparse
import copy
import json
import logging
import re
from pathlib import Path

from mambaout.cli import run_cli
from mambaout.config import Config, add_config_args, config_from_args
from mambaout.eval_sets import EvalSetError
from mambaout.inference import is_export_folder, read_export_config
from mambaout.runtime import runtime_from_config
from mambaout.validation import (ValidationError, ValidationRequest, pretrained_overrides, release_checkpoint,
                                 results_table, validate)

OVERRIDE = re.compile(r"^[A-Za-z_]+\.[A-Za-z_.]+=")  # section.key=value

# flag -> config key: the flags are shorthands for keys of the one schema
FLAG_KEYS = {
    "model": "model.name", "data": "data.root", "format": "data.format", "split": "data.val_split", "img_size": "eval.img_size",
    "crop_pct": "eval.crop_pct", "interpolation": "eval.interpolation", "mean": "data.mean", "std": "data.std",
    "batch_size": "eval.batch_size", "workers": "data.num_workers", "device": "runtime.device",
    "precision": "train.precision",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="validate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", nargs="+", help="weights: a release file, a timm/hub file or folder (an "
                         "export), or a training checkpoint; one per --model")
    weights.add_argument("--pretrained", action="store_true",
                         help="download the released weights of the model once (needs a network connection)")
    parser.add_argument("--model", nargs="+", help="architecture (model.name); several are validated in turn on "
                        "the same data, with one results table")
    parser.add_argument("--data", help="dataset folder holding the split, or the split folder itself; for shards a "
                        "local path or URL (data.root)")
    parser.add_argument("--format", help="folder, wds or parquet (data.format, default folder)")
    parser.add_argument("--split", help="sub-folder or shard split to evaluate (data.val_split, default val)")
    parser.add_argument("--img-size", type=int, help="evaluation resolution (eval.img_size)")
    parser.add_argument("--crop-pct", type=float, help="center-crop fraction (eval.crop_pct)")
    parser.add_argument("--interpolation", help="resize filter (eval.interpolation)")
    parser.add_argument("--mean", type=float, nargs=3, help="per-channel mean (data.mean)")
    parser.add_argument("--std", type=float, nargs=3, help="per-channel std (data.std)")
    parser.add_argument("--batch-size", type=int, help="images per device per batch (eval.batch_size)")
    parser.add_argument("--workers", type=int, help="data-loading processes (data.num_workers)")
    parser.add_argument("--device", help="auto, cpu, cuda, tpu or xla (runtime.device)")
    parser.add_argument("--precision", help="fp32, bf16 or fp16 (train.precision)")
    parser.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    parser.add_argument("--results", metavar="FILE", help="write the results: .json, or a row appended to .csv")
    parser.add_argument("--predictions", metavar="FILE.csv", help="per-image label and top-5 classes/scores")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave unreadable images out (counted in the results) instead of failing")
    parser.add_argument("--real-labels", metavar="FILE", help="ImageNet-ReaL's real.json: also report top-1/top-5 "
                        "against each image's real labels (images without any left out)")
    parser.add_argument("--class-subset", metavar="a|r|FILE", help="restrict the logits to ImageNet-A's ('a') or "
                        "ImageNet-R's ('r') 200 classes, or to a file's synsets or class indices")
    parser.add_argument("--eval-set", metavar="NAME", help="the set's name in the results (default: imagenet-real, "
                        "imagenet-a or imagenet-r from the flags, else the data folder's name)")
    return parser


def parse_args(argv=None) -> tuple[argparse.Namespace, list[tuple[str | None, Config]]]:
    """The arguments and, per model to validate, its checkpoint (None: the release) and resolved config:
    pretrained config or --config file, then flags, then KEY=VALUE."""
    parser = build_parser()
    add_config_args(parser)
    args = parser.parse_args(argv)
    _return_overrides(args)
    checkpoints = args.checkpoint or [None] * len(args.model or [None])
    models = args.model or [read_export_config(c)["architecture"] if c and is_export_folder(c) else None
                            for c in checkpoints]
    if args.checkpoint and len(checkpoints) != len(models):
        parser.error(f"give one --checkpoint per --model ({len(models)} models, {len(checkpoints)} checkpoints)")
    if args.config is None and None in models and not args.help_config:
        parser.error("give --model NAME (with --checkpoint or --pretrained), or --config FILE")
    jobs = [(checkpoint, _config(parser, args, model, checkpoint)) for model, checkpoint in zip(models, checkpoints)]
    if not (args.checkpoint or args.pretrained):
        parser.error("give --checkpoint PATH or --pretrained")
    return args, jobs


def _return_overrides(args: argparse.Namespace) -> None:
    """KEY=VALUE overrides right after --model or --checkpoint are taken by their lists: give them back."""
    for flag in ("model", "checkpoint"):
        values = getattr(args, flag)
        if values:
            taken = [value for value in values if OVERRIDE.match(value)]
            setattr(args, flag, [value for value in values if not OVERRIDE.match(value)] or None)
            args.overrides = [*taken, *args.overrides]


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace, model: str | None,
            checkpoint: str | None) -> Config:
    one = copy.copy(args)
    one.model = model
    overrides = [f"{key}={json.dumps(getattr(one, flag))}" for flag, key in FLAG_KEYS.items()
                 if getattr(one, flag) is not None]
    if args.use_ema:
        overrides.append("eval.use_ema=true")
    if args.config is None and not args.help_config:
        overrides = pretrained_overrides(model, checkpoint) + overrides
    return config_from_args(parser, one, overrides)


def main(argv=None) -> int:
    args, jobs = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # several models and a .json: one list at the end (a .csv gets a row per model as it goes)
    gathered = args.results is not None and Path(args.results).suffix == ".json" and len(jobs) > 1
    runtime = runtime_from_config(jobs[0][1])
    with runtime.session():
        summaries = [validate(cfg, ValidationRequest(
            checkpoint=release_checkpoint(cfg.model.name) if args.pretrained else checkpoint,
            results=None if gathered else args.results, predictions=args.predictions,
            skip_bad_images=args.skip_bad_images, real_labels=args.real_labels, class_subset=args.class_subset,
            eval_set=args.eval_set), runtime) for checkpoint, cfg in jobs]
        if runtime.is_main and len(summaries) > 1:
            print(results_table(summaries), flush=True)
            if gathered:
                Path(args.results).write_text(json.dumps(summaries, indent=2) + "\n")
    return 0


def cli(argv=None) -> None:
    """``main`` with user errors as one ``validate.py: error: ...`` line on stderr and exit status 2."""
    run_cli(lambda: main(argv), "validate.py", extra_errors=(ValidationError, EvalSetError))


if __name__ == "__main__":
    cli()
