"""Export weights to timm's hub format: a folder holding ``model.safetensors`` and ``config.json``.

``timm.create_model('local-dir:FOLDER', pretrained=True)`` loads it, as do ``mambaout.create_model(name,
checkpoint=FOLDER)``, ``validate.py --checkpoint FOLDER`` and the demo; ``hf upload USER/REPO FOLDER`` publishes it
as it is. The config records the architecture, the class count and names, and the preprocessing the weights were
evaluated with (a run's eval settings, or the model's pretrained config).

``export_onnx`` writes ``model.onnx`` instead: the classifier for onnxruntime, with the same preprocessing and class
names in the model's metadata; ``OnnxModel`` runs it as a module (``scripts/validate_onnx.py``).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .checkpoint import HUB_WEIGHTS_FILES, CheckpointError, save_weights
from .inference import EXPORT_CONFIG_FILE, Classifier, Preprocessing, imagenet_descriptions, load_classifier
from .models import MambaOut
from .models.ssm import SelectiveScan2d

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


# --- ONNX ------------------------------------------------------------------------------------------------------

ONNX_FILE = "model.onnx"
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"
# Opset 20: torch 2.14's exporter writes it natively (another opset adds a version-conversion pass) and onnxruntime
# (1.32 tested) implements it; a newer one would only shut out older runtimes, the model using no operator after 20's
# Gelu.
ONNX_OPSET = 20
# Metadata every export holds (``onnx_metadata``); label_names too where the classes are known.
ONNX_REQUIRED_METADATA = ("architecture", "num_classes", "input_size", "crop_pct", "interpolation", "mean", "std")


class ExportError(Exception):
    """An export that cannot be done as asked; the message says why and what to do."""


@dataclass
class OnnxExport:
    path: Path
    classifier: Classifier
    seconds: float  # tracing, translation and writing
    max_logit_difference: float  # onnxruntime against PyTorch on a random batch


def export_onnx(checkpoint: str | Path, out_dir: str | Path, model_name: str | None = None,
                use_ema: bool = False) -> OnnxExport:
    """Writes ``out_dir/model.onnx`` for ``checkpoint``: normalised images [batch, 3, size, size] (any batch) to
    logits, the preprocessing and class names in its metadata (``onnx_metadata``). An existing model.onnx is never
    replaced."""
    classifier = load_classifier(checkpoint, model_name, use_ema)
    _refuse_selective_scan(classifier)
    target = _new_file(Path(out_dir), ONNX_FILE)
    start = time.perf_counter()
    program = _onnx_program(classifier.model, classifier.preprocessing.img_size)
    program.model.metadata_props.update(onnx_metadata(classifier))
    _save_new(program, target)
    seconds = time.perf_counter() - start
    return OnnxExport(target, classifier, seconds, _max_logit_difference(classifier, target))


def onnx_metadata(classifier: Classifier) -> dict[str, str]:
    """The architecture, class count (and names) and timm's pretrained-config keys of the preprocessing, each as
    JSON."""
    entries: dict[str, Any] = {"architecture": classifier.model_name, "num_classes": classifier.num_classes,
                               **classifier.preprocessing.pretrained_cfg()}
    if classifier.labels is not None:
        entries["label_names"] = classifier.labels
    return {key: json.dumps(value) for key, value in entries.items()}


def _refuse_selective_scan(classifier: Classifier) -> None:
    # The portable scan (models/ssm.py) is a Python loop over the tokens, which torch.export unrolls. The graph is
    # right (femto_ssm's logits to 2e-6) but grows with the pixel count: femto_ssm became 6,797 ONNX nodes in 3 min
    # at 32 px and 22,817 in 17 min at 64 px (femto: 368 nodes in 5-8 s), and 224 px has 12x 64 px's steps. An
    # export needs the scan as an ONNX Loop first.
    if any(isinstance(module, SelectiveScan2d) for module in classifier.model.modules()):
        raise ExportError(f"{classifier.model_name} cannot be exported to ONNX: its selective scan is a loop over "
                          "every token, which the exporter unrolls, so the graph and the export time grow with the "
                          "pixel count (femto_ssm: 22,817 nodes in 17 min at 64 px); export it with --format hub")


def _new_file(folder: Path, name: str) -> Path:
    """``folder/name``, the folder created, refused where the file exists."""
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} is a file, not a folder: give a folder to write {name} into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"{folder}: cannot create the folder ({error.strerror})") from None
    if (folder / name).exists():
        raise ExportError(f"{folder / name} already exists: remove it, or export into another folder")
    return folder / name


def _onnx_program(model: nn.Module, img_size: int) -> torch.onnx.ONNXProgram:
    # torch.export's exporter (dynamo=True): its graphs give PyTorch's logits to ~2e-6, for the _ssm twins too,
    # while the TorchScript exporter (deprecated since torch 2.9) mis-exports their in-place scan under a dynamic
    # batch (onnxruntime fails on a broadcast).
    if isinstance(model, MambaOut):
        model.set_block_form("dense")  # "auto" chooses by batch x height x width, which a dynamic batch leaves open
    example = torch.randn(2, 3, img_size, img_size)  # not batch 1: torch.export fixes a dimension of size 1
    return torch.onnx.export(model, (example,), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                             opset_version=ONNX_OPSET, dynamo=True,
                             dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)


def _save_new(program: torch.onnx.ONNXProgram, target: Path) -> None:
    """Written beside ``target``, then linked to its name: never a partial file, nor over one that appeared
    meanwhile."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        program.save(partial, external_data=False)  # one file: the weights inline (under ONNX's 2 GB)
        os.link(partial, target)
    except FileExistsError:
        raise ExportError(f"{target} already exists: remove it, or export into another folder") from None
    except OSError as error:
        raise ExportError(f"{target.parent}: cannot write {target.name} ({error.strerror or error})") from None
    finally:
        partial.unlink(missing_ok=True)


@torch.no_grad()
def _max_logit_difference(classifier: Classifier, path: Path, batch: int = 3) -> float:
    size = classifier.preprocessing.img_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    return (OnnxModel(path)(images) - classifier.model(images)).abs().max().item()


class OnnxModel(nn.Module):
    """An exported ``model.onnx`` run by onnxruntime on CPU tensors, as a module (``engine.evaluate`` takes it),
    with what its metadata says: ``architecture``, ``num_classes``, ``labels`` and ``preprocessing``."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        import onnxruntime  # the onnx extra: the hub export goes without it

        if not Path(path).is_file():
            raise CheckpointError(f"{path}: no such file")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - onnxruntime's own exception types: not a model it reads
            raise CheckpointError(f"{path}: onnxruntime cannot read it as a model ({error})") from None
        metadata = _read_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        self.architecture, self.num_classes = metadata["architecture"], metadata["num_classes"]
        self.labels: list[str] | None = metadata.get("label_names")
        self.preprocessing = Preprocessing.from_pretrained_cfg(metadata)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inputs = {ONNX_INPUT: images.float().contiguous().numpy()}
        return torch.from_numpy(self.session.run([ONNX_OUTPUT], inputs)[0])


def _read_metadata(entries: dict[str, str], path: str | Path) -> dict[str, Any]:
    """``onnx_metadata`` read back; refused where an entry is missing or not JSON (a model from elsewhere)."""
    missing = [key for key in ONNX_REQUIRED_METADATA if key not in entries]
    if missing:
        raise CheckpointError(f"{path}: its metadata lacks {', '.join(missing)}: export the model with "
                              "scripts/export.py --format onnx")
    try:
        return {key: json.loads(entries[key]) for key in (*ONNX_REQUIRED_METADATA, "label_names") if key in entries}
    except ValueError as error:
        raise CheckpointError(f"{path}: its metadata is not this project's JSON ({error}): export the model with "
                              "scripts/export.py --format onnx") from None
