"""Image datasets: class folders (ImageNet synset order when the folders are synsets), the flat ImageNet
validation folder, and a synthetic dataset for benchmarks.

Items are dicts ``{"image": Tensor, "target": int, "index": int, "bad": bool}`` (a pipeline's reader may put
other fields in place of or beside ``image``). A dataset accepts an int index or the ``(index, sample_seed)``
pairs of :class:`~mambaout.data.sampling.MicroBatchSampler`; with a seed, the augmentation is a pure function
of it, and the item carries it as ``sample_seed`` (the key of the sample's drop decisions).
"""
from __future__ import annotations

import csv
import functools
import hashlib
import importlib.resources
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from timm.data import ImageNetInfo
from torch.utils.data import Dataset

from .sampling import PAD_INDEX, derive_seed, seeded_rngs

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
KAGGLE_GROUND_TRUTH = "LOC_val_solution.csv"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
_SYNSET = re.compile(r"n\d{8}")

Transform = Callable[[Image.Image], torch.Tensor]
Item = dict[str, Any]
SampleRef = int | tuple[int, int]


class SampleReader(Protocol):
    """The per-sample work of a pipeline, done in the DataLoader workers. ``load`` reads a file and raises when
    it is unreadable (the dataset then replaces or masks the sample); ``prepare`` turns what was loaded into the
    item's fields, keyed by the sample's seed (None: evaluation), and must not fail on a readable file;
    ``blank`` gives the fields of a row without an image (padding, masked unreadable images)."""

    def load(self, path: str) -> Any: ...

    def prepare(self, loaded: Any, sample_seed: int | None) -> dict[str, Any]: ...

    def blank(self) -> dict[str, Any]: ...


class PilReader:
    """The ``timm`` pipeline's reader: PIL decoding, then a PIL transform with timm's global random generators
    seeded from the sample's seed."""

    def __init__(self, transform: Transform) -> None:
        self.transform = transform
        self._blank_image: torch.Tensor | None = None

    def load(self, path: str) -> Image.Image:
        with open(path, "rb") as file:
            image = Image.open(file)
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


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder or ground-truth file is missing."""


class DatasetFormatError(ValueError):
    """A dataset folder exists but its content does not match a supported layout."""


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k synsets in the standard class order (sorted), as timm ships them."""
    return tuple(ImageNetInfo("imagenet-1k").label_names())


@functools.cache
def ilsvrc2012_id_to_synset() -> tuple[str, ...]:
    """Synset of each devkit ``ILSVRC2012_ID`` (entry ``i`` is ID ``i + 1``), in the order of the
    devkit's ``meta.mat`` (and of ``map_clsloc.txt``), which is not the sorted order. Line ``i`` of
    ``ilsvrc2012_id_to_synset.txt`` is the synset of ID ``i``."""
    table = importlib.resources.files(__package__).joinpath("ilsvrc2012_id_to_synset.txt")
    return tuple(table.read_text().split())


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _check_index(index: int, length: int) -> None:
    if not 0 <= index < length:
        raise IndexError(f"index {index} is out of range for a dataset of {length} samples "
                         f"(only {PAD_INDEX} is allowed below 0, for padding)")


class ImageDataset(Dataset[Item]):
    """Images listed as ``(path, target)`` samples, read by a pipeline's ``SampleReader`` (or a PIL transform,
    which is wrapped in ``PilReader``).

    An unreadable image (missing, truncated or corrupt file) never stops a run. With
    ``replace_bad=True`` (training) it is replaced by the next readable sample (``index + 1``,
    ``index + 2``, ... with the same seed, so the choice is deterministic); with ``replace_bad=False``
    (evaluation) the item has the reader's blank fields and target -1, for the evaluator to mask. Either way the
    item keeps the requested ``index`` and has ``bad=True``. Index :data:`~mambaout.data.sampling.PAD_INDEX` gives
    a padding row: blank fields, target -1, ``bad=False``.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], reader: SampleReader | Transform,
                 *, root: str | os.PathLike | None = None, replace_bad: bool = False) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.reader = reader if hasattr(reader, "prepare") else PilReader(reader)
        self.root = None if root is None else os.fspath(root)
        self.replace_bad = replace_bad

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> list[int]:
        return [target for _, target in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

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
            path, target = self.samples[candidate % len(self)]
            # Pillow's decoders raise many exception types on malformed files (OSError, ValueError,
            # SyntaxError, struct.error, DecompressionBombError, ...), libjpeg-turbo a RuntimeError; all mean
            # "unreadable".
            try:
                return self.reader.load(path), target, candidate != index
            except Exception as error:  # noqa: BLE001
                _logger.warning("unreadable image %s (%s: %s)", path, type(error).__name__, error)
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


def _list_class_folder(split_dir: Path, class_dirs: list[str], classes: Sequence[str]) -> list[tuple[str, int]]:
    class_to_target = {name: target for target, name in enumerate(classes)}
    samples = []
    for class_dir in class_dirs:
        for folder, subfolders, files in os.walk(split_dir / class_dir, followlinks=True):
            subfolders.sort()
            samples += [(os.path.join(folder, name), class_to_target[class_dir])
                        for name in sorted(files) if _is_image(name)]
    return samples


def _folder_classes(split_dir: Path, class_dirs: list[str], classes: Sequence[str] | None) -> list[str]:
    """The class list of a class-folder split: explicit, ImageNet-1k for synset folders, else sorted names."""
    if classes is not None:
        unknown = sorted(set(class_dirs) - set(classes))
        if unknown:
            raise DatasetFormatError(
                f"{split_dir}: class folders {unknown[:10]} (of {len(unknown)}) are not in the given class list "
                f"of {len(classes)} classes (e.g. the classes saved with the checkpoint); remove or rename "
                f"those folders, or use the class list of a run trained on them")
        return list(classes)
    if all(_SYNSET.fullmatch(name) for name in class_dirs):
        unknown = sorted(set(class_dirs) - set(imagenet_synsets()))
        if unknown:
            raise DatasetFormatError(
                f"{split_dir}: synset folders {unknown[:10]} (of {len(unknown)}) are not ImageNet-1k classes; "
                f"pass an explicit class list to use other synsets")
        return list(imagenet_synsets())
    return class_dirs


def _find_ground_truth(split_dir: Path) -> Path:
    for folder in (split_dir, split_dir.parent):
        for name in (KAGGLE_GROUND_TRUTH, DEVKIT_GROUND_TRUTH):
            if (folder / name).is_file():
                return folder / name
    raise DatasetNotFoundError(
        f"{split_dir} holds images but no class folders, so it is read as the flat ImageNet validation "
        f"layout, which needs a ground-truth file: found neither {KAGGLE_GROUND_TRUTH} (Kaggle) nor "
        f"{DEVKIT_GROUND_TRUTH} (ILSVRC2012 devkit) in {split_dir} or {split_dir.parent}; copy one there, "
        f"or sort the images into one sub-folder per class")


def _read_kaggle_ground_truth(path: Path) -> dict[str, str]:
    """Image id (file name without extension) -> synset, from ``ImageId,PredictionString`` rows; the
    first token of ``PredictionString`` is the synset (the rest are boxes)."""
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
            raise DatasetFormatError(f"{path}: expected the header 'ImageId,PredictionString' of Kaggle's "
                                     f"ImageNet localization challenge, got {reader.fieldnames}")
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in reader}


def _read_devkit_ground_truth(path: Path) -> dict[str, str]:
    """Image id -> synset; line ``k`` holds the ILSVRC2012_ID of ``ILSVRC2012_val_{k:08d}``."""
    id_to_synset = ilsvrc2012_id_to_synset()
    ilsvrc_ids = path.read_text().split()
    valid_ids = {str(ilsvrc_id) for ilsvrc_id in range(1, len(id_to_synset) + 1)}
    invalid = [(line, value) for line, value in enumerate(ilsvrc_ids, start=1) if value not in valid_ids]
    if invalid:
        raise DatasetFormatError(f"{path}: expected one ILSVRC2012_ID (1..1000) per line; line {invalid[0][0]} "
                                 f"holds {invalid[0][1]!r}")
    return {f"ILSVRC2012_val_{number:08d}": id_to_synset[int(ilsvrc_id) - 1]
            for number, ilsvrc_id in enumerate(ilsvrc_ids, start=1)}


def _list_flat_validation(split_dir: Path, image_names: list[str]) -> list[tuple[str, int]]:
    ground_truth_path = _find_ground_truth(split_dir)
    if ground_truth_path.name == KAGGLE_GROUND_TRUTH:
        synset_of = _read_kaggle_ground_truth(ground_truth_path)
    else:
        synset_of = _read_devkit_ground_truth(ground_truth_path)
    missing = [name for name in image_names if os.path.splitext(name)[0] not in synset_of]
    if missing:
        raise DatasetFormatError(
            f"{ground_truth_path} has {len(synset_of)} entries and none for {len(missing)} of the "
            f"{len(image_names)} images in {split_dir} (e.g. {missing[:3]}); use the ground-truth file "
            f"that belongs to these images")
    synset_to_target = {synset: target for target, synset in enumerate(imagenet_synsets())}
    samples = []
    for name in image_names:
        synset = synset_of[os.path.splitext(name)[0]]
        if synset not in synset_to_target:
            raise DatasetFormatError(f"{ground_truth_path}: {name} has class {synset!r}, not an ImageNet-1k synset")
        samples.append((str(split_dir / name), synset_to_target[synset]))
    return samples


def scan_split(root: str | os.PathLike, split: str,
               classes: Sequence[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """Lists ``root/split`` as ``(samples, classes)``, detecting its layout.

    * Class folders (``split/<class>/**/<image>``): when every folder is an ImageNet synset
      (``n01440764``), the classes are the 1000 ImageNet-1k synsets in standard order, even if only
      some are present; otherwise the sorted folder names. An explicit ``classes`` list (e.g. saved
      with a checkpoint) takes precedence and must contain every folder.
    * Flat ImageNet validation folder (images, no sub-folders) with ``LOC_val_solution.csv`` or
      ``ILSVRC2012_validation_ground_truth.txt`` in the folder or its parent; ImageNet-1k classes.
    """
    root = Path(root)
    split_dir = root / split
    if root.exists() and not root.is_dir():
        raise DatasetFormatError(f"dataset root {root} is a file, not a folder; point the data path at the folder "
                                 f"that holds the '{split}' split (e.g. the folder of train/ and val/, not an "
                                 f"archive or an image inside it)")
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset root {root} does not exist; point the data path at the folder "
                                   f"that holds the '{split}' split")
    if not split_dir.is_dir():
        raise DatasetNotFoundError(f"{split_dir} does not exist: expected the '{split}' split as a sub-folder "
                                   f"of {root} ({split_dir}/<class>/<image> or a flat ImageNet validation folder)")
    entries = sorted(entry for entry in os.listdir(split_dir) if not entry.startswith("."))
    if not entries:
        raise DatasetFormatError(f"{split_dir} is empty: expected one sub-folder of images per class, "
                                 f"or the flat ImageNet validation images")
    class_dirs = [entry for entry in entries if (split_dir / entry).is_dir()]
    if class_dirs:
        classes = _folder_classes(split_dir, class_dirs, classes)
        samples = _list_class_folder(split_dir, class_dirs, classes)
    else:
        image_names = [entry for entry in entries if _is_image(entry)]
        if not image_names:
            raise DatasetFormatError(
                f"{split_dir} has no class sub-folders and no images ({', '.join(IMAGE_EXTENSIONS)}); "
                f"expected {split_dir}/<class>/<image> or the flat ImageNet validation images")
        samples, classes = _list_flat_validation(split_dir, image_names), list(imagenet_synsets())
    if not samples:
        raise DatasetFormatError(f"{split_dir}: the class folders {class_dirs[:5]} hold no images "
                                 f"({', '.join(IMAGE_EXTENSIONS)})")
    return samples, list(classes)


def build_dataset(root: str | os.PathLike | None, split: str, reader: SampleReader | Transform | None, *, train: bool,
                  classes: Sequence[str] | None = None, format: str = "folder", num_samples: int = 0,
                  num_classes: int = 1000, img_size: int = 224, seed: int = 0) -> ImageDataset | SyntheticDataset:
    """Builds the ``split`` dataset of ``root``.

    ``format="folder"`` reads ``root/split`` (see :func:`scan_split`) with ``reader`` (a pipeline's reader, or a
    PIL transform); a ``train`` dataset replaces unreadable images, an evaluation dataset masks them.
    ``format="synthetic"`` ignores ``root`` and ``reader`` and makes ``num_samples`` random images of
    ``img_size`` over ``num_classes`` classes.
    """
    if format == "synthetic":
        return SyntheticDataset(num_samples, num_classes, img_size, seed=derive_seed(seed, split))
    if format != "folder":
        raise ValueError(f"unknown dataset format {format!r}; expected 'folder' or 'synthetic'")
    if root is None or reader is None:
        raise ValueError("a folder dataset needs a root and a reader")
    samples, classes = scan_split(root, split, classes)
    return ImageDataset(samples, classes, reader, root=Path(root) / split, replace_bad=train)


def dataset_fingerprint(dataset: ImageDataset | SyntheticDataset) -> dict[str, Any]:
    """Identifies a dataset's content for the run manifest: image and class counts, and the sha256
    of its sorted ``relative/path<TAB>target`` lines (of its parameters for a synthetic dataset)."""
    if isinstance(dataset, SyntheticDataset):
        lines = [f"synthetic\t{dataset.num_samples}\t{dataset.num_classes}\t{dataset.img_size}\t{dataset.seed}"]
    else:
        lines = sorted(f"{Path(os.path.relpath(path, dataset.root or os.curdir)).as_posix()}\t{target}"
                       for path, target in dataset.samples)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return {"num_images": len(dataset), "num_classes": dataset.num_classes, "sha256": digest}
