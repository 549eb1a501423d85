"""Class-folder datasets on a local disk: ``root/split/<class>/**/<image>`` (ImageNet synset order when the folders
are synsets) and the flat ImageNet validation folder with its ground-truth file. A sample's bytes are its file."""
from __future__ import annotations

import csv
import functools
import hashlib
import importlib.resources
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from timm.data import ImageNetInfo

from ..decode import read_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
KAGGLE_GROUND_TRUTH = "LOC_val_solution.csv"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
_SYNSET = re.compile(r"n\d{8}")


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
    table = importlib.resources.files("mambaout.data").joinpath("ilsvrc2012_id_to_synset.txt")
    return tuple(table.read_text().split())


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")



def _list_class_folder(split_dir: Path, class_dirs: list[str], classes: Sequence[str]) -> list[tuple[str, int]]:
    class_to_target = {name: target for target, name in enumerate(classes)}
    if _is_index_layout(class_dirs):
        class_to_target = {name: int(name) for name in class_dirs}
    samples = []
    for class_dir in class_dirs:
        for folder, subfolders, files in os.walk(split_dir / class_dir, followlinks=True):
            subfolders.sort()
            samples += [(os.path.join(folder, name), class_to_target[class_dir])
                        for name in sorted(files) if _is_image(name)]
    return samples


def _is_index_layout(class_dirs: list[str]) -> bool:
    """ImageNet-V2's layout: a folder per ImageNet-1k class named by its index, 0 to 999."""
    return len(class_dirs) == 1000 and set(class_dirs) == {str(index) for index in range(1000)}


def _folder_classes(split_dir: Path, class_dirs: list[str], classes: Sequence[str] | None) -> list[str]:
    """The class list of a class-folder split: ImageNet-1k for class-index folders (ImageNet-V2) when no other
    list is given, explicit, ImageNet-1k for synset folders, else sorted names."""
    if _is_index_layout(class_dirs) and (classes is None or list(classes) == list(imagenet_synsets())):
        return list(imagenet_synsets())
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

    * ImageNet-V2's folders ``0`` to ``999``: the ImageNet-1k class of that index.
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



class FolderSource:
    """The samples of a folder split, by index: ``samples`` are ``(path, target)`` in the scan's order."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], root: str | os.PathLike) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.root = os.fspath(root)
        self.targets = [target for _, target in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> torch.Tensor:
        return read_bytes(self.samples[index][0])

    def describe(self, index: int) -> str:
        return self.samples[index][0]

    def name(self, index: int) -> str:
        """The file's path below the split's folder."""
        return Path(os.path.relpath(self.samples[index][0], self.root)).as_posix()

    def fingerprint(self) -> dict[str, Any]:
        """Image and class counts, and the sha256 of the sorted ``relative/path<TAB>target`` lines."""
        lines = sorted(f"{self.name(index)}\t{target}" for index, target in enumerate(self.targets))
        digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        return {"num_images": len(self), "num_classes": len(self.classes), "sha256": digest}
