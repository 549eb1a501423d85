"""The input pipelines behind ``data.pipeline``, and the one choice between them.

* ``timm``: timm's PIL transforms in the workers, the bit-exact reference (``transforms.py``, ``PilReader``);
* ``tensor``: decoding and augmentation as tensor ops, the augmentation on the device or in the workers
  (``tensor_pipeline.py``);
* ``nvjpeg``: JPEG decoding on the GPU as well (``nvjpeg_pipeline.py``);
* ``auto``: ``nvjpeg`` on CUDA, ``tensor`` elsewhere.

A pipeline is two ``Stage``s, one per split: what the DataLoader workers do per sample (a ``SampleReader``), how
samples are collated, and what the main process does to a batch to give the model its input (``finish``:
images in the model's memory format and targets, on the device). The training loop only calls ``finish``;
it never asks which pipeline it is fed by. docs/DATA.md describes what runs where.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import Config, ConfigError, eval_img_size
from .augment import Augmenter
from .datasets import PilReader, SampleReader
from .nvjpeg_pipeline import (NvjpegEvalReader, NvjpegTrainReader, collate, decode_crop_augment,
                              decode_resize_normalize)
from .plan import SamplePlanner, UnsupportedAugmentation
from .tensor_pipeline import (TensorEvalReader, TensorTrainReader, augment_in_collate, augment_on_device,
                              normalize_on_device)
from .transforms import build_eval_transform, build_train_transform

log = logging.getLogger("mambaout")

Finish = Callable[[dict[str, Any], Any], tuple[torch.Tensor, torch.Tensor]]


def to_model_input(batch: dict[str, Any], runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """``finish`` of batches that leave the workers ready for the model (timm, augmentation in the workers,
    synthetic data): images and targets to the device."""
    return runtime.batch_to_device(batch)


@dataclass(frozen=True)
class Stage:
    reader: SampleReader | None  # None: the dataset makes its items itself (synthetic)
    finish: Finish = to_model_input
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None  # None: torch's default

    def prepare(self, runtime) -> Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]:
        """The loop's ``prepare_batch`` on ``runtime``."""
        return functools.partial(self.finish, runtime=runtime)


@dataclass(frozen=True)
class Pipeline:
    name: str  # resolved: timm, tensor or nvjpeg ("synthetic" for generated data)
    augment_on: str  # where RandAugment, normalisation and erasing run: workers or device
    train: Stage
    eval: Stage

    def describe(self) -> dict[str, str]:
        """What the manifest records: the pipeline, where it augments, and what decodes its JPEGs (the tensor
        pipelines: TorchCodec or torchvision, ``decode.jpeg_decoder``; timm: PIL)."""
        info = {"pipeline": self.name, "augment_on": self.augment_on}
        if self.name == "timm":
            import PIL

            info["jpeg_decoder"] = f"PIL {PIL.__version__}"
        elif self.name != "synthetic":
            from .decode import jpeg_decoder

            info["jpeg_decoder"] = jpeg_decoder().label
        return info


def resolve(pipeline: str, augment_on: str, device: str) -> tuple[str, str]:
    """``(pipeline, augment_on)`` for a runtime of kind ``device`` (cpu, cuda, xla), or a ConfigError."""
    name = ("nvjpeg" if device == "cuda" else "tensor") if pipeline == "auto" else pipeline
    if name == "nvjpeg" and device == "xla":
        raise ConfigError("data.pipeline=nvjpeg decodes JPEGs on a CUDA GPU; on XLA use data.pipeline=tensor "
                          "(or auto), which augments on the TPU")
    if name == "timm":
        if augment_on == "device":
            raise ConfigError("data.augment_on=device needs data.pipeline=tensor or nvjpeg: the timm pipeline "
                              "augments PIL images in the workers")
        return name, "workers"
    if name == "nvjpeg":
        if augment_on == "workers":
            raise ConfigError("data.augment_on=workers with data.pipeline=nvjpeg: the images are decoded on the GPU, "
                              "so they are augmented there; use data.pipeline=tensor to augment in the workers")
        return name, "device"
    return name, augment_on if augment_on != "auto" else ("workers" if device == "cpu" else "device")


def build_pipeline(cfg: Config, device: str, fixed_shapes: bool = False) -> Pipeline:
    """The pipeline ``cfg.data`` asks for on a runtime of kind ``device``; ``fixed_shapes`` (XLA): augment with
    masks instead of by groups, so shapes never depend on the draws."""
    if cfg.data.format == "synthetic":  # generated images are model input already
        return Pipeline("synthetic", "workers", Stage(None), Stage(None))
    name, augment_on = resolve(cfg.data.pipeline, cfg.data.augment_on, device)
    if name == "timm":
        return Pipeline(name, augment_on, Stage(PilReader(_timm_train_transform(cfg))),
                        Stage(PilReader(timm_eval_transform(cfg))))
    if name == "nvjpeg" and device == "cpu":
        log.warning("data.pipeline=nvjpeg on the CPU: JPEGs are decoded in the main process (a test setup; "
                    "data.pipeline=tensor decodes in the workers)")
    try:
        planner = _planner(cfg)
        size, crop_pct, interpolation = eval_img_size(cfg), cfg.eval.crop_pct, cfg.eval.interpolation
        evaluation = TensorEvalReader(size, crop_pct, interpolation)  # checks the filter for both pipelines
    except UnsupportedAugmentation as error:
        raise ConfigError(str(error)) from None

    def augmenter(masked: bool) -> Augmenter:
        return Augmenter(cfg.data.mean, cfg.data.std, planner.fill, cfg.aug.random_erase_mode, masked)

    on_device = augmenter(fixed_shapes)
    if name == "nvjpeg":
        return Pipeline(name, augment_on,
                        Stage(NvjpegTrainReader(planner), decode_crop_augment(on_device, planner.img_size), collate),
                        Stage(NvjpegEvalReader(size), decode_resize_normalize(on_device, size, crop_pct, interpolation),
                              collate))
    if augment_on == "workers":  # each worker augments the batch it collates, on its CPU: grouped
        train = Stage(TensorTrainReader(planner), collate=augment_in_collate(augmenter(masked=False)))
    else:
        train = Stage(TensorTrainReader(planner), augment_on_device(on_device))
    return Pipeline(name, augment_on, train, Stage(evaluation, normalize_on_device(on_device)))


def _planner(cfg: Config) -> SamplePlanner:
    aug = cfg.aug
    return SamplePlanner(cfg.data.img_size, rand_augment=aug.rand_augment, random_erase_prob=aug.random_erase_prob,
                         random_erase_mode=aug.random_erase_mode, random_erase_count=aug.random_erase_count,
                         crop_scale=aug.crop_scale, crop_ratio=aug.crop_ratio, hflip=aug.hflip,
                         interpolation=aug.interpolation, mean=cfg.data.mean)


def _timm_train_transform(cfg: Config):
    aug = cfg.aug
    return build_train_transform(
        cfg.data.img_size, rand_augment=aug.rand_augment, random_erase_prob=aug.random_erase_prob,
        random_erase_mode=aug.random_erase_mode, random_erase_count=aug.random_erase_count,
        crop_scale=tuple(aug.crop_scale), crop_ratio=tuple(aug.crop_ratio), hflip=aug.hflip,
        interpolation=aug.interpolation, mean=tuple(cfg.data.mean), std=tuple(cfg.data.std))


def timm_eval_transform(cfg: Config):
    """The evaluation preprocessing of a config with PIL (the ``timm`` pipeline)."""
    return build_eval_transform(eval_img_size(cfg), crop_pct=cfg.eval.crop_pct, interpolation=cfg.eval.interpolation,
                                mean=tuple(cfg.data.mean), std=tuple(cfg.data.std))
