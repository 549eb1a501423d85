"""The ``tensor`` pipeline: decoding, cropping and augmentation as tensor ops, keyed per sample.

Workers read the file's bytes, decode them (``decode.py``), draw the sample's plan (``plan.py``), crop, resize
and flip, and return uint8 images at the training size with the rest of the plan; the batch's RandAugment,
normalisation and erasing then run on the runtime's device (``data.augment_on=device``), or in the worker on
the one sample (``workers``): the same ops (``augment.py``) either way. Evaluation decodes, resizes the short
side to ``eval.img_size / eval.crop_pct`` and centre-crops in the workers, and normalises on the device.
"""
from __future__ import annotations

from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import default_collate

from .augment import Augmenter
from .decode import decode_rgb
from .plan import INTERPOLATIONS, NO_OP, SamplePlanner, UnsupportedAugmentation

_MODES = {"bilinear": TF.InterpolationMode.BILINEAR, "bicubic": TF.InterpolationMode.BICUBIC}


def crop_resize_flip(image: torch.Tensor, crop: list[int], size: int) -> torch.Tensor:
    """The random-resized crop of a plan (``[top, left, height, width, interpolation id, flip]``) on a uint8
    ``[3, h, w]`` image: torchvision's antialiased resize, PIL's within 0.05 grey levels on average."""
    top, left, height, width, interpolation, flip = crop
    image = TF.resized_crop_image(image, top, left, height, width, [size, size],
                                  interpolation=_MODES[INTERPOLATIONS[interpolation]], antialias=True)
    return image.flip(-1) if flip else image


def resize_center_crop(image: torch.Tensor, size: int, crop_pct: float, interpolation: str) -> torch.Tensor:
    """timm's evaluation geometry: short side to ``floor(size / crop_pct)``, then the centre ``size x size``."""
    resized = TF.resize_image(image, [int(size / crop_pct)], interpolation=_MODES[interpolation], antialias=True)
    return TF.center_crop_image(resized, [size, size])


def check_eval_interpolation(interpolation: str) -> None:
    if interpolation not in _MODES:
        raise UnsupportedAugmentation(
            f"eval.interpolation={interpolation!r}: the tensor pipelines resize with {' or '.join(_MODES)}; use "
            "one of those, or data.pipeline=timm for PIL's other filters")


def no_op_plan(planner: SamplePlanner) -> dict[str, torch.Tensor]:
    """A plan that changes nothing (padding rows)."""
    layers, boxes = planner.num_layers, planner.erase_count
    return {"ops": torch.full((layers,), NO_OP, dtype=torch.int64), "args": torch.zeros(layers),
            "affine": torch.zeros(layers, 6), "erase": torch.zeros(boxes, 4, dtype=torch.int64),
            "noise": torch.zeros((), dtype=torch.int64)}


class TensorTrainReader:
    """Training samples of the ``tensor`` pipeline: the uint8 crop at the training size and the rest of the
    sample's plan."""

    def __init__(self, planner: SamplePlanner) -> None:
        self.planner = planner

    def load(self, data: torch.Tensor) -> torch.Tensor:
        return decode_rgb(data)

    def prepare(self, image: torch.Tensor, sample_seed: int | None) -> dict[str, Any]:
        crop, plan = self.planner.draw(sample_seed or 0, image.shape[-1], image.shape[-2])
        return {"image": crop_resize_flip(image, crop.tolist(), self.planner.img_size), "plan": plan}

    def blank(self) -> dict[str, Any]:
        size = self.planner.img_size
        return {"image": torch.zeros(3, size, size, dtype=torch.uint8), "plan": no_op_plan(self.planner)}


CHUNK_PIXELS = 1 << 16
"""Pixels (over all its samples) a worker augments at once: a chunk's float32 copy (0.8 MB) stays in the core's
cache, and small images still share each op call (224 px: one image a chunk; 32 px: 64). Measured on a CPU core:
whole batches of 224 px images at once were 10% slower, single 32 px images 20% slower."""


def augment_in_collate(augmenter: Augmenter):
    """``data.augment_on=workers``: the worker collates its batch, then augments it in cache-sized chunks (each
    op once per chunk on the samples that drew it); the device then receives model input."""
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_collate(items)
        images, plan = batch["image"], batch.pop("plan")
        step = max(1, CHUNK_PIXELS // (images.shape[-1] * images.shape[-2]))
        batch["image"] = torch.cat([augmenter(images[start:start + step],
                                              {key: value[start:start + step] for key, value in plan.items()},
                                              on_the_host)
                                    for start in range(0, len(images), step)])
        return batch
    return collate


def on_the_host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class TensorEvalReader:
    """Evaluation samples of the ``tensor`` pipeline: uint8, normalised on the device (``normalize_on_device``)."""

    def __init__(self, size: int, crop_pct: float, interpolation: str) -> None:
        check_eval_interpolation(interpolation)
        self.size, self.crop_pct, self.interpolation = size, crop_pct, interpolation

    def load(self, data: torch.Tensor) -> torch.Tensor:
        return decode_rgb(data)

    def prepare(self, image: torch.Tensor, sample_seed: int | None) -> dict[str, Any]:
        return {"image": resize_center_crop(image, self.size, self.crop_pct, self.interpolation)}

    def blank(self) -> dict[str, Any]:
        return {"image": torch.zeros(3, self.size, self.size, dtype=torch.uint8)}


def augment_on_device(augmenter: Augmenter):
    """The main process's part when augmenting on the device: uint8 images and the plans to the device, then
    RandAugment, normalisation and erasing there."""
    def finish(batch: dict[str, Any], runtime) -> tuple[torch.Tensor, torch.Tensor]:
        images = augmenter(runtime.to_device(batch["image"]), batch["plan"], runtime.to_device)
        return images.contiguous(memory_format=runtime.memory_format), runtime.to_device(batch["target"])
    return finish


def normalize_on_device(augmenter: Augmenter):
    """The main process's part of evaluation: uint8 images to the device, normalised there."""
    def finish(batch: dict[str, Any], runtime) -> tuple[torch.Tensor, torch.Tensor]:
        images = augmenter.normalize(runtime.to_device(batch["image"]))
        return images.contiguous(memory_format=runtime.memory_format), runtime.to_device(batch["target"])
    return finish
