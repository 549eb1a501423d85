"""Validation of a checkpoint on a dataset: exact top-1/top-5 whatever the device count.

Used by ``validate.py``; the evaluation itself is ``engine.evaluate``, shared with the training loop.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import checkpoint
from .config import Config, eval_img_size
from .data import EvalBatchSampler, build_dataset
from .data.pipeline import build_pipeline
from .data.sources import plan_reads, source_options
from .engine import evaluate
from .export import OnnxModel
from .eval_sets import (RestrictedLogits, check_targets_in_subset, eval_set_name, read_real_labels, real_accuracy,
                        subset_classes)
from .inference import (Preprocessing, classifier_outputs, is_export_folder, pretrained_preprocessing,
                        read_checkpoint_info, read_export_config)
from .models import create_model
from .models.info import count_macs
from .models.published import PUBLISHED
from .runtime import Runtime, runtime_from_config
from .tracking import Progress, software_versions

log = logging.getLogger("mambaout")

# Columns of a --results .csv (a row per run; an existing file keeps its own header).
RESULT_COLUMNS = ("model", "checkpoint", "data", "eval_set", "pipeline", "img_size", "crop_pct", "interpolation",
                  "use_ema", "top1", "top5", "loss", "count", "real_top1", "real_top5", "real_count", "bad_images_skipped", "params", "gmacs", "img_per_s",
                  "devices", "device", "published_top1", "top1_minus_published")


class ValidationError(Exception):
    """A validation that cannot run as asked; the message says what to do."""


class BadImagesError(ValidationError):
    pass


@dataclass
class ValidationRequest:
    """What validate.py asks for beyond the config (which holds model, data and eval settings)."""

    checkpoint: str
    results: str | None = None
    predictions: str | None = None
    skip_bad_images: bool = False
    real_labels: str | None = None  # ReaL's real.json: top-1/top-5 against each image's set of real labels
    class_subset: str | None = None  # 'a', 'r' or a file: the logits restricted to those ImageNet-1k classes
    eval_set: str | None = None  # the set's name in the results; None = from the flags or the folder
    onnx: OnnxModel | None = None  # an ONNX export of ``checkpoint``, run by onnxruntime instead of its weights


def validate(cfg: Config, request: ValidationRequest, runtime: Runtime | None = None) -> dict[str, Any]:
    """Evaluates ``request.checkpoint`` as ``cfg`` says; returns (and reports) the summary. ``runtime``: one
    already in its session (several models validated in one call), else one made for this call."""
    if runtime is not None:
        return _validate(cfg, request, runtime)
    runtime = runtime_from_config(cfg)
    with runtime.session():
        return _validate(cfg, request, runtime)


def _validate(cfg: Config, request: ValidationRequest, runtime: Runtime) -> dict[str, Any]:
    pipeline = build_pipeline(cfg, runtime.kind, runtime.fixed_shapes)
    stage = pipeline.eval
    if request.onnx is not None:
        model = request.onnx
        dataset = build_eval_dataset(cfg, stage.reader, model.labels)
        check_outputs(model.num_classes, dataset, request.checkpoint)
    else:
        weights, classes = read_checkpoint(request.checkpoint, cfg.eval.use_ema)
        dataset = build_eval_dataset(cfg, stage.reader, classes)
        model = build_model(cfg.model.name, weights, dataset, request.checkpoint)
    if request.class_subset:
        model = restricted(model, dataset, request.class_subset)
    real_labels = read_real_labels(request.real_labels) if request.real_labels else None
    runtime.prepare_model(model, cfg.train.channels_last)  # evaluation runs the bare model, as training's

    sampler = EvalBatchSampler(len(dataset), cfg.eval.batch_size * len(runtime.shard_ids),
                               runtime.world_size, runtime.rank, pad_to_full=runtime.fixed_shapes)
    loader = DataLoader(dataset, batch_sampler=plan_reads(dataset, sampler, cfg.data),
                        num_workers=cfg.data.num_workers, collate_fn=stage.collate,
                        pin_memory=runtime.device.type == "cuda")
    progress = Progress(len(dataset), "validate", enabled=runtime.is_main)
    start = time.perf_counter()
    result = evaluate(model, loader, runtime,
                      collect_predictions=request.predictions is not None or real_labels is not None,
                      # this process's share times the world size: an estimate, capped at the total
                      on_batch=lambda n: progress.update(min(n * runtime.world_size,
                                                             len(dataset) - progress.done)),
                      prepare_batch=stage.prepare(runtime))
    seconds = time.perf_counter() - start
    bad_files = [dataset.describe(i) for i in result.bad_indices]
    if result.count + len(bad_files) != len(dataset):  # the promise of exact evaluation, checked
        raise RuntimeError(f"evaluated {result.count} + {len(bad_files)} unreadable images of {len(dataset)}")
    if bad_files and not request.skip_bad_images:
        raise BadImagesError(
            f"{len(bad_files)} image(s) could not be read: {', '.join(bad_files[:20])}"
            f"{' ...' if len(bad_files) > 20 else ''}. Replace them, or pass --skip-bad-images to "
            "leave them out (the count is recorded in the results).")
    summary = _summary(cfg, request, result.as_dict(), model, dataset, runtime, seconds, len(bad_files))
    summary["pipeline"] = pipeline.name
    summary.update(_eval_set_results(request, result, dataset, real_labels, summary["data"]))
    if runtime.is_main:
        _report(summary)
        if request.results:
            write_results(summary, request.results)
        if request.predictions:
            bad = set(result.bad_indices)
            write_predictions([row for row in result.predictions if row[0] not in bad], dataset,
                              request.predictions)
    return summary


# --- what to evaluate ------------------------------------------------------------------------------------------

def pretrained_overrides(model_name: str, checkpoint_path: str | None = None) -> list[str]:
    """Config overrides that evaluate like the weights' pretrained config (size, crop, filter, mean/std): an
    export folder's own, else the model's."""
    if checkpoint_path is not None and is_export_folder(checkpoint_path):
        return Preprocessing.from_pretrained_cfg(read_export_config(checkpoint_path)["pretrained_cfg"]).overrides()
    try:
        return pretrained_preprocessing(model_name).overrides()
    except ValueError as error:  # unknown name: the message lists the closest ones
        raise ValidationError(str(error)) from None


def release_checkpoint(model_name: str) -> str:
    """Path of the released weights of ``model_name``, downloaded once into torch's hub cache."""
    published = PUBLISHED.get(model_name)
    if published is None:
        raise ValidationError(
            f"--pretrained: no released weights are known for {model_name!r} (known: {', '.join(PUBLISHED)}); "
            "download the weights yourself and pass --checkpoint PATH")
    target = Path(torch.hub.get_dir()) / "checkpoints" / published.release_file
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(published.release_url, str(target), progress=True)
        except OSError as error:  # URLError is an OSError: offline, proxy, DNS, refused
            raise ValidationError(
                f"--pretrained: could not download {published.release_url} ({error}). Without a network "
                f"connection, fetch that file elsewhere and pass --checkpoint PATH") from None
    return str(target)


def read_checkpoint(path: str, use_ema: bool) -> tuple[dict, list[str] | None]:
    """The weights and, where the checkpoint says it, the class list they were trained on (a training checkpoint,
    the ``classes.json`` of the run folder beside it, an export folder's label names)."""
    info = read_checkpoint_info(path, use_ema)
    return info.weights, info.labels


def build_eval_dataset(cfg: Config, reader, classes: list[str] | None = None):
    """The split to evaluate, read by the input pipeline's evaluation ``reader``; ``data.root`` may also be the
    split folder itself (as with timm)."""
    data, split = cfg.data, cfg.data.val_split
    if data.format != "synthetic" and data.root is None:
        raise ValidationError("no dataset given: pass --data DIR or URL (or data.root=...)")
    if data.format == "folder":
        root = Path(data.root)
        if root.is_dir() and not (root / split).is_dir() and not (root / data.train_split).is_dir():
            log.info("%s has no '%s' sub-folder: evaluating the folder itself", root, split)
            split = ""
    return build_dataset(data.root, split, reader, train=False, classes=classes,
                         format=data.format, num_samples=data.synthetic_val_size,
                         num_classes=data.synthetic_num_classes, img_size=eval_img_size(cfg), seed=cfg.train.seed,
                         **source_options(data))


def build_model(name: str, weights: dict, dataset, source: str) -> nn.Module:
    """``name`` with ``weights``, whose classifier must predict the dataset's classes."""
    model = _create(name, num_classes=dataset.num_classes)
    check_outputs(classifier_outputs(model, weights, source), dataset, source)
    checkpoint.load_weights(model, weights, source=source)
    return model


def check_outputs(outputs: int, dataset, source: str) -> None:
    """Refuses a classifier of ``outputs`` classes for a dataset of another count."""
    if outputs != dataset.num_classes:
        raise ValidationError(
            f"{source}: the model predicts {outputs} classes but the dataset '{dataset.root}' has "
            f"{dataset.num_classes}. Evaluate on the dataset it was trained on (ImageNet synset folders map "
            "to the 1000 classes), or pass a checkpoint of this project, which records its class list.")


def restricted(model: nn.Module, dataset, subset: str) -> nn.Module:
    """``model`` predicting only the classes of ``subset`` (``eval_sets.subset_classes``) of its 1000."""
    if dataset.num_classes != 1000:
        raise ValidationError(f"--class-subset {subset}: restricts the 1000 ImageNet-1k classes, and the dataset "
                              f"'{dataset.root}' has {dataset.num_classes}; use ImageNet synset folders")
    classes = subset_classes(subset)
    check_targets_in_subset(dataset.targets, classes, subset)
    return RestrictedLogits(model, classes, 1000)


def _create(name: str, **overrides) -> nn.Module:
    try:
        return create_model(name, **overrides)
    except ValueError as error:  # unknown name: the message lists the closest ones
        raise ValidationError(str(error)) from None


# --- results ---------------------------------------------------------------------------------------------------

def published_reference(name: str, num_classes: int, img_size: int, crop_pct: float,
                        interpolation: str) -> dict[str, float]:
    """The published top-1 of a released model evaluated as it was published (ImageNet-1k, crop 1.0, bicubic):
    timm's re-evaluation of the released weights at 224 or 288, and the paper's figure at 224."""
    published = PUBLISHED.get(name)
    if published is None or num_classes != 1000 or crop_pct != 1.0 or interpolation != "bicubic":
        return {}
    timm_top1 = {224: published.timm_top1_224, 288: published.timm_top1_288}.get(img_size)
    if timm_top1 is None:
        return {}
    return {"published_top1": timm_top1, **({"paper_top1": published.top1} if img_size == 224 else {})}


def _summary(cfg: Config, request: ValidationRequest, result: dict[str, Any], model: nn.Module, dataset,
             runtime: Runtime, seconds: float, bad_images: int) -> dict[str, Any]:
    size = eval_img_size(cfg)
    summary: dict[str, Any] = {
        "model": cfg.model.name,
        "checkpoint": request.checkpoint,
        "data": str(getattr(dataset, "root", None) or cfg.data.format),  # the folder evaluated
        "img_size": size,
        "crop_pct": cfg.eval.crop_pct,
        "interpolation": cfg.eval.interpolation,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "use_ema": cfg.eval.use_ema,
        **result,
        "bad_images_skipped": bad_images,
        "img_per_s": round(result["count"] / max(seconds, 1e-9), 2),
        "devices": runtime.num_shards,
        "device": runtime.kind,
        "precision": cfg.train.precision,
        "versions": software_versions(),
    }
    if request.onnx is None:  # an ONNX graph has no parameters to count
        summary["params"] = sum(p.numel() for p in model.parameters())
        summary["gmacs"] = round(_gmacs(cfg.model.name, dataset.num_classes, size), 4)
    else:
        summary["versions"]["onnxruntime"] = version("onnxruntime")
    reference = published_reference(cfg.model.name, dataset.num_classes, size, cfg.eval.crop_pct,
                                     cfg.eval.interpolation)
    if reference:
        summary.update(reference)
        summary["top1_minus_published"] = round(result["top1"] - reference["published_top1"], 3)
    return summary


def _eval_set_results(request: ValidationRequest, result, dataset, real_labels: list[list[int]] | None,
                      data: str) -> dict[str, Any]:
    """The set's name, its class subset, and with ReaL labels their top-1/top-5 (unreadable images left out)."""
    extra: dict[str, Any] = {"eval_set": eval_set_name(request.eval_set, request.real_labels, request.class_subset,
                                                       data)}
    if request.class_subset:
        extra["class_subset"] = request.class_subset
    if real_labels is not None:
        bad = set(result.bad_indices)
        extra.update(real_accuracy([row for row in result.predictions if row[0] not in bad], dataset.describe,
                                   real_labels))
    return extra


def _gmacs(model_name: str, num_classes: int, img_size: int) -> float:
    """Counted on a shape-only copy, so no device (XLA above all) runs an extra graph for it."""
    with torch.device("meta"):
        model = create_model(model_name, num_classes=num_classes)
    return count_macs(model, img_size) / 1e9


def _report(summary: dict[str, Any]) -> None:
    counts = f", {summary['params']:,} params, {summary['gmacs']:.2f} GMACs" if "params" in summary else ""
    runner = "" if "onnxruntime" not in summary["versions"] else " (onnxruntime)"
    line = (f"{summary['model']}{runner} @ {summary['img_size']}px on {summary['count']} images of "
            f"{summary['eval_set']}: top-1 {summary['top1']:.3f}  top-5 {summary['top5']:.3f}  loss "
            f"{summary['loss']:.4f}  ({summary['img_per_s']:.1f} img/s{counts})")
    if "published_top1" in summary:
        paper = f", paper {summary['paper_top1']:.1f}" if "paper_top1" in summary else ""
        line += (f"\n  published top-1 {summary['published_top1']:.3f} (timm, released weights{paper}): "
                 f"difference {summary['top1_minus_published']:+.3f}")
    if "real_top1" in summary:
        line += (f"\n  ReaL labels: top-1 {summary['real_top1']:.3f}  top-5 {summary['real_top5']:.3f} on the "
                 f"{summary['real_count']} images with real labels")
    if summary["bad_images_skipped"]:
        line += f"\n  {summary['bad_images_skipped']} unreadable image(s) skipped"
    print(line, flush=True)


def results_table(summaries: list[dict[str, Any]]) -> str:
    """One line per validated model, in a Markdown table (what several --model print at the end)."""
    real = any("real_top1" in summary for summary in summaries)
    columns = ["model", "eval set", "img size", "top-1", "top-5", *(["ReaL top-1"] if real else []), "images",
               "img/s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for s in summaries:
        cells = [s["model"], s["eval_set"], s["img_size"], f"{s['top1']:.3f}", f"{s['top5']:.3f}",
                 *([f"{s['real_top1']:.3f}" if "real_top1" in s else ""] if real else []), s["count"],
                 f"{s['img_per_s']:.1f}"]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def write_results(summary: dict[str, Any], path: str) -> None:
    """``.json`` (the whole record) or ``.csv`` (one row appended per run, header on creation)."""
    target = Path(path)
    if target.suffix == ".json":
        target.write_text(json.dumps(summary, indent=2) + "\n")
        return
    new = not target.exists() or target.stat().st_size == 0
    header = list(RESULT_COLUMNS) if new else next(csv.reader(target.open(newline="")))
    with open(target, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="", extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(summary)


def write_predictions(predictions, dataset, path: str) -> None:
    """One row per image: file, label, then the top-5 classes and their probabilities."""
    names = dataset.classes
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        k = len(predictions[0][2]) if predictions else 5
        writer.writerow(["image", "label", *[f"top{i + 1}" for i in range(k)],
                         *[f"prob{i + 1}" for i in range(k)]])
        for index, target, classes, scores in predictions:
            # synthetic images have no file: named by index
            image = dataset.source.name(index) if hasattr(dataset, "source") else str(index)
            writer.writerow([image, names[target] if target >= 0 else "", *[names[c] for c in classes],
                             *[f"{s:.6f}" for s in scores]])
