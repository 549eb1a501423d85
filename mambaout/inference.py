"""A classifier ready for images: the model, its preprocessing and its class names, from any checkpoint.

What a checkpoint says about itself decides: a training checkpoint carries its run's config and class list (a weights
file in a run folder has them beside it, ``config.yaml`` and ``classes.json``); an export folder
(``mambaout.export``) its ``config.json``; other weights (the release, timm/hub files) take the model's pretrained
config, and a 1000-class model ImageNet's class names (timm ships them: nothing is downloaded).
Used by the demo, the export and validate.py.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.data import ImageNetInfo, resolve_data_config
from torch import nn

from . import checkpoint
from .checkpoint import CheckpointError
from .config import Config, ConfigError, config_from_dict, eval_img_size, load_config
from .data.sources.folder import imagenet_synsets
from .data.transforms import build_eval_transform
from .models import MambaOut, create_model

EXPORT_CONFIG_FILE = "config.json"  # timm's hub format (mambaout.export writes it)
IMAGENET_CLASSES = 1000

log = logging.getLogger("mambaout")


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation transform: resize the short side to ``img_size / crop_pct``, centre-crop, normalise."""

    img_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_config(cls, cfg: Config) -> Preprocessing:
        """A run's evaluation settings."""
        return cls(eval_img_size(cfg), cfg.eval.crop_pct, cfg.eval.interpolation, tuple(cfg.data.mean),
                   tuple(cfg.data.std))

    @classmethod
    def from_pretrained_cfg(cls, pretrained_cfg: Mapping[str, Any]) -> Preprocessing:
        """A timm pretrained config's, with timm's defaults for what it leaves out."""
        data = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
        return cls(data["input_size"][-1], data["crop_pct"], data["interpolation"], tuple(data["mean"]),
                   tuple(data["std"]))

    def transform(self):
        return build_eval_transform(self.img_size, crop_pct=self.crop_pct, interpolation=self.interpolation,
                                    mean=self.mean, std=self.std)

    def pretrained_cfg(self) -> dict[str, Any]:
        """The same settings as timm's pretrained-config keys."""
        return {"input_size": (3, self.img_size, self.img_size), "crop_pct": self.crop_pct, "crop_mode": "center",
                "interpolation": self.interpolation, "mean": self.mean, "std": self.std}

    def overrides(self) -> list[str]:
        """The same settings as config overrides (``KEY=VALUE``)."""
        keys = {"eval.img_size": self.img_size, "eval.crop_pct": self.crop_pct,
                "eval.interpolation": self.interpolation, "data.mean": list(self.mean), "data.std": list(self.std)}
        return [f"{key}={json.dumps(value)}" for key, value in keys.items()]

    def describe(self) -> str:
        resized = math.floor(self.img_size / self.crop_pct)  # timm's eval transform rounds down
        return (f"resize the short side to {resized} px ({self.interpolation}), centre-crop "
                f"{self.img_size} x {self.img_size}, normalise with mean ({_numbers(self.mean)}) and std "
                f"({_numbers(self.std)})")


def _numbers(values: Sequence[float]) -> str:
    return ", ".join(f"{value:.4g}" for value in values)


@dataclass
class CheckpointInfo:
    """What a checkpoint holds and says about itself (None where it is silent)."""

    weights: dict[str, torch.Tensor]
    model_name: str | None
    labels: list[str] | None  # the class of each output: a run's class folders, ImageNet synsets...
    preprocessing: Preprocessing | None
    config: Config | None  # the run's config, for a checkpoint of this project


def is_export_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / EXPORT_CONFIG_FILE).is_file()


def read_export_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / EXPORT_CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot be read as JSON ({error}); export the weights again") from None
    if not isinstance(config, dict) or "architecture" not in config or "pretrained_cfg" not in config:
        raise CheckpointError(f"{path}: not a timm hub config (no 'architecture' or 'pretrained_cfg'); export the "
                              "weights again with scripts/export.py")
    return config


def read_checkpoint_info(path: str | Path, use_ema: bool = False) -> CheckpointInfo:
    """The weights of ``path`` (any layout; a run's training checkpoint; an export folder) and what it says about
    the model, its classes and its preprocessing."""
    content = checkpoint.read_file(path)
    weights = checkpoint.unwrap_state_dict(content, use_ema=use_ema, source=str(path))
    if is_export_folder(path):
        exported = read_export_config(path)
        pretrained = exported["pretrained_cfg"]
        labels = exported.get("label_names") or pretrained.get("label_names")
        return CheckpointInfo(weights, exported["architecture"], _label_list(labels),
                              Preprocessing.from_pretrained_cfg(pretrained), None)
    run_folder = None if Path(path).is_dir() else Path(path).parent  # where a run keeps its weights files
    config = _run_config(content, run_folder, str(path))
    labels = content.get("classes") if isinstance(content, dict) else None
    if labels is None and run_folder is not None and (run_folder / "classes.json").is_file():
        labels = json.loads((run_folder / "classes.json").read_text())
    return CheckpointInfo(weights, config.model.name if config else None, labels,
                          Preprocessing.from_config(config) if config else None, config)


def _run_config(content: object, run_folder: Path | None, source: str) -> Config | None:
    """The config saved in a training checkpoint, or the ``config.yaml`` of the run folder holding the file."""
    saved = run_folder / "config.yaml" if run_folder is not None else None
    try:
        if isinstance(content, dict) and isinstance(content.get("config"), dict):
            return config_from_dict(content["config"], source=source)
        return load_config(saved) if saved is not None and saved.is_file() else None
    except ConfigError as error:  # a run of an older schema: its weights still load
        log.warning("%s: its run's config no longer reads (%s); the model's pretrained preprocessing is used",
                    source, error)
        return None


def _label_list(labels: Sequence[str] | Mapping[Any, str] | None) -> list[str] | None:
    """timm's ``label_names``: a list, or a dict of index -> name."""
    if isinstance(labels, Mapping):
        return [labels[key] for key in sorted(labels, key=int)]
    return list(labels) if labels else None


def pretrained_preprocessing(model_name: str) -> Preprocessing:
    """How the model's default pretrained weights are evaluated (its pretrained config)."""
    with torch.device("meta"):  # the config only: no weights allocated
        model = create_model(model_name)
    return Preprocessing.from_pretrained_cfg(getattr(model, "pretrained_cfg", None) or {})


def imagenet_labels_if_default(labels: list[str] | None, num_classes: int) -> list[str] | None:
    """Weights that do not name their classes and have 1000 are taken for ImageNet-1k's, in its standard order."""
    if labels is None and num_classes == IMAGENET_CLASSES:
        return list(imagenet_synsets())
    return labels


def display_names(labels: list[str] | None, num_classes: int) -> list[str]:
    """What a person reads for each class: ImageNet's description of a synset, the label itself otherwise; a name
    that two classes share is followed by the label (ImageNet has two 'crane's: the bird and the machine)."""
    if labels is None:
        return [f"class {index}" for index in range(num_classes)]
    descriptions = imagenet_descriptions()
    names = [descriptions.get(label, label) for label in labels]
    shared = {name for name, count in Counter(names).items() if count > 1}
    return [f"{name} ({label})" if name in shared else name for name, label in zip(names, labels)]


@functools.cache
def imagenet_descriptions() -> dict[str, str]:
    """ImageNet-1k synset -> its words ('n01443537' -> 'goldfish, Carassius auratus')."""
    return ImageNetInfo().label_descriptions(as_dict=True)


@dataclass
class Prediction:
    top: list[tuple[str, float]]  # (class name, probability), most probable first
    seconds: float  # the model's forward pass


@dataclass
class Classifier:
    """A model in eval mode with its preprocessing and class names."""

    model_name: str
    model: nn.Module
    preprocessing: Preprocessing
    labels: list[str] | None
    names: list[str]
    config: Config | None = None

    def __post_init__(self) -> None:
        self._transform = self.preprocessing.transform()

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @torch.no_grad()
    def predict(self, image: Image.Image, k: int = 5) -> Prediction:
        batch = self._transform(image.convert("RGB")).unsqueeze(0)
        start = time.perf_counter()
        logits = self.model(batch)
        seconds = time.perf_counter() - start
        probabilities, indices = logits.float().softmax(-1)[0].topk(min(k, self.num_classes))
        return Prediction([(self.names[i], p) for i, p in zip(indices.tolist(), probabilities.tolist())], seconds)


def load_classifier(path: str | Path, model_name: str | None = None, use_ema: bool = False) -> Classifier:
    """The classifier in ``path``; ``model_name`` is needed only where the checkpoint does not say it and its
    weights are not those of a known MambaOut variant."""
    info = read_checkpoint_info(path, use_ema)
    name = model_name or info.model_name or checkpoint.guess_variant(info.weights)
    if name is None:
        raise CheckpointError(f"{path}: does not say which model it holds and is no known MambaOut variant: "
                              "give the model's name (--model NAME)")
    with torch.device("meta"):  # its classifier's name only
        num_classes = classifier_outputs(create_model(name), info.weights, str(path))
    model = create_model(name, num_classes=num_classes)
    checkpoint.load_weights(model, info.weights, source=str(path))
    labels = imagenet_labels_if_default(info.labels, num_classes)
    if labels is not None and len(labels) != num_classes:
        raise CheckpointError(f"{path}: names {len(labels)} classes but its classifier has {num_classes} outputs; "
                              "its class list (classes.json or label_names) belongs to other weights")
    return Classifier(name, model.eval(), info.preprocessing or pretrained_preprocessing(name), labels,
                      display_names(labels, num_classes), info.config)


def classifier_outputs(model: nn.Module, weights: Mapping[str, torch.Tensor], source: str) -> int:
    """The number of classes that the weights' classifier for ``model`` predicts."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    classifier = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    named = checkpoint.to_timm_layout(weights) if isinstance(model, MambaOut) else weights
    saved = named.get(f"{classifier}.weight") if classifier else None
    if saved is None:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        raise CheckpointError(f"{source}: has no classifier ({classifier}.weight), so it cannot classify images: "
                              f"give the full weights of a {name} classifier, not a backbone or feature-extractor "
                              "file")
    return saved.shape[0]
