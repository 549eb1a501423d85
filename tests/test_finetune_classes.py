"""Fine-tuning on your own classes (configs/finetune/your_classes.yaml, README "Fine-tuning on your own classes"):
a checkpoint of the quickstart's recipe fine-tuned on 3 of the digits' classes, linear probing with
model.freeze=backbone, and optim.layer_decay's per-parameter learning rates.

The pre-trained checkpoint is the quickstart's run cut to 4 of its 15 epochs (93% top-1 on the 10 digits, ~40 s
here), made once for the module; the fine-tuning runs are `python train.py` jobs as a user starts them.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, read_csv, run_job
from mambaout.checkpoint import load_training_checkpoint
from mambaout.config import ConfigError, load_config
from mambaout.models import create_model
from mambaout.optim import LrSchedule, create_optimizer

CLASSES = ("3", "5", "8")  # the three digits most alike in 8x8 scans
# The digits' scale (as configs/quickstart_digits.yaml): 32 px, mild crops and RandAugment, no flips; 2 epochs of
# 7 steps, so a larger lr than the recipe's 30 epochs take.
DIGITS = ["model.name=mambaout_femto", "data.img_size=32", "data.num_workers=0", "optim.global_batch_size=64",
          "train.micro_batch_size=64", "eval.batch_size=100", "sched.epochs=2", "sched.warmup_epochs=0",
          "aug.hflip=0.0", "aug.crop_scale=[0.6,1.0]", "aug.rand_augment=rand-m5-mstd0.5-inc1", "runtime.device=cpu"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """(the quickstart recipe's best.pth after 4 epochs on the 10 digits, a folder of 3 of those classes)."""
    base = tmp_path_factory.mktemp("finetune")
    digits = base / "digits"
    status, output = run_job([sys.executable, "scripts/make_digits_dataset.py", str(digits)], base / "digits.log")
    assert status == 0, output
    status, output = run_job([sys.executable, "train.py", "--config", "configs/quickstart_digits.yaml",
                              f"data.root={digits}", f"train.output_dir={base / 'pre'}", "sched.epochs=4",
                              "data.num_workers=0", "runtime.device=cpu"], base / "pre.log", timeout=600)
    assert status == 0, output[-3000:]
    three = base / "three"
    for split in ("train", "val"):
        for name in CLASSES:
            (three / split).mkdir(parents=True, exist_ok=True)
            (three / split / name).symlink_to(digits / split / name)
    return base / "pre" / "best.pth", three


def finetune(root: Path, out: Path, *overrides: str) -> float:
    """Runs the recipe on ``root``; returns its best top-1."""
    status, output = run_job([sys.executable, "train.py", "--config", "configs/finetune/your_classes.yaml",
                              f"data.root={root}", f"train.output_dir={out}", *DIGITS, *overrides],
                             out.parent / f"{out.name}.log")
    assert status == 0, output[-3000:]
    return max(float(row["top1"]) for row in read_csv(out / "metrics.csv"))


def test_a_checkpoint_fine_tuned_on_3_classes_reaches_95_percent_in_2_epochs(pretrained, tmp_path):
    checkpoint, three = pretrained
    tuned = finetune(three, tmp_path / "tuned", f"model.checkpoint={checkpoint}", "optim.lr=5e-4")
    scratch = finetune(three, tmp_path / "scratch", "optim.lr=5e-4")
    print(f"\n3 digit classes, 2 epochs: {tuned:.2f}% from the checkpoint, {scratch:.2f}% from scratch")
    assert tuned >= 95.0
    assert tuned > scratch  # the checkpoint's features, not the schedule, make it


def test_linear_probing_leaves_every_backbone_tensor_as_it_was(pretrained, tmp_path):
    checkpoint, three = pretrained
    top1 = finetune(three, tmp_path / "probe", f"model.checkpoint={checkpoint}", "model.freeze=backbone",
                    "optim.layer_decay=null", "optim.lr=1e-3")
    start = load_training_checkpoint(checkpoint)["model"]
    end = load_training_checkpoint(tmp_path / "probe" / "last.pth")["model"]
    trained = {"head.fc.weight", "head.fc.bias"}
    assert end["head.fc.weight"].shape == (3, start["head.fc.weight"].shape[1])
    for name, tensor in end.items():
        if name not in trained:
            assert torch.equal(tensor, start[name]), name
    assert top1 >= 95.0


def layer_of(name: str, depths: tuple[int, ...]) -> int:
    """The layer index the formula gives a MambaOut parameter: stem 0, block k (over all stages) k + 1, a stage's
    downsample with its first block, the head after the last block."""
    if name.startswith("stem."):
        return 0
    if name.startswith("head."):
        return sum(depths) + 1
    stage = int(name.split(".")[1])
    first = sum(depths[:stage]) + 1
    return first if ".downsample." in name else first + int(name.split(".")[3])


def test_layer_decay_gives_each_parameter_the_formulas_lr():
    model = create_model("mambaout_femto", num_classes=3)
    depths, layers, lr, decay = (3, 3, 9, 3), 20, 4e-3, 0.75
    optimizer = create_optimizer(model, lr, 0.05, 1e-8, (0.9, 0.999), layer_decay=decay)
    schedule = LrSchedule(optimizer, epochs=10, warmup_epochs=0, warmup_lr=1e-6, min_lr=1e-6, steps_per_epoch=5,
                          per_step=True)
    schedule.set_step(0)  # the peak
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        expected = lr * decay ** (layers - 1 - layer_of(name, depths))
        assert lr_of[id(param)] == pytest.approx(expected, rel=1e-12), name
        assert decay_of[id(param)] == (0.0 if param.ndim <= 1 else 0.05), name
    assert len(lr_of) == len(list(model.parameters()))


def test_without_layer_decay_the_groups_are_todays():
    """optim.layer_decay=null: the two weight-decay groups of before, one lr (the run bit for bit as before)."""
    model = create_model("mambaout_femto", num_classes=3)
    groups = create_optimizer(model, 4e-3, 0.05, 1e-8, (0.9, 0.999)).param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05] and all("lr_scale" not in g for g in groups)


def test_detection_and_segmentation_refuse_layer_decay(tmp_path):
    from mambaout.downstream.detection import DETECTION
    from mambaout.downstream.finetune import finetune as finetune_task

    cfg = load_config(None, ["optim.layer_decay=0.8", f"train.output_dir={tmp_path}"], DETECTION.schema)
    with pytest.raises(ConfigError, match="optim.layer_decay applies to classification"):
        finetune_task(cfg, DETECTION)
    assert not any(tmp_path.iterdir())


def test_the_recipe_resets_the_head_and_decays_by_layer():
    cfg = load_config(REPO / "configs" / "finetune" / "your_classes.yaml")
    assert (cfg.optim.layer_decay, cfg.model.freeze, cfg.aug.mixup_alpha, cfg.aug.cutmix_alpha) == (
        0.8, "none", 0.0, 0.0)
    assert cfg.optim.lr < 1e-3 * cfg.optim.global_batch_size / 1024  # below the from-scratch scaling rule
