"""ImageNet's evaluation variants beyond the 1k labels, for validate.py: ReaL's reassessed labels and the
200-class subsets of ImageNet-A and ImageNet-R (class lists as timm ships them).

ReaL (Beyer et al., 2020, "Are we done with ImageNet?") gives each validation image a set of correct classes,
possibly empty: a prediction counts when it is in the set, and images with an empty set are left out. A subset
restricts the 1000 logits to its classes, so top-k and the loss are over those alone.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import timm.data
import torch
from torch import nn

from .data.sources.folder import imagenet_synsets

SUBSETS = {"a": "imagenet_a_synsets.txt", "r": "imagenet_r_synsets.txt"}
"""``--class-subset`` names: the synset lists timm ships for ImageNet-A and ImageNet-R."""

_VAL_IMAGE = re.compile(r"ILSVRC2012_val_(\d{8})")


class EvalSetError(ValueError):
    """A label file or subset that does not fit the data; the message says which and what was expected."""


def subset_classes(name_or_file: str) -> list[int]:
    """The ImageNet-1k indices of a subset: 'a', 'r', or a file of synsets or indices, one per line."""
    path = Path(timm.data.__file__).parent / "_info" / SUBSETS[name_or_file] if name_or_file in SUBSETS else Path(
        name_or_file)
    if not path.is_file():
        raise EvalSetError(f"--class-subset {name_or_file}: expected 'a', 'r' or a file of ImageNet-1k synsets or "
                           f"class indices (one per line), and {path} is not a file")
    entries = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    index_of = {synset: index for index, synset in enumerate(imagenet_synsets())}
    indices = []
    for entry in entries:
        index = int(entry) if entry.isdigit() else index_of.get(entry)
        if index is None or not 0 <= index < 1000:
            raise EvalSetError(f"{path}: {entry!r} is neither an ImageNet-1k synset nor a class index 0-999")
        indices.append(index)
    return sorted(set(indices))


class RestrictedLogits(nn.Module):
    """``model`` with its logits outside ``classes`` set to -inf: softmax, top-k and the loss over ``classes``."""

    def __init__(self, model: nn.Module, classes: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.model = model
        mask = torch.full((num_classes,), float("-inf"))
        mask[list(classes)] = 0.0
        self.register_buffer("mask", mask)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images) + self.mask


def check_targets_in_subset(targets: Sequence[int], classes: Sequence[int], source: str) -> None:
    outside = sorted(set(targets) - set(classes))
    if outside:
        raise EvalSetError(f"--class-subset {source}: the dataset has images of {len(outside)} classes outside the "
                           f"subset (indices {outside[:10]}); evaluate the subset's own set (ImageNet-A/-R) or "
                           "leave --class-subset out")


def read_real_labels(path: str | Path) -> list[list[int]]:
    """real.json: for the i-th ImageNet validation image (ILSVRC2012_val_{i+1:08d}), its list of classes."""
    try:
        labels = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise EvalSetError(f"--real-labels {path}: cannot read it as ReaL's real.json ({error})") from None
    if not isinstance(labels, list) or not all(isinstance(entry, list) for entry in labels):
        raise EvalSetError(f"--real-labels {path}: expected a JSON list with a list of class indices per "
                           "validation image (ReaL's real.json)")
    return labels


def real_accuracy(predictions: list[tuple[int, int, list[int], list[float]]], image_name: Callable[[int], str],
                  labels: list[list[int]]) -> dict[str, Any]:
    """ReaL top-1/top-5 of ``predictions`` (index, target, top classes, scores): an image counts when its
    file name (``image_name(index)``) has a non-empty set of real labels."""
    correct1 = correct5 = counted = 0
    for index, _, classes, _ in predictions:
        real = set(labels[_real_position(image_name(index), len(labels))])
        if not real:
            continue
        counted += 1
        correct1 += classes[0] in real
        correct5 += any(c in real for c in classes[:5])
    denominator = max(counted, 1)
    return {"real_top1": 100.0 * correct1 / denominator, "real_top5": 100.0 * correct5 / denominator,
            "real_count": counted}


def _real_position(name: str, known: int) -> int:
    match = _VAL_IMAGE.search(name)
    if match is None:
        raise EvalSetError(f"--real-labels: {name} is not an ImageNet validation image: ReaL's labels are matched "
                           "by file name (ILSVRC2012_val_00000001.JPEG ...)")
    position = int(match.group(1)) - 1
    if not 0 <= position < known:
        raise EvalSetError(f"--real-labels: {name} is past the {known} images the label file covers")
    return position


def eval_set_name(request_name: str | None, real_labels: str | None, class_subset: str | None, root: str) -> str:
    """What the results call the set: the name given, else imagenet-real/-a/-r from the flags, else the dataset
    folder's name."""
    if request_name:
        return request_name
    if real_labels:
        return "imagenet-real"
    if class_subset in SUBSETS:
        return f"imagenet-{class_subset}"
    return Path(root).name or str(root)
