"""The ``nvjpeg`` pipeline: JPEGs decoded on the GPU, one batched nvJPEG call per batch.

Workers only read the file's bytes, parse the JPEG header for the image size and draw the sample's plan
(``plan.py``; the crop box needs nothing more). The main process then decodes the batch on the device
(``decode.decode_jpegs_on``: TorchCodec's or torchvision's ``decode_jpeg(list, device=...)``, fenced from the
queued step), crops, resizes and flips each image there with the ``tensor`` pipeline's function, and augments
the batch with the same ``Augmenter``. Files nvJPEG cannot take (not JPEG, CMYK, a batch it refuses) are
decoded on the CPU: in the worker (other formats, then cropped like the ``tensor`` pipeline) or in the main
process (``decode.decode_jpegs_on``'s fallback). Every step but the decode call runs on CPU tensors as well,
which is how CI tests it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate

from .augment import Augmenter
from .decode import decode_jpegs_on, decode_rgb, jpeg_header, looks_complete
from .plan import SamplePlanner
from .tensor_pipeline import crop_resize_flip, no_op_plan, resize_center_crop

SOURCE = "source"
"""Per sample: JPEG bytes (1-d uint8) for the device to decode, or an image the worker decoded (3-d uint8)."""


class _JpegFile:
    """What a worker loads: the encoded bytes and the size from the header, or the decoded image."""

    def __init__(self, data: torch.Tensor) -> None:
        size = jpeg_header(data)
        if size is not None and not looks_complete(data):
            raise ValueError("the JPEG ends before its end-of-image marker (truncated)")
        self.data, self.image = (data, None) if size is not None else (None, decode_rgb(data))
        self.width, self.height = size if size is not None else (self.image.shape[-1], self.image.shape[-2])


class NvjpegTrainReader:
    def __init__(self, planner: SamplePlanner) -> None:
        self.planner = planner

    def load(self, data: torch.Tensor) -> _JpegFile:
        return _JpegFile(data)

    def prepare(self, file: _JpegFile, sample_seed: int | None) -> dict[str, Any]:
        crop, plan = self.planner.draw(sample_seed or 0, file.width, file.height)
        if file.image is not None:
            return {SOURCE: crop_resize_flip(file.image, crop.tolist(), self.planner.img_size), "crop": crop,
                    "plan": plan}
        return {SOURCE: file.data, "crop": crop, "plan": plan}

    def blank(self) -> dict[str, Any]:
        size = self.planner.img_size
        return {SOURCE: torch.zeros(3, size, size, dtype=torch.uint8), "crop": torch.zeros(6, dtype=torch.int64),
                "plan": no_op_plan(self.planner)}


class NvjpegEvalReader:
    def __init__(self, size: int) -> None:
        self.size = size

    def load(self, data: torch.Tensor) -> _JpegFile:
        return _JpegFile(data)

    def prepare(self, file: _JpegFile, sample_seed: int | None) -> dict[str, Any]:
        return {SOURCE: file.data if file.image is None else file.image}

    def blank(self) -> dict[str, Any]:
        return {SOURCE: torch.zeros(3, self.size, self.size, dtype=torch.uint8)}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collation, except for the sources, which differ in length and stay a list."""
    sources = [item.pop(SOURCE) for item in items]
    batch = default_collate(items)
    batch[SOURCE] = sources
    return batch


def _decode(sources: list[torch.Tensor], runtime) -> list[torch.Tensor | None]:
    """Every source as a uint8 image on the device: JPEGs decoded there in one call, fenced from the queued step
    (nvJPEG writes from a stream of its own), the rest copied."""
    device = runtime.device
    jpegs = [i for i, source in enumerate(sources) if source.dim() == 1]
    images: list[torch.Tensor | None] = [None if source.dim() == 1 else source.to(device, non_blocking=True)
                                         for source in sources]
    decoded = runtime.fenced(lambda: decode_jpegs_on(device, [sources[i] for i in jpegs]))
    for i, image in zip(jpegs, decoded):
        images[i] = image
    return images


def decode_crop_augment(augmenter: Augmenter, size: int):
    """The main process's part of training: decode, crop-resize-flip, augment, all on the device."""
    def finish(batch: dict[str, Any], runtime) -> tuple[torch.Tensor, torch.Tensor]:
        device = runtime.device
        images = torch.zeros(len(batch[SOURCE]), 3, size, size, dtype=torch.uint8, device=device)
        crops = batch["crop"].tolist()
        for i, (source, image) in enumerate(zip(batch[SOURCE], _decode(batch[SOURCE], runtime))):
            if image is not None:  # a worker-decoded source is already cropped; None: undecodable, left blank
                images[i] = image if source.dim() == 3 else crop_resize_flip(image, crops[i], size)
        images = augmenter(images, batch["plan"], runtime.to_device)
        return images.contiguous(memory_format=runtime.memory_format), runtime.to_device(batch["target"])
    return finish


def decode_resize_normalize(augmenter: Augmenter, size: int, crop_pct: float, interpolation: str):
    """The main process's part of evaluation: decode, resize and centre-crop, normalise, on the device."""
    def finish(batch: dict[str, Any], runtime) -> tuple[torch.Tensor, torch.Tensor]:
        device = runtime.device
        images = torch.zeros(len(batch[SOURCE]), 3, size, size, dtype=torch.uint8, device=device)
        for i, image in enumerate(_decode(batch[SOURCE], runtime)):
            if image is not None:
                images[i] = resize_center_crop(image, size, crop_pct, interpolation)
        images = augmenter.normalize(images)
        return images.contiguous(memory_format=runtime.memory_format), runtime.to_device(batch["target"])
    return finish
