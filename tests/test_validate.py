"""validate.py: the same numbers as a plain timm pipeline, every layout, exact on any process count, clear errors.

Weights are random timm models saved to disk (nothing is downloaded); images are the 32 px conftest folders.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision.datasets import ImageFolder

from conftest import write_image_folder
from mambaout.data import imagenet_synsets
from mambaout.data.pipeline import timm_eval_transform
from mambaout.models import published
from mambaout.validation import (ValidationError, published_reference, release_checkpoint,
                                 write_results)

REPO = Path(__file__).resolve().parent.parent
FAST = ["--workers", "0", "--device", "cpu"]

_spec = importlib.util.spec_from_file_location("validate_cli", REPO / "validate.py")
validate_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(validate_cli)


def random_weights(path: Path, num_classes: int, name: str = "mambaout_femto", seed: int = 0) -> Path:
    """Random timm weights, the classifier scaled up so that no two classes come near a tie."""
    torch.manual_seed(seed)
    state = timm.create_model(name, pretrained=False, num_classes=num_classes).state_dict()
    state["head.fc.weight"] *= 10
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def femto4(tmp_path_factory) -> Path:
    return random_weights(tmp_path_factory.mktemp("weights") / "femto4.pth", 4)


def run(tmp_path: Path, *args: str) -> tuple[dict, list[dict]]:
    """validate.py in this process: (results JSON, predictions CSV rows)."""
    results, predictions = tmp_path / "results.json", tmp_path / "predictions.csv"
    assert validate_cli.main([*FAST, *map(str, args), "--results", str(results),
                              "--predictions", str(predictions)]) == 0
    with open(predictions, newline="") as f:
        return json.loads(results.read_text()), list(csv.DictReader(f))


def cli_error(capsys, *args: str) -> str:
    """validate.py's command line expecting a user error: exit status 2 and one error line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        validate_cli.cli([*FAST, *map(str, args)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("validate.py: error:")]
    return line


def timm_reference(weights: Path, folder: Path, num_classes: int, **data_args) -> tuple[dict, dict]:
    """The plain pipeline: timm model + timm's data config and transform + a loop over the sorted folders.
    Returns ({top1, top5, loss, count}, {relative image path: (label, top-1 class, top-1 probability)})."""
    model = timm.create_model("mambaout_femto", pretrained=False, num_classes=num_classes)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    dataset = ImageFolder(str(folder), create_transform(**resolve_data_config(data_args, model=model)))
    correct1 = correct5 = loss = 0.0
    per_image = {}
    with torch.no_grad():
        for start in range(0, len(dataset), 8):
            items = [dataset[i] for i in range(start, min(start + 8, len(dataset)))]
            images, targets = torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
            logits = model(images)
            scores, classes = logits.softmax(1).topk(min(5, num_classes), dim=1)
            correct1 += (classes[:, 0] == targets).sum().item()
            correct5 += (classes == targets[:, None]).any(1).sum().item()
            loss += F.cross_entropy(logits, targets, reduction="sum").item()
            for offset, (c, s) in enumerate(zip(classes[:, 0].tolist(), scores[:, 0].tolist())):
                path, target = dataset.samples[start + offset]
                per_image[os.path.relpath(path, folder)] = (dataset.classes[target], dataset.classes[c], s)
    n = len(dataset)
    return {"top1": 100 * correct1 / n, "top5": 100 * correct5 / n, "loss": loss / n, "count": n}, per_image


def assert_same_predictions(rows: list[dict], reference: dict) -> None:
    assert sorted(row["image"] for row in rows) == sorted(reference)
    for row in rows:
        label, top1, prob = reference[row["image"]]
        assert (row["label"], row["top1"]) == (label, top1), row["image"]
        assert float(row["prob1"]) == pytest.approx(prob, abs=1e-5)


def assert_same_totals(result: dict, reference: dict) -> None:
    assert (result["count"], result["top1"], result["top5"]) == (reference["count"], reference["top1"],
                                                                reference["top5"])
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5)


# --- the numbers -------------------------------------------------------------------------------------------------

def test_matches_plain_timm_pipeline(image_root, femto4, tmp_path):
    """Default preprocessing is the model's pretrained config (224, crop 1.0, bicubic), as timm resolves it."""
    result, rows = run(tmp_path, "--model", "mambaout_femto", "--checkpoint", femto4, "--data", image_root,
                       "--batch-size", 5)
    reference, per_image = timm_reference(femto4, image_root / "val", 4)
    assert (result["img_size"], result["crop_pct"], result["interpolation"]) == (224, 1.0, "bicubic")
    assert result["pipeline"] == "timm"  # the schema's default: released weights evaluated as timm did
    assert_same_totals(result, reference)
    assert_same_predictions(rows, per_image)
    assert 0 < result["top1"] < 100  # the predictions differ between images: a real comparison
    assert result["params"] == sum(t.numel() for t in torch.load(femto4, weights_only=True).values())
    assert result["gmacs"] > 1 and result["img_per_s"] > 0
    assert "published_top1" not in result  # 4 classes: not the released model


def test_training_config_mode(image_root, femto4, tmp_path):
    """--config: model, crop, interpolation and size come from the training config; KEY=VALUE overrides it.
    (The timm pipeline, to compare with timm's transform bit for bit; the shipped configs' tensor pipeline is
    compared with it in tests/test_pipelines.py.)"""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(REPO / "configs" / "mambaout_femto.yaml"),
        "data": {"root": str(image_root), "img_size": 32, "pipeline": "timm"},
        "eval": {"crop_pct": 0.875, "interpolation": "bilinear", "batch_size": 64},
    }))
    result, rows = run(tmp_path, "--config", config, "--checkpoint", femto4, "eval.batch_size=4")
    assert (result["model"], result["img_size"], result["crop_pct"], result["interpolation"]) == (
        "mambaout_femto", 32, 0.875, "bilinear")
    reference, per_image = timm_reference(femto4, image_root / "val", 4, input_size=(3, 32, 32), crop_pct=0.875,
                                          interpolation="bilinear")
    assert_same_totals(result, reference)
    assert_same_predictions(rows, per_image)


def test_img_size_override_changes_the_transform():
    def transform(*flags: str):
        _, [(_, cfg)] = validate_cli.parse_args(["--model", "mambaout_femto", "--checkpoint", "w.pth", "--data", "d",
                                                 *flags])
        return timm_eval_transform(cfg)

    def timm_transform(size: int, crop_pct: float = 1.0):
        return create_transform(input_size=size, crop_pct=crop_pct, interpolation="bicubic")

    image = Image.new("RGB", (400, 300))
    assert transform()(image).shape == (3, 224, 224)
    assert transform("--img-size", "288")(image).shape == (3, 288, 288)
    assert str(transform("--img-size", "288")) == str(timm_transform(288))
    assert str(transform("--img-size", "288", "--crop-pct", "0.9")) == str(timm_transform(288, 0.9))
    assert str(transform()) == str(timm_transform(224))


def test_flat_layout_gives_the_same_result_as_class_folders(tmp_path):
    """The same 7 images as synset folders and as the flat validation folder with its ground-truth file;
    --data may name the dataset root or the split folder itself."""
    synsets = [imagenet_synsets()[i] for i in (0, 417, 999)]
    source = write_image_folder(tmp_path / "source", {"val": 2})
    labels = {f"ILSVRC2012_val_{n:08d}": synsets[n % 3] for n in range(1, 8)}
    folder, flat = tmp_path / "folder", tmp_path / "flat"
    for (image_id, synset), image in zip(labels.items(), sorted((source / "val").rglob("*.png"))):
        for target in (folder / "val" / synset, flat / "val"):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target / f"{image_id}.png")
    (flat / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"{i},{s} 1 2 3 4\n" for i, s in labels.items()))
    weights = random_weights(tmp_path / "femto1000.pth", 1000)

    outcomes = []
    for root in (folder, flat, flat / "val"):
        result, rows = run(tmp_path, "--model", "mambaout_femto", "--checkpoint", weights, "--data", root,
                           "--img-size", 32, "--batch-size", 3)
        outcomes.append((result, sorted((Path(r["image"]).name, r["label"], r["top1"], r["top5"]) for r in rows)))
    (by_folder, folder_rows), (by_flat, flat_rows), (by_split, split_rows) = outcomes
    assert by_split == {**by_flat, "data": by_split["data"], "img_per_s": by_split["img_per_s"]}
    assert split_rows == flat_rows == folder_rows and len(flat_rows) == 7
    assert {label for _, label, _, _ in flat_rows} == set(synsets)
    for key in ("top1", "top5", "count"):
        assert by_folder[key] == by_flat[key]
    # the images come in another order, so the loss is summed in another order
    assert by_folder["loss"] == pytest.approx(by_flat["loss"], rel=1e-6)


@pytest.fixture(scope="module")
def single_process(image_root, femto4, tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), "--model", "mambaout_femto", "--checkpoint", femto4,
               "--data", image_root, "--img-size", 32, "--batch-size", 4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_counts_every_image_once(nproc, image_root, femto4, single_process, tmp_path):
    """21 images over 2 or 3 gloo processes: the single-process counts exactly, each image once."""
    results, predictions = tmp_path / "results.json", tmp_path / "predictions.csv"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "validate.py", *FAST,
               "--model", "mambaout_femto", "--checkpoint", str(femto4), "--data", str(image_root),
               "--img-size", "32", "--batch-size", "4", "--results", str(results), "--predictions", str(predictions)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(results.read_text())
    with open(predictions, newline="") as f:
        rows = list(csv.DictReader(f))
    expected, expected_rows = single_process
    assert result["devices"] == nproc
    assert (result["count"], result["top1"], result["top5"]) == (21, expected["top1"], expected["top5"])
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert [(r["image"], r["label"], r["top1"]) for r in rows] == [
        (r["image"], r["label"], r["top1"]) for r in expected_rows]


# --- checkpoints -------------------------------------------------------------------------------------------------

def test_class_list_from_training_checkpoint_or_run_folder(image_root, femto4, single_process, tmp_path):
    """Classes saved in another order than the sorted folders: the labels follow the saved list."""
    state = torch.load(femto4, weights_only=True)
    sorted_classes = sorted(p.name for p in (image_root / "val").iterdir())
    saved = sorted_classes[::-1]
    rows = [sorted_classes.index(name) for name in saved]
    state = {**state, "head.fc.weight": state["head.fc.weight"][rows], "head.fc.bias": state["head.fc.bias"][rows]}
    torch.save({"model": state, "classes": saved, "train_state": {"step": 3}}, tmp_path / "last.pth")
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    torch.save(state, run_folder / "best.pth")
    (run_folder / "classes.json").write_text(json.dumps(saved))

    expected, expected_rows = single_process
    for weights in (tmp_path / "last.pth", run_folder / "best.pth"):
        result, rows = run(tmp_path, "--model", "mambaout_femto", "--checkpoint", weights, "--data", image_root,
                           "--img-size", 32, "--batch-size", 4)
        assert (result["top1"], result["count"]) == (expected["top1"], expected["count"])
        assert [(r["image"], r["label"], r["top1"]) for r in rows] == [
            (r["image"], r["label"], r["top1"]) for r in expected_rows]


def test_use_ema_evaluates_the_ema_weights(image_root, femto4, single_process, tmp_path):
    other = torch.load(random_weights(tmp_path / "other.pth", 4, seed=1), weights_only=True)
    torch.save({"model": other, "state_dict_ema": torch.load(femto4, weights_only=True)}, tmp_path / "ema.pth")
    common = ["--model", "mambaout_femto", "--checkpoint", tmp_path / "ema.pth", "--data", image_root,
              "--img-size", 32, "--batch-size", 4]
    ema, ema_rows = run(tmp_path, *common, "--use-ema")
    expected, expected_rows = single_process  # femto4, here the EMA weights; the regular ones differ
    assert ema["use_ema"]
    assert [r["top1"] for r in ema_rows] == [r["top1"] for r in expected_rows]
    assert ema["loss"] == pytest.approx(expected["loss"], rel=1e-6)


# --- outputs -----------------------------------------------------------------------------------------------------

def test_results_json_csv_and_predictions(image_root, femto4, single_process, tmp_path, capsys):
    table = tmp_path / "results.csv"
    table.write_text("model,top1,count\nearlier,1.0,3\n")  # rows are appended under the file's own header
    for _ in range(2):
        validate_cli.main([*FAST, "--model", "mambaout_femto", "--checkpoint", str(femto4), "--data",
                           str(image_root), "--img-size", "32", "--batch-size", "8", "--results", str(table)])
    captured = capsys.readouterr()
    assert "validate 100.0% 21/21" in captured.err  # the progress bar's last line
    assert "top-1" in captured.out
    result, predictions = single_process
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[1:] == 2 * [{"model": "mambaout_femto", "top1": repr(result["top1"]), "count": "21"}]
    fresh = tmp_path / "fresh.csv"
    write_results(result, str(fresh))
    with open(fresh, newline="") as f:
        assert list(csv.DictReader(f))[0]["params"] == str(result["params"])

    for key in ("top1", "top5", "loss", "count", "params", "gmacs", "img_per_s", "bad_images_skipped", "versions"):
        assert key in result
    assert list(predictions[0]) == ["image", "label", "top1", "top2", "top3", "top4",
                                    "prob1", "prob2", "prob3", "prob4"]
    assert len(predictions) == 21 == len({r["image"] for r in predictions})
    for row in predictions:
        assert row["label"] == Path(row["image"]).parent.name
        probs = [float(row[f"prob{i}"]) for i in range(1, 5)]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-4)
    assert 100 * sum(r["label"] == r["top1"] for r in predictions) / 21 == pytest.approx(result["top1"])


def test_published_top1_for_released_models():
    assert published_reference("mambaout_femto", 1000, 224, 1.0, "bicubic") == {"published_top1": 78.880,
                                                                                "paper_top1": 78.9}
    assert published_reference("mambaout_base", 1000, 288, 1.0, "bicubic") == {"published_top1": 84.730}
    assert published_reference("mambaout_femto", 4, 224, 1.0, "bicubic") == {}
    assert published_reference("mambaout_femto", 1000, 256, 1.0, "bicubic") == {}
    assert published_reference("mambaout_femto", 1000, 224, 0.875, "bicubic") == {}


def test_bad_image_fails_unless_skipped(image_root, femto4, tmp_path, capsys):
    shutil.copytree(image_root / "val", tmp_path / "data" / "val")
    (tmp_path / "data" / "val" / "dots" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    common = ["--model", "mambaout_femto", "--checkpoint", femto4, "--data", tmp_path / "data",
              "--img-size", 32, "--batch-size", 4]
    line = cli_error(capsys, *common)
    assert "broken.png" in line and "--skip-bad-images" in line

    result, rows = run(tmp_path, *common, "--skip-bad-images")
    assert (result["count"], result["bad_images_skipped"]) == (21, 1)
    assert len(rows) == 21 and not any("broken" in r["image"] for r in rows)


# --- errors ------------------------------------------------------------------------------------------------------

def test_missing_and_empty_folders(femto4, tmp_path, capsys):
    line = cli_error(capsys, "--model", "mambaout_femto", "--checkpoint", femto4, "--data", tmp_path / "nowhere")
    assert "nowhere does not exist" in line
    (tmp_path / "empty").mkdir()
    assert "is empty" in cli_error(capsys, "--model", "mambaout_femto", "--checkpoint", femto4,
                                   "--data", tmp_path / "empty")
    assert "--data" in cli_error(capsys, "--model", "mambaout_femto", "--checkpoint", femto4)


def test_class_count_mismatch(image_root, tmp_path, capsys):
    weights = random_weights(tmp_path / "femto1000.pth", 1000)
    line = cli_error(capsys, "--model", "mambaout_femto", "--checkpoint", weights, "--data", image_root)
    assert "predicts 1000 classes" in line and "has 4" in line


def test_checkpoint_of_another_variant(image_root, tmp_path, capsys):
    weights = random_weights(tmp_path / "kobe.pth", 4, name="mambaout_kobe")
    line = cli_error(capsys, "--model", "mambaout_femto", "--checkpoint", weights, "--data", image_root)
    assert "does not fit mambaout_femto" in line and "looks like mambaout_kobe" in line


def test_pretrained_offline_is_a_clear_error(image_root, tmp_path, monkeypatch, capsys):
    """The release URL points at a refused loopback port: nothing leaves the machine."""
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(published, "RELEASE_URL", "http://127.0.0.1:9/x.pth")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(ValidationError, match=r"could not download http://127\.0\.0\.1:9/x\.pth .*--checkpoint"):
        release_checkpoint("mambaout_femto")
    assert not list((tmp_path / "hub" / "checkpoints").iterdir())  # no partial file left
    with pytest.raises(ValidationError, match="no released weights are known for 'mambaout_small_rw'"):
        release_checkpoint("mambaout_small_rw")
    assert "could not download" in cli_error(capsys, "--model", "mambaout_femto", "--pretrained",
                                             "--data", image_root)


def test_predictions_on_synthetic_data_name_images_by_index(tmp_path, monkeypatch):
    import csv

    import validate
    from mambaout import create_model

    monkeypatch.chdir(tmp_path)
    torch.save(create_model("mambaout_femto", num_classes=10).state_dict(), "weights.pth")
    assert validate.main(["--model", "mambaout_femto", "--checkpoint", "weights.pth", "--img-size", "32",
                          "--workers", "0", "--device", "cpu", "--predictions", "predictions.csv",
                          "data.format=synthetic", "data.synthetic_val_size=6", "data.synthetic_num_classes=10"]) == 0
    with open("predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["image"] for row in rows] == [str(i) for i in range(6)]
    assert all(0.0 <= float(row["prob1"]) <= 1.0 for row in rows)
