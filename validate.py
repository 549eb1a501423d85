"""Validate released or trained weights: exact top-1/top-5 on one device or many.

    python validate.py --model mambaout_small --checkpoint mambaout_small.pth --data /data/imagenet
    python validate.py --model mambaout_small --pretrained --data /data/imagenet --img-size 288
    python validate.py --config configs/mambaout_small.yaml --checkpoint runs/mambaout_small/best.pth
    torchrun --nproc_per_node=8 validate.py --config configs/mambaout_small.yaml --checkpoint best.pth

Without --config, preprocessing follows the weights' pretrained config (size, crop, interpolation, mean/std): an
export folder's (scripts/export.py; it also names the model), else the model's; with --config, the config's eval
section. The flags below and KEY=VALUE overrides change either.
"""
import argparse
import json
import logging

from mambaout.cli import run_cli
from mambaout.config import Config, add_config_args, config_from_args
from mambaout.inference import is_export_folder, read_export_config
from mambaout.validation import ValidationError, ValidationRequest, pretrained_overrides, release_checkpoint, validate

# flag -> config key: the flags are shorthands for keys of the one schema
FLAG_KEYS = {
    "model": "model.name", "data": "data.root", "format": "data.format", "split": "data.val_split", "img_size": "eval.img_size",
    "crop_pct": "eval.crop_pct", "interpolation": "eval.interpolation", "mean": "data.mean", "std": "data.std",
    "batch_size": "eval.batch_size", "workers": "data.num_workers", "device": "runtime.device",
    "precision": "train.precision",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", help="weights: a release file, a timm/hub file or folder (an export), or a "
                         "training checkpoint")
    weights.add_argument("--pretrained", action="store_true",
                         help="download the released weights of the model once (needs a network connection)")
    parser.add_argument("--model", help="architecture (model.name)")
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
    return parser


def parse_args(argv=None) -> tuple[argparse.Namespace, Config]:
    """The arguments and the resolved config: pretrained config or --config file, then flags, then KEY=VALUE."""
    parser = build_parser()
    add_config_args(parser)
    args = parser.parse_args(argv)
    if args.model is None and args.checkpoint and is_export_folder(args.checkpoint):
        args.model = read_export_config(args.checkpoint)["architecture"]
    if args.config is None and args.model is None and not args.help_config:
        parser.error("give --model NAME (with --checkpoint or --pretrained), or --config FILE")
    overrides = [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in FLAG_KEYS.items()
                 if getattr(args, flag) is not None]
    if args.use_ema:
        overrides.append("eval.use_ema=true")
    if args.config is None and not args.help_config:
        overrides = pretrained_overrides(args.model, args.checkpoint) + overrides
    cfg = config_from_args(parser, args, overrides)
    if not (args.checkpoint or args.pretrained):
        parser.error("give --checkpoint PATH or --pretrained")
    return args, cfg


def main(argv=None) -> int:
    args, cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    checkpoint = release_checkpoint(cfg.model.name) if args.pretrained else args.checkpoint
    validate(cfg, ValidationRequest(checkpoint=checkpoint, results=args.results, predictions=args.predictions,
                                    skip_bad_images=args.skip_bad_images))
    return 0


def cli(argv=None) -> None:
    """``main`` with user errors as one ``validate.py: error: ...`` line on stderr and exit status 2."""
    run_cli(lambda: main(argv), "validate.py", extra_errors=(ValidationError,))


if __name__ == "__main__":
    cli()
