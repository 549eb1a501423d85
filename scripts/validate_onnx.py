#!/usr/bin/env python3
"""Validate an ONNX export (scripts/export.py --format onnx) with onnxruntime on the CPU: validate.py's data
pipeline and evaluation, with the preprocessing and class names that the model's metadata records.

    python scripts/validate_onnx.py exports/digits-femto/model.onnx --data data/digits
    python scripts/validate_onnx.py exports/mambaout_small/model.onnx --data /data/imagenet --results results.csv

--results FILE writes validate.py's record (.json) or appends its row (.csv).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mambaout.cli import requires_extra, run_cli  # noqa: E402
from mambaout.config import Config, load_config  # noqa: E402
from mambaout.export import OnnxModel  # noqa: E402
from mambaout.validation import ValidationError, ValidationRequest, validate  # noqa: E402

# flag -> config key, as validate.py's
FLAG_KEYS = {"data": "data.root", "format": "data.format", "split": "data.val_split", "batch_size": "eval.batch_size",
             "workers": "data.num_workers"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the exported model.onnx")
    parser.add_argument("--data", required=True, help="dataset folder holding the split, or the split folder itself")
    parser.add_argument("--format", help="folder, wds or parquet (data.format, default folder)")
    parser.add_argument("--split", help="sub-folder or shard split to evaluate (data.val_split, default val)")
    parser.add_argument("--batch-size", type=int, help="images per batch (eval.batch_size)")
    parser.add_argument("--workers", type=int, help="data-loading processes (data.num_workers)")
    parser.add_argument("--results", metavar="FILE", help="write the results: .json, or a row appended to .csv")
    return parser.parse_args(argv)


def evaluation_config(model: OnnxModel, args: argparse.Namespace) -> Config:
    """validate.py's config for the model's metadata and the flags: the CPU, the recorded preprocessing."""
    flags = [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in FLAG_KEYS.items()
             if getattr(args, flag) is not None]
    return load_config(None, [f"model.name={model.architecture}", "runtime.device=cpu",
                              *model.preprocessing.overrides(), *flags])


def main(argv=None) -> int:
    args = parse_args(argv)
    with requires_extra("onnx", "validate_onnx.py"):
        model = OnnxModel(args.model)
    validate(evaluation_config(model, args), ValidationRequest(checkpoint=args.model, results=args.results,
                                                               onnx=model))
    return 0


if __name__ == "__main__":
    run_cli(main, "validate_onnx.py", extra_errors=(ValidationError,))
