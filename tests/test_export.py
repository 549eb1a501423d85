"""Export to timm's hub format: timm's ``local-dir:`` model gives our logits, and our loaders, validate.py and the
demo read the folder with its classes and preprocessing. Random weights; nothing is downloaded."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mambaout import create_model
from mambaout.checkpoint import save_weights
from mambaout.config import load_config, to_yaml
from mambaout.data import imagenet_synsets
from mambaout.export import export_for_hub
from mambaout.inference import load_classifier

REPO = Path(__file__).resolve().parent.parent
DIGITS = [str(digit) for digit in range(10)]

_spec = importlib.util.spec_from_file_location("export_cli", REPO / "scripts" / "export.py")
export_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_cli)
_spec = importlib.util.spec_from_file_location("validate_cli", REPO / "validate.py")
validate_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(validate_cli)


def random_model(name: str, num_classes: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=num_classes).eval()


def max_logit_difference(ours: torch.nn.Module, theirs: torch.nn.Module, img_size: int) -> float:
    torch.manual_seed(1)
    images = torch.randn(2, 3, img_size, img_size) * 2
    with torch.no_grad():
        logits = ours(images)
        assert logits.std() > 0.3  # logits of some size: agreeing to 1e-5 means something
        return (logits - theirs.eval()(images)).abs().max().item()


def test_imagenet_release_layout_exports_to_timm(tmp_path, capsys):
    """Weights in the original release's layout, 1000 classes: timm gets ImageNet's names and our logits."""
    model = random_model("mambaout_femto", 1000)
    save_weights(model.state_dict(), tmp_path / "femto.pth", layout="original")
    assert export_cli.main([str(tmp_path / "femto.pth"), str(tmp_path / "hub")]) == 0
    assert f"timm.create_model('local-dir:{tmp_path / 'hub'}', pretrained=True)" in capsys.readouterr().out

    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert (config["architecture"], config["num_classes"], config["num_features"]) == ("mambaout_femto", 1000, 288)
    assert config["label_names"] == list(imagenet_synsets())
    assert config["label_descriptions"]["n01443537"] == "goldfish, Carassius auratus"
    assert config["pretrained_cfg"] == {
        "first_conv": "stem.conv1", "classifier": "head.fc", "input_size": [3, 224, 224], "crop_pct": 1.0,
        "crop_mode": "center", "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225], "num_classes": 1000}

    theirs = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True)
    assert type(theirs).__module__.startswith("timm.")
    assert theirs.pretrained_cfg["label_names"][1] == "n01443537"
    assert max_logit_difference(model, theirs, 32) < 1e-5
    assert max_logit_difference(model, create_model("mambaout_femto", checkpoint=tmp_path / "hub"), 32) == 0


@pytest.fixture
def digits_run(tmp_path) -> Path:
    """A 10-class run's ``best.pth`` at 32 px (bilinear, crop 0.875, its own mean/std), and its validation folder
    (a dark and a bright image per digit)."""
    for digit in DIGITS:
        folder = tmp_path / "digits" / "val" / digit
        folder.mkdir(parents=True)
        for shade in (40, 200):
            Image.fromarray(np.full((36, 36, 3), shade + int(digit), np.uint8)).save(folder / f"{shade}.png")
    cfg = load_config(None, ["model.name=mambaout_femto", f"data.root={tmp_path / 'digits'}", "data.img_size=32",
                             "eval.crop_pct=0.875", "eval.interpolation=bilinear", "data.mean=[0.5,0.5,0.5]",
                             "data.std=[0.25,0.25,0.25]"])
    weights = random_model("mambaout_femto", 10).state_dict()
    torch.save({"model": weights, "config": cfg.to_dict(), "classes": DIGITS}, tmp_path / "best.pth")
    return tmp_path / "best.pth"


def test_run_checkpoint_exports_with_its_classes_and_preprocessing(digits_run, tmp_path):
    export = export_for_hub(digits_run, tmp_path / "hub")
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["label_names"] == DIGITS and "label_descriptions" not in config
    assert {key: config["pretrained_cfg"][key] for key in ("input_size", "crop_pct", "interpolation", "mean", "std")} \
        == {"input_size": [3, 32, 32], "crop_pct": 0.875, "interpolation": "bilinear", "mean": [0.5] * 3,
            "std": [0.25] * 3}

    theirs = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True)
    assert theirs.num_classes == 10
    assert max_logit_difference(export.classifier.model, theirs, 32) < 1e-5
    data_config = timm.data.resolve_data_config(model=theirs)
    assert (tuple(data_config["input_size"]), data_config["crop_pct"], data_config["interpolation"]) \
        == ((3, 32, 32), 0.875, "bilinear")

    # the demo's loader: the same names and preprocessing; validate.py: the model and preprocessing from the folder
    demo_view = load_classifier(tmp_path / "hub")
    assert demo_view.names == DIGITS and demo_view.preprocessing == export.classifier.preprocessing
    results = tmp_path / "results.json"
    assert validate_cli.main(["--checkpoint", str(tmp_path / "hub"), "--data", str(tmp_path / "digits"),
                              "--workers", "0", "--device", "cpu", "--results", str(results)]) == 0
    summary = json.loads(results.read_text())
    assert (summary["model"], summary["img_size"], summary["crop_pct"], summary["interpolation"], summary["count"]) \
        == ("mambaout_femto", 32, 0.875, "bilinear", 20)


def test_weights_in_a_run_folder_take_its_config_and_classes(tmp_path):
    """A weights-only file beside the run's config.yaml and classes.json."""
    cfg = load_config(None, ["model.name=mambaout_femto", "data.img_size=48", "eval.interpolation=bilinear"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "dog", "n01443537"]))
    save_weights(random_model("mambaout_femto", 3).state_dict(), tmp_path / "weights.safetensors")
    classifier = load_classifier(tmp_path / "weights.safetensors")
    assert classifier.names == ["cat", "dog", "goldfish, Carassius auratus"]
    assert (classifier.preprocessing.img_size, classifier.preprocessing.interpolation) == (48, "bilinear")


def test_ssm_twin_exports_for_our_loaders_and_says_timm_cannot(tmp_path, capsys):
    model = random_model("mambaout_femto_ssm", 5)
    save_weights(model.state_dict(), tmp_path / "ssm.safetensors")
    assert export_cli.main([str(tmp_path / "ssm.safetensors"), str(tmp_path / "hub"),
                            "--model", "mambaout_femto_ssm"]) == 0
    out = capsys.readouterr().out
    assert "timm:     cannot load it: mambaout_femto_ssm is an architecture of this project, not of timm" in out
    assert f"mambaout.create_model('mambaout_femto_ssm', checkpoint='{tmp_path / 'hub'}')" in out
    loaded = create_model("mambaout_femto_ssm", num_classes=5, checkpoint=tmp_path / "hub")
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True)


def test_export_errors_are_one_line(tmp_path, capsys):
    torch.save(random_model("mambaout_femto", 3).state_dict(), tmp_path / "femto.pth")
    with pytest.raises(SystemExit) as exit_info:
        export_cli.run_cli(lambda: export_cli.main([str(tmp_path / "missing.pth"), str(tmp_path / "out")]),
                           "export.py")
    assert exit_info.value.code == 2
    assert "missing.pth: no such file" in capsys.readouterr().err
    weights = {key: value for key, value in torch.load(tmp_path / "femto.pth").items() if "head" not in key}
    torch.save(weights, tmp_path / "backbone.pth")
    with pytest.raises(Exception, match=r"has no classifier \(head\.fc\.weight\)"):
        export_for_hub(tmp_path / "backbone.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()
