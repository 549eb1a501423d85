"""The ADE20K layout (``images/<split>/*.jpg`` beside ``annotations/<split>/*.png``) and the transforms of the
UperNet recipe (mmsegmentation's ADE20K pipeline): random rescale, random crop, flip, photometric distortion.

Annotation PNGs hold one class index per pixel, 0 for "other": with ``reduce_zero_label`` (ADE20K's convention)
0 becomes ``IGNORE_INDEX`` and class ``c`` becomes ``c - 1``. Every random choice of a sample is drawn from its
key (``random.Random(sample_seed)``), so it is the same whatever worker, process or resume reads it.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ..data import DatasetFormatError, DatasetNotFoundError
from .lists import collate_lists, preview

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class SegAugment:
    """The training transform: rescale to fit ``scale`` (long, short side) times a ratio drawn from
    ``ratio_range``, crop ``crop_size`` (redrawn up to 10 times while one class covers more than
    ``cat_max_ratio`` of it, 1 = never), flip with ``hflip``, photometric distortion, pad to the crop size."""

    crop_size: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True

    def __call__(self, image: Image.Image, label: np.ndarray, rng: random.Random
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = rng.uniform(*self.ratio_range)
        image, label = rescale(image, label, (self.scale[0] * ratio, self.scale[1] * ratio))
        pixels = np.asarray(image)
        top, left = self._crop_origin(label, rng)
        size = self.crop_size
        pixels, label = pixels[top:top + size, left:left + size], label[top:top + size, left:left + size]
        if rng.random() < self.hflip:
            pixels, label = pixels[:, ::-1], label[:, ::-1]
        tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
        if self.photometric:
            tensor = photometric_distortion(tensor, rng)
        return _pad(tensor, size, 0), _pad(torch.from_numpy(label.copy()), size, IGNORE_INDEX)

    def _crop_origin(self, label: np.ndarray, rng: random.Random) -> tuple[int, int]:
        """A crop that no single class dominates, when one is found in 10 draws (else the last one drawn)."""
        height, width = label.shape
        size = self.crop_size
        for _ in range(10):
            top, left = rng.randint(0, max(height - size, 0)), rng.randint(0, max(width - size, 0))
            if self.cat_max_ratio >= 1:
                break
            values, counts = np.unique(label[top:top + size, left:left + size], return_counts=True)
            counts = counts[values != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return top, left


def rescale(image: Image.Image, label: np.ndarray | None, scale: tuple[float, float]
            ) -> tuple[Image.Image, np.ndarray | None]:
    """Image (bilinear) and label (nearest) resized, aspect kept, to fit ``scale`` = (long side, short side)."""
    width, height = image.size
    factor = min(scale[0] / max(width, height), scale[1] / min(width, height))
    size = (int(width * factor + 0.5), int(height * factor + 0.5))
    image = image.resize(size, Image.Resampling.BILINEAR)
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST))
    return image, label


def photometric_distortion(image: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """mmsegmentation's distortion of a uint8 [3, H, W] image, each part with probability 1/2: brightness
    +-32, contrast x[0.5, 1.5] (before or after the colour changes), saturation x[0.5, 1.5], hue +-18/180 of
    the colour circle."""
    x = image.float()
    if rng.random() < 0.5:
        x = (x + rng.uniform(-32, 32)).clamp(0, 255)
    contrast_first = rng.random() < 0.5
    if contrast_first:
        x = _contrast(x, rng)
    if rng.random() < 0.5:
        x = TF.adjust_saturation(x / 255, rng.uniform(0.5, 1.5)) * 255
    if rng.random() < 0.5:
        x = TF.adjust_hue(x / 255, rng.uniform(-18, 18) / 180) * 255
    if not contrast_first:
        x = _contrast(x, rng)
    return x.round().clamp(0, 255).to(torch.uint8)


def _contrast(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    return (x * rng.uniform(0.5, 1.5)).clamp(0, 255) if rng.random() < 0.5 else x


def _pad(x: torch.Tensor, size: int, value: int) -> torch.Tensor:
    """Bottom/right padding up to ``size`` x ``size``."""
    height, width = x.shape[-2:]
    return torch.nn.functional.pad(x, (0, size - width, 0, size - height), value=value)


class ADE20K(Dataset):
    """``root/images/<split>`` with one annotation PNG of the same stem per image in ``root/annotations/<split>``.

    Training items (keys ``(index, sample_seed)``): ``augment``'s uint8 crop and its label map. Evaluation items
    (int keys): the image rescaled to fit ``test_scale`` (long, short side) and the label map at the image's own
    size, where predictions are scored.
    """

    def __init__(self, root: str | Path, split: str, *, num_classes: int, augment: SegAugment | None = None,
                 test_scale: tuple[int, int] = (2048, 512), reduce_zero_label: bool = True) -> None:
        self.root, self.split = Path(root), split
        self.num_classes, self.augment = num_classes, augment
        self.test_scale, self.reduce_zero_label = test_scale, reduce_zero_label
        self.classes = [str(index) for index in range(num_classes)]
        self.samples = _pairs(self.root, split)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        image_path, label_path = self.samples[index]
        with Image.open(image_path) as file:
            image = file.convert("RGB")
        label = self._read_label(label_path)
        if self.augment is not None and sample_seed is not None:
            pixels, label = self.augment(image, label, random.Random(sample_seed))
            return {"image": pixels, "label": label}
        image, _ = rescale(image, None, self.test_scale)
        return {"image": TF.pil_to_tensor(image), "label": torch.from_numpy(label.copy())}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Training crops stack into tensors; evaluation images keep their sizes, as lists."""
        return default_collate(items) if self.augment is not None else collate_lists(items)

    def _read_label(self, path: Path) -> np.ndarray:
        with Image.open(path) as file:
            label = np.asarray(file)
        if label.ndim != 2 or label.dtype != np.uint8:
            raise DatasetFormatError(f"{path}: an annotation must be a single-channel 8-bit PNG of class indices, "
                                     f"this one is {label.dtype} with shape {label.shape}")
        if self.reduce_zero_label:  # 0 ("other") -> ignored, c -> c - 1
            label = np.where(label == 0, IGNORE_INDEX, label - 1).astype(np.uint8)
        beyond = np.unique(label[(label >= self.num_classes) & (label != IGNORE_INDEX)])
        if beyond.size:
            raise DatasetFormatError(
                f"{path}: class indices {beyond.tolist()} (after reduce_zero_label={self.reduce_zero_label}) are "
                f"beyond model.num_classes={self.num_classes}; set model.num_classes to the dataset's class count")
        return label

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the training data for resuming: the image and annotation names."""
        lines = sorted(f"{image.name}\t{label.name}" for image, label in self.samples)
        return {"num_images": len(self), "num_classes": self.num_classes,
                "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


def _pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, annotation) paths of a split, checked: every image has an annotation of its size."""
    images_dir, labels_dir = root / "images" / split, root / "annotations" / split
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"{folder}: no such folder; data.root must hold images/{split}/*.jpg and annotations/{split}/*.png "
                "(the ADEChallengeData2016 layout)")
    images = sorted(path for path in images_dir.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DatasetNotFoundError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    pairs = [(image, labels_dir / f"{image.stem}.png") for image in images]
    missing = [label.name for _, label in pairs if not label.is_file()]
    if missing:
        raise DatasetFormatError(f"{len(missing)} of the {len(pairs)} images in {images_dir} have no annotation in "
                                 f"{labels_dir} ({preview(missing)}); add them, or remove those images")
    mismatched = [f"{label.name} {_size(label)} vs {_size(image)}" for image, label in pairs
                  if _size(image) != _size(label)]
    if mismatched:
        raise DatasetFormatError(f"{len(mismatched)} annotations in {labels_dir} are not the size of their image "
                                 f"({preview(mismatched)}); an annotation must label its image pixel by pixel")
    return pairs


def _size(path: Path) -> tuple[int, int]:
    """Width and height from the file's header (no decoding)."""
    with Image.open(path) as file:
        return file.size
