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
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from torch.utils.data import DataLoader  # noqa: E402

from mambaout.cli import requires_extra, run_cli  # noqa: E402
from mambaout.config import Config, load_config  # noqa: E402
from mambaout.data import EvalBatchSampler  # noqa: E402
from mambaout.data.pipeline import build_pipeline  # noqa: E402
from mambaout.data.sources import plan_reads  # noqa: E402
from mambaout.engine import EvalResult, evaluate  # noqa: E402
from mambaout.export import OnnxModel  # noqa: E402
from mambaout.runtime import runtime_from_config  # noqa: E402
from mambaout.tracking import software_versions  # noqa: E402
from mambaout.validation import (BadImagesError, ValidationError, build_eval_dataset, published_reference,  # noqa: E402
                                 write_results)

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


def validate_onnx(model: OnnxModel, cfg: Config, source: str) -> dict:
    """Evaluates ``model`` as ``cfg`` says; returns validate.py's record of it."""
    runtime = runtime_from_config(cfg)
    with runtime.session():
        pipeline = build_pipeline(cfg, runtime.kind, runtime.fixed_shapes)
        dataset = build_eval_dataset(cfg, pipeline.eval.reader, model.labels)
        if dataset.num_classes != model.num_classes:
            raise ValidationError(f"{source}: the model predicts {model.num_classes} classes but the dataset "
                                  f"'{dataset.root}' has {dataset.num_classes}")
        sampler = EvalBatchSampler(len(dataset), cfg.eval.batch_size, num_shards=1, shard=0)
        loader = DataLoader(dataset, batch_sampler=plan_reads(dataset, sampler, cfg.data),
                            num_workers=cfg.data.num_workers, collate_fn=pipeline.eval.collate)
        start = time.perf_counter()
        result = evaluate(model, loader, runtime, prepare_batch=pipeline.eval.prepare(runtime))
        seconds = time.perf_counter() - start
    if result.bad_indices:
        raise BadImagesError(f"{len(result.bad_indices)} image(s) could not be read, the first "
                             f"{dataset.describe(result.bad_indices[0])}: replace them")
    data = str(getattr(dataset, "root", None) or cfg.data.format)
    return record(model, source, data, pipeline.name, result, seconds)


def record(model: OnnxModel, source: str, data: str, pipeline: str, result: EvalResult, seconds: float) -> dict:
    """validate.py's keys (those that apply: no parameter or MAC count of a graph)."""
    preprocessing = model.preprocessing
    summary = {"model": model.architecture, "checkpoint": source, "data": data, "pipeline": pipeline,
               "img_size": preprocessing.img_size, "crop_pct": preprocessing.crop_pct,
               "interpolation": preprocessing.interpolation, "mean": list(preprocessing.mean),
               "std": list(preprocessing.std), **result.as_dict(), "bad_images_skipped": 0,
               "img_per_s": round(result.count / max(seconds, 1e-9), 2), "devices": 1, "device": "cpu",
               "versions": {**software_versions(), "onnxruntime": version("onnxruntime")}}
    reference = published_reference(model.architecture, model.num_classes, preprocessing.img_size,
                                     preprocessing.crop_pct, preprocessing.interpolation)
    if reference:
        summary.update(reference, top1_minus_published=round(result.top1 - reference["published_top1"], 3))
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    with requires_extra("onnx", "validate_onnx.py"):
        model = OnnxModel(args.model)
    summary = validate_onnx(model, evaluation_config(model, args), args.model)
    print(f"{summary['model']} (onnxruntime) @ {summary['img_size']}px on {summary['count']} images: "
          f"top-1 {summary['top1']:.3f}  top-5 {summary['top5']:.3f}  loss {summary['loss']:.4f}  "
          f"({summary['img_per_s']:.1f} img/s)", flush=True)
    if args.results:
        write_results(summary, args.results)
    return 0


if __name__ == "__main__":
    run_cli(main, "validate_onnx.py", extra_errors=(ValidationError,))
