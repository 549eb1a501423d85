"""Export weights to timm's hub format: a folder holding ``model.safetensors`` and ``config.json``.

``timm.create_model('local-dir:FOLDER', pretrained=True)`` loads it, as do ``mambaout.create_model(name,
checkpoint=FOLDER)``, ``validate.py --checkpoint FOLDER`` and the demo; ``hf upload USER/REPO FOLDER`` publishes it
as it is. The config records the architecture, the class count and names, and the preprocessing the weights were
evaluated with (a run's eval settings, or the model's pretrained config).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm

from .checkpoint import HUB_WEIGHTS_FILES, save_weights
from .inference import EXPORT_CONFIG_FILE, Classifier, imagenet_descriptions, load_classifier

WEIGHTS_FILE = HUB_WEIGHTS_FILES[0]
# What a copy of the model's pretrained config keeps: the rest describes other weights (their URL, hub id,
# license, test-time size) or follows from the preprocessing.
_ARCHITECTURE_KEYS = ("first_conv", "classifier")


@dataclass
class Export:
    folder: Path
    classifier: Classifier
    timm_loads_it: bool  # the architecture is timm's (the `_ssm` twins are only ours)


def export_for_hub(checkpoint: str | Path, out_dir: str | Path, model_name: str | None = None,
                   use_ema: bool = False) -> Export:
    """Writes ``out_dir/model.safetensors`` (timm's key layout) and ``out_dir/config.json`` for ``checkpoint``
    (any layout this project reads); ``model_name`` only where the checkpoint does not say it."""
    classifier = load_classifier(checkpoint, model_name, use_ema)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(classifier.model.state_dict(), folder / WEIGHTS_FILE)
    (folder / EXPORT_CONFIG_FILE).write_text(json.dumps(hub_config(classifier), indent=2) + "\n")
    return Export(folder, classifier, timm.is_model(classifier.model_name))


def hub_config(classifier: Classifier) -> dict[str, Any]:
    """timm's ``config.json``: the architecture and its head at the top, how to feed it in ``pretrained_cfg``."""
    model = classifier.model
    source = getattr(model, "pretrained_cfg", None) or {}
    pretrained = {key: source[key] for key in _ARCHITECTURE_KEYS if key in source}
    pretrained.update(classifier.preprocessing.pretrained_cfg(), num_classes=classifier.num_classes)
    config: dict[str, Any] = {"architecture": classifier.model_name, "num_classes": classifier.num_classes,
                              "num_features": model.num_features}
    if classifier.labels is not None:
        config["label_names"] = classifier.labels
        imagenet = imagenet_descriptions()
        descriptions = {label: imagenet[label] for label in classifier.labels if label in imagenet}
        if descriptions:
            config["label_descriptions"] = descriptions
    config["pretrained_cfg"] = pretrained
    return config
