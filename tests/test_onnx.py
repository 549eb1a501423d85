"""ONNX export: onnxruntime gives PyTorch's logits at any batch size, validate.py's numbers through
scripts/validate_onnx.py, and the preprocessing back from the model's metadata. Random weights, 32 px; nothing is
downloaded."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the ONNX tests need the dev extra (onnx, onnxscript, onnxruntime)")
pytest.importorskip("onnxruntime", reason="the ONNX tests need the dev extra (onnx, onnxscript, onnxruntime)")

from conftest import CLASSES  # noqa: E402
from helpers import REPO, load_script  # noqa: E402
from mambaout import create_model  # noqa: E402
from mambaout.checkpoint import CheckpointError, save_weights  # noqa: E402
from mambaout.config import load_config, to_yaml  # noqa: E402
from mambaout.export import ONNX_OPSET, ExportError, OnnxModel, export_onnx  # noqa: E402
from mambaout.inference import Preprocessing, load_classifier  # noqa: E402

export_cli = load_script("export")
validate_onnx_cli = load_script("validate_onnx")
_spec = importlib.util.spec_from_file_location("validate_cli", REPO / "validate.py")
validate_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(validate_cli)

RUN_PREPROCESSING = Preprocessing(32, 0.875, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 4-class femto run's folder: ``best.pth`` (32 px, crop 0.875, bilinear, its own mean/std, conftest's
    classes; random weights, the classifier scaled so that no two classes come near a tie), its ``config.yaml``,
    and ``onnx/model.onnx`` exported once by the command line."""
    folder = tmp_path_factory.mktemp("run")
    cfg = load_config(None, ["model.name=mambaout_femto", "data.img_size=32", "eval.crop_pct=0.875",
                             "eval.interpolation=bilinear", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"])
    (folder / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(0)
    weights = create_model("mambaout_femto", num_classes=len(CLASSES)).state_dict()
    weights["head.fc.weight"] *= 10
    torch.save({"model": weights, "config": cfg.to_dict(), "classes": list(CLASSES)}, folder / "best.pth")
    assert export_cli.main([str(folder / "best.pth"), str(folder / "onnx"), "--format", "onnx"]) == 0
    return folder


def test_onnxruntime_gives_pytorchs_logits_at_any_batch_size(run):
    pytorch = load_classifier(run / "best.pth").model
    exported = OnnxModel(run / "onnx" / "model.onnx")
    assert [tensor.shape for tensor in exported.session.get_inputs()] == [["batch", 3, 32, 32]]
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 7):
        images = torch.randn(batch, 3, 32, 32, generator=generator) * 2
        with torch.no_grad():
            logits = pytorch(images)
        assert logits.shape == (batch, len(CLASSES)) and logits.std() > 1  # agreeing to 1e-4 means something
        assert (exported(images) - logits).abs().max().item() < 1e-4


def test_metadata_round_trips(run):
    path = run / "onnx" / "model.onnx"
    exported = OnnxModel(path)
    assert exported.preprocessing == load_classifier(run / "best.pth").preprocessing == RUN_PREPROCESSING
    assert (exported.architecture, exported.num_classes, exported.labels) == ("mambaout_femto", 4, list(CLASSES))
    model = onnx.load(path)
    assert [(entry.domain, entry.version) for entry in model.opset_import if entry.domain == ""] == [("", ONNX_OPSET)]
    metadata = {entry.key: json.loads(entry.value) for entry in model.metadata_props}  # JSON, for any reader
    assert {key: metadata[key] for key in ("input_size", "crop_pct", "interpolation", "mean", "std")} == {
        "input_size": [3, 32, 32], "crop_pct": 0.875, "interpolation": "bilinear", "mean": [0.5] * 3,
        "std": [0.25] * 3}


def test_validate_onnx_gives_validate_pys_numbers(run, image_root, tmp_path):
    """validate.py on the run's checkpoint and config; validate_onnx.py on its export, preprocessing from the
    metadata alone."""
    fast = ["--data", str(image_root), "--workers", "0"]
    assert validate_cli.main(["--config", str(run / "config.yaml"), "--checkpoint", str(run / "best.pth"),
                              "--device", "cpu", *fast, "--results", str(tmp_path / "pytorch.json")]) == 0
    assert validate_onnx_cli.main([str(run / "onnx" / "model.onnx"), *fast,
                                   "--results", str(tmp_path / "onnx.json")]) == 0
    pytorch, exported = (json.loads((tmp_path / name).read_text()) for name in ("pytorch.json", "onnx.json"))
    assert exported["count"] == pytorch["count"] == 21
    assert (exported["top1"], exported["top5"]) == (pytorch["top1"], pytorch["top5"])
    assert 0 < exported["top1"] < 100
    assert exported["loss"] == pytest.approx(pytorch["loss"], rel=1e-5)
    same = ("model", "data", "pipeline", "img_size", "crop_pct", "interpolation", "mean", "std")
    assert {key: exported[key] for key in same} == {key: pytorch[key] for key in same}
    assert set(exported) < set(pytorch)  # validate.py's record, less what only a PyTorch model has (params...)


def test_ssm_twin_is_refused_by_name(tmp_path):
    """Its scan, a loop over the tokens, would be unrolled into a graph that grows with the image (export.py)."""
    save_weights(create_model("mambaout_femto_ssm", num_classes=3).state_dict(), tmp_path / "ssm.safetensors")
    with pytest.raises(ExportError, match="^mambaout_femto_ssm cannot be exported to ONNX: its selective scan is a "
                                          "loop over every token, which the exporter unrolls"):
        export_onnx(tmp_path / "ssm.safetensors", tmp_path / "out", "mambaout_femto_ssm")
    assert not (tmp_path / "out").exists()


def test_bad_input_is_one_line_and_nothing_is_overwritten(run, tmp_path):
    unrelated = tmp_path / "model.onnx"
    unrelated.write_text("someone else's model")
    done = subprocess.run([sys.executable, "scripts/export.py", str(run / "best.pth"), str(tmp_path), "--format",
                           "onnx"], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if "error" in line] == [
        f"export.py: error: {unrelated} already exists: remove it, or export into another folder"]
    assert unrelated.read_text() == "someone else's model"
    with pytest.raises(CheckpointError, match="missing.pth: no such file"):
        export_onnx(tmp_path / "missing.pth", tmp_path / "out")
    with pytest.raises(CheckpointError, match="best.pth: onnxruntime cannot read it as a model"):
        OnnxModel(run / "best.pth")
