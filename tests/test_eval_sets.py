"""validate.py on ImageNet's evaluation variants: ReaL labels, the 200-class subsets of ImageNet-A/-R, ImageNet-V2's
class-index folders, and several models in one call. Random 1000-class femto weights, 32 px images; each figure is
checked against a computation by hand."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform

from mambaout.data import imagenet_synsets
from mambaout.eval_sets import subset_classes
from test_validate import cli_error, random_weights, run, validate_cli

SIZE = ["--img-size", "32"]
A_SYNSETS = [imagenet_synsets()[i] for i in subset_classes("a")]


def write_images(folder: Path, names: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)


@pytest.fixture(scope="module")
def femto1k(tmp_path_factory) -> Path:
    return random_weights(tmp_path_factory.mktemp("weights") / "femto1k.pth", 1000)


@pytest.fixture(scope="module")
def imagenet_val(tmp_path_factory) -> Path:
    """12 validation images named as ImageNet's, in 3 synset folders."""
    root = tmp_path_factory.mktemp("imagenet") / "val"
    for folder, numbers in zip(A_SYNSETS[:3], ((1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12))):
        write_images(root / folder, [f"ILSVRC2012_val_{n:08d}.png" for n in numbers], seed=numbers[0])
    return root


def predicted(rows: list[dict]) -> dict[int, list[int]]:
    """Image number -> its top-5 class indices, from a --predictions file."""
    index = {synset: i for i, synset in enumerate(imagenet_synsets())}
    return {int(row["image"].split("_")[-1].split(".")[0]): [index[row[f"top{k}"]] for k in range(1, 6)]
            for row in rows}


def test_real_labels_count_a_prediction_in_the_images_set_and_leave_empty_sets_out(femto1k, imagenet_val,
                                                                                   tmp_path):
    args = ["--model", "mambaout_femto", "--checkpoint", femto1k, "--data", imagenet_val, *SIZE]
    _, rows = run(tmp_path, *args)
    top5 = predicted(rows)
    # by construction: 1-4 several labels with the top-1 among them; 5-6 no real label (left out); 7-8 only the
    # 3rd guess (a top-5 hit); 9-12 a class no guess names
    real = [[] for _ in range(12)]
    unused = next(c for c in range(1000) if all(c not in guesses for guesses in top5.values()))
    for number, guesses in top5.items():
        real[number - 1] = ([guesses[0], unused] if number <= 4 else [] if number <= 6 else
                            [guesses[2]] if number <= 8 else [unused])
    real_file = tmp_path / "real.json"
    real_file.write_text(json.dumps(real + [[1], [2]]))  # the file covers more images than the folder holds
    result, _ = run(tmp_path, *args, "--real-labels", real_file)
    assert result["real_count"] == 10
    assert result["real_top1"] == pytest.approx(100 * 4 / 10)
    assert result["real_top5"] == pytest.approx(100 * 6 / 10)
    assert result["eval_set"] == "imagenet-real" and result["count"] == 12  # the 1k figures stay beside them


def masked_top1(weights: Path, folder: Path, classes: list[int]) -> tuple[float, float]:
    """top-1/top-5 of the logits restricted to ``classes``, by hand: timm's model and transform, -inf elsewhere."""
    model = timm.create_model("mambaout_femto", pretrained=False, num_classes=1000)
    model.load_state_dict(torch.load(weights, weights_only=True))
    transform = create_transform(input_size=32, crop_pct=1.0, interpolation="bicubic")
    index = {synset: i for i, synset in enumerate(imagenet_synsets())}
    outside = torch.ones(1000, dtype=torch.bool)
    outside[classes] = False
    hits1 = hits5 = count = 0
    with torch.no_grad():
        for image in sorted(folder.rglob("*.png")):
            logits = model.eval()(transform(Image.open(image).convert("RGB"))[None])[0]
            top = logits.masked_fill(outside, float("-inf")).topk(5).indices.tolist()
            target = index[image.parent.name]
            hits1, hits5, count = hits1 + (top[0] == target), hits5 + (target in top), count + 1
    return 100 * hits1 / count, 100 * hits5 / count


def test_class_subsets_equal_masking_the_logits_by_hand(femto1k, imagenet_val, tmp_path):
    by_hand = masked_top1(femto1k, imagenet_val, subset_classes("a"))
    args = ["--model", "mambaout_femto", "--checkpoint", femto1k, "--data", imagenet_val, *SIZE]
    subset, _ = run(tmp_path, *args, "--class-subset", "a")
    assert (subset["top1"], subset["top5"]) == pytest.approx(by_hand)
    assert subset["eval_set"] == "imagenet-a" and subset["class_subset"] == "a"
    plain, _ = run(tmp_path, *args)
    assert plain["top1"] <= subset["top1"]  # 800 fewer classes to confuse
    # a file of the same classes, as synsets and as indices, gives the same numbers
    listed = tmp_path / "subset.txt"
    listed.write_text("\n".join(A_SYNSETS[:100] + [str(i) for i in subset_classes("a")[100:]]) + "\n")
    from_file, _ = run(tmp_path, *args, "--class-subset", listed, "--eval-set", "my-subset")
    assert (from_file["top1"], from_file["top5"], from_file["eval_set"]) == (subset["top1"], subset["top5"],
                                                                              "my-subset")
    assert len(subset_classes("r")) == 200 and subset_classes("r") != subset_classes("a")


def test_imagenet_v2_folders_are_class_indices(femto1k, tmp_path):
    root = tmp_path / "imagenetv2-matched-frequency-format-val"
    for index in range(1000):
        (root / str(index)).mkdir(parents=True)
    for index in (3, 10, 999):
        write_images(root / str(index), ["a.jpeg", "b.jpeg"], seed=index)
    result, rows = run(tmp_path, "--model", "mambaout_femto", "--checkpoint", femto1k, "--data", root, *SIZE)
    assert result["count"] == 6 and result["eval_set"] == "imagenetv2-matched-frequency-format-val"
    synsets = imagenet_synsets()
    assert sorted(row["label"] for row in rows) == sorted([synsets[3]] * 2 + [synsets[10]] * 2 + [synsets[999]] * 2)
    for row in rows:
        assert row["label"] == synsets[int(row["image"].split("/")[0])]


def test_several_models_in_one_call_give_one_table(femto1k, imagenet_val, tmp_path, capsys):
    other = random_weights(tmp_path / "other.pth", 1000, seed=1)
    results = tmp_path / "all.json"
    assert validate_cli.main(["--workers", "0", "--device", "cpu", "--model", "mambaout_femto", "mambaout_femto",
                              "--checkpoint", str(femto1k), str(other), "--data", str(imagenet_val), *SIZE,
                              "--results", str(results), "eval.batch_size=5"]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = [line for line in table if line.startswith("| mambaout_femto |")]
    summaries = json.loads(results.read_text())
    assert [s["checkpoint"] for s in summaries] == [str(femto1k), str(other)]
    assert len(rows) == 2 and all(f"{s['top1']:.3f}" in row for s, row in zip(summaries, rows))
    alone, _ = run(tmp_path, "--model", "mambaout_femto", "--checkpoint", other, "--data", imagenet_val, *SIZE)
    assert summaries[1]["top1"] == alone["top1"] and summaries[1]["loss"] == pytest.approx(alone["loss"])


def test_bad_subset_and_real_label_inputs_name_the_problem(femto1k, imagenet_val, tmp_path, capsys):
    base = ["--model", "mambaout_femto", "--checkpoint", str(femto1k), "--data", str(imagenet_val), *SIZE]
    bad = tmp_path / "bad.txt"
    bad.write_text("n01498041\nnot_a_class\n")
    assert "'not_a_class' is neither an ImageNet-1k synset nor a class index" in cli_error(
        capsys, *base, "--class-subset", str(bad))
    assert "--class-subset q: expected 'a', 'r' or a file" in cli_error(capsys, *base, "--class-subset", "q")
    broken = tmp_path / "real.json"
    broken.write_text("{}")
    assert "expected a JSON list" in cli_error(capsys, *base, "--real-labels", str(broken))
    assert "one --checkpoint per --model" in cli_error(capsys, "--model", "mambaout_femto", "mambaout_femto",
                                                       "--checkpoint", str(femto1k), "--data", str(imagenet_val))
