"""Image datasets: the samples of a source (class folders, webdataset tars, parquet files: ``sources/``) read by
an input pipeline, and a synthetic dataset for benchmarks.

Items are dicts ``{"image": Tensor, "target": int, "index": int, "bad": bool}`` (a pipeline's reader may put
other fields in place of or beside ``image``). A dataset accepts an int index or the ``(index, sample_seed)``
pairs of :class:`~mambaout.data.sampling.MicroBatchSampler`; with a seed, the augmentation is a pure function
of it, and the item carries it as ``sample_seed`` (the key of the sample's drop decisions).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from PIL import Image
from torch.utils.data import Dataset

from .sampling import PAD_INDEX, derive_seed, seeded_rngs
from .sources import DataSourceError, Source, open_source

_logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]
Item = dict[str, Any]
SampleRef = int | tuple[int, int]


class SampleReader(Protocol):
    """The per-sample work of a pipeline, done in the DataLoader workers. ``load`` takes a sample's encoded bytes
    (uint8) and raises when they are unreadable (the dataset then replaces or masks the sample); ``prepare`` turns
    what was loaded into the item's fields, keyed by the sample's seed (None: evaluation), and must not fail on
    readable bytes; ``blank`` gives the fields of a row without an image (padding, masked unreadable images)."""

    def load(self, data: torch.Tensor) -> Any: ...

    def prepare(self, loaded: Any, sample_seed: int | None) -> dict[str, Any]: ...

    def blank(self) -> dict[str, Any]: ...


class PilReader:
    """The ``timm`` pipeline's reader: PIL decoding, then a PIL transform with timm's global random generators
    seeded from the sample's seed."""

    def __init__(self, transform: Transform) -> None:
        self.transform = transform
        self._blank_image: torch.Tensor | None = None

    def load(self, data: torch.Tensor) -> Image.Image:
        with Image.open(io.BytesIO(data.numpy())) as image:
            return image.convert("RGB")  # decodes fully, so truncated files fail here

    def prepare(self, image: Image.Image, sample_seed: int | None) -> dict[str, Any]:
        if sample_seed is None:
            return {"image": self.transform(image)}
        with seeded_rngs(sample_seed):
            return {"image": self.transform(image)}

    def blank(self) -> dict[str, Any]:
        if self._blank_image is None:
            # The transform decides the output size; probe it once, without touching the caller's RNGs.
            with seeded_rngs(0):
                self._blank_image = torch.zeros_like(self.transform(Image.new("RGB", (64, 64))))
        return {"image": self._blank_image.clone()}


def _check_index(index: int, length: int) -> None:
    if not 0 <= index < length:
        raise IndexError(f"index {index} is out of range for a dataset of {length} samples "
                         f"(only {PAD_INDEX} is allowed below 0, for padding)")


class ImageDataset(Dataset[Item]):
    """The samples of a ``source`` (where the bytes come from: a folder, tar shards, parquet files), read by a
    pipeline's ``SampleReader`` (or a PIL transform, which is wrapped in ``PilReader``).

    An unreadable image (missing, truncated or corrupt file or member) never stops a run. With
    ``replace_bad=True`` (training) it is replaced by the next readable sample (``index + 1``,
    ``index + 2``, ... with the same seed, so the choice is deterministic); with ``replace_bad=False``
    (evaluation) the item has the reader's blank fields and target -1, for the evaluator to mask. Either way the
    item keeps the requested ``index`` and has ``bad=True``. Index :data:`~mambaout.data.sampling.PAD_INDEX` gives
    a padding row: blank fields, target -1, ``bad=False``. A store that stays unreachable is not an unreadable
    image: its ``ShardUnreachableError`` stops the run.
    """

    def __init__(self, source: Source, reader: SampleReader | Transform, *, replace_bad: bool = False) -> None:
        self.source = source
        self.classes = list(source.classes)
        self.reader = reader if hasattr(reader, "prepare") else PilReader(reader)
        self.replace_bad = replace_bad

    @property
    def root(self) -> str:
        return os.fspath(self.source.root)

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(path, target)`` of a folder dataset's images."""
        return self.source.samples

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> list[int]:
        return self.source.targets

    def __len__(self) -> int:
        return len(self.source)

    def describe(self, index: int) -> str:
        """The sample's file, or its shard and key."""
        return self.source.describe(index)

    def fingerprint(self) -> dict[str, Any]:
        return self.source.fingerprint()

    def __getitem__(self, ref: SampleRef) -> Item:
        index, sample_seed = ref if isinstance(ref, tuple) else (ref, None)
        if index == PAD_INDEX:
            return {**self.reader.blank(), "target": -1, "index": index, "bad": False}
        _check_index(index, len(self))
        loaded = self._load(index)
        if loaded is None:
            return {**self.reader.blank(), "target": -1, "index": index, "bad": True}
        content, target, bad = loaded
        return {**self.reader.prepare(content, sample_seed), "target": target, "index": index, "bad": bad,
                **_seed_field(ref)}

    def _load(self, index: int) -> tuple[Any, int, bool] | None:
        """What the reader loaded for ``index``, or for its replacement; None when eval-mode masks it."""
        attempts = len(self) if self.replace_bad else 1
        for candidate in range(index, index + attempts):
            candidate %= len(self)
            # Pillow's decoders raise many exception types on malformed files (OSError, ValueError,
            # SyntaxError, struct.error, DecompressionBombError, ...), libjpeg-turbo a RuntimeError, a short
            # read of a truncated shard an EOFError; all mean "unreadable".
            try:
                return self.reader.load(self.source.read(candidate)), self.source.targets[candidate], \
                    candidate != index
            except DataSourceError:
                raise
            except Exception as error:  # noqa: BLE001
                _logger.warning("unreadable image %s (%s: %s)", self.source.describe(candidate),
                                type(error).__name__, error)
        if self.replace_bad:
            raise RuntimeError(f"no readable image among the {len(self)} images of the dataset (root {self.root})")
        return None


class SyntheticDataset(Dataset[Item]):
    """Random, already normalised images for benchmarks: image and target are a pure function of
    ``(seed, index)``, so no transform and no file access are involved."""

    def __init__(self, num_samples: int, num_classes: int, img_size: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.classes = [str(target) for target in range(num_classes)]
        self.img_size = img_size
        self.seed = seed

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, ref: SampleRef) -> Item:
        index = ref[0] if isinstance(ref, tuple) else ref
        shape = (3, self.img_size, self.img_size)
        if index == PAD_INDEX:
            return {"image": torch.zeros(shape), "target": -1, "index": index, "bad": False}
        _check_index(index, len(self))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "synthetic", index))
        target = int(torch.randint(self.num_classes, (), generator=generator))
        image = torch.randn(shape, generator=generator)
        return {"image": image, "target": target, "index": index, "bad": False, **_seed_field(ref)}


def _seed_field(ref: SampleRef) -> dict[str, int]:
    """A training item's ``sample_seed`` (the key of its drop decisions, ``with_drop_draws``); none in evaluation."""
    return {"sample_seed": ref[1]} if isinstance(ref, tuple) else {}


def build_dataset(root: str | os.PathLike | None, split: str, reader: SampleReader | Transform | None, *, train: bool,
                  classes: Sequence[str] | None = None, format: str = "folder", num_samples: int = 0,
                  num_classes: int = 1000, img_size: int = 224, seed: int = 0, **source_options: Any
                  ) -> ImageDataset | SyntheticDataset:
    """Builds the ``split`` dataset of ``root``.

    ``format="folder"`` reads ``root/split`` (see :func:`scan_split`), ``"wds"`` and ``"parquet"`` the split's
    shards below ``root`` (a local path or an fsspec URL; ``source_options``: :func:`sources.open_source`'s cache
    and retry settings), with ``reader`` (a pipeline's reader, or a PIL transform); a ``train`` dataset replaces
    unreadable images, an evaluation dataset masks them. ``format="synthetic"`` ignores ``root`` and ``reader``
    and makes ``num_samples`` random images of ``img_size`` over ``num_classes`` classes.
    """
    if format == "synthetic":
        return SyntheticDataset(num_samples, num_classes, img_size, seed=derive_seed(seed, split))
    if root is None or reader is None:
        raise ValueError(f"a {format} dataset needs a root and a reader")
    source = open_source(format, os.fspath(root), split, classes=classes, **source_options)
    return ImageDataset(source, reader, replace_bad=train)


def dataset_fingerprint(dataset: ImageDataset | SyntheticDataset) -> dict[str, Any]:
    """Identifies a dataset's content for the run manifest and resume checks: image and class counts and a digest
    (folders: of the sorted ``relative/path<TAB>target`` lines; shards: of the index, with each shard's version;
    synthetic data: of its parameters)."""
    if isinstance(dataset, SyntheticDataset):
        line = f"synthetic\t{dataset.num_samples}\t{dataset.num_classes}\t{dataset.img_size}\t{dataset.seed}"
        return {"num_images": len(dataset), "num_classes": dataset.num_classes,
                "sha256": hashlib.sha256(line.encode()).hexdigest()}
    return dataset.fingerprint()
