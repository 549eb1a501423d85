"""Detection and segmentation fine-tuning (mambaout/downstream): the backbone, the two builders, the datasets'
errors, and the fine-tuning runs on tiny synthetic COCO / ADE20K sets (mambaout.downstream.synthetic).

The runs use a narrow MambaOut (depths 1-1-2-1, dims 16-32-64-96) on 128-160 px images with small heads, so that a
detector learns the shapes in about 60 CPU steps; every run goes through ``finetune``, the code the commands run.
"""
from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from conftest import tiny_overrides
from helpers import REPO, job_env, torchrun
from mambaout.checkpoint import CheckpointError, load_training_checkpoint
from mambaout.cli import USER_ERRORS
from mambaout.config import ConfigError, load_config
from mambaout.data import DatasetFormatError, DatasetNotFoundError, EvalBatchSampler
from mambaout.runtime import create_runtime
from mambaout.trainer import train

EXTRA = "fine-tuning needs the downstream extra: pip install -e '.[dev]'"
pytest.importorskip("pycocotools", reason=EXTRA)
pytest.importorskip("segmentation_models_pytorch", reason=EXTRA)
from mambaout.downstream import MambaOutBackbone, build_maskrcnn, build_upernet  # noqa: E402
from mambaout.downstream.ade20k import ADE20K, IGNORE_INDEX, SegAugment  # noqa: E402
from mambaout.downstream.coco import CocoDetection  # noqa: E402
from mambaout.downstream.detection import DETECTION, evaluate_detection  # noqa: E402
from mambaout.downstream.finetune import finetune, finetune_command  # noqa: E402
from mambaout.downstream.schedule import WarmupSchedule, poly_decay, step_decay  # noqa: E402
from mambaout.downstream.segmentation import SEGMENTATION, segmentation_metrics  # noqa: E402
from mambaout.downstream.synthetic import CATEGORIES, write_ade20k, write_coco  # noqa: E402

NARROW = {"model.name": "mambaout_femto", "model.depths": "[1,1,2,1]", "model.dims": "[16,32,64,96]",
          "model.drop_path_rate": 0.1, "data.num_workers": 0, "train.channels_last": "false", "runtime.device": "cpu",
          "train.log_interval": 1}
# 31 training images with shapes (+1 without): global batch 4 -> 7 steps an epoch; lr 2e-3 after 20 warm-up steps.
DETECTION_RUN = {**NARROW, "model.num_classes": 2, "model.fpn_channels": 32, "model.box_head_width": 128,
                 "model.mask_head_channels": 32, "model.rpn_proposals": "[50,50]", "model.rois_per_image": 32,
                 "data.short_side": 128, "data.max_size": 160, "optim.global_batch_size": 4, "optim.lr": 2e-3,
                 "sched.epochs": 12, "sched.milestones": "[10,11]", "sched.warmup_steps": 20,
                 "train.micro_batch_size": 2, "eval.every_epochs": 100}
SEGMENTATION_RUN = {**NARROW, "model.num_classes": 3, "model.decoder_channels": 32, "data.scale": "[160,128]",
                    "data.ratio_range": "[0.75,1.25]", "data.crop_size": 128, "optim.global_batch_size": 4,
                    "optim.lr": 2e-3, "sched.total_steps": 60, "sched.warmup_steps": 10, "train.micro_batch_size": 2,
                    "eval.every_steps": 1000}


def overrides(settings: dict, **extra) -> list[str]:
    return [f"{key}={value}" for key, value in {**settings, **extra}.items()]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, "train2017", 32, seed=1, empty=1)
    write_coco(root, "val2017", 12, seed=2)
    return root


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ade")
    write_ade20k(root, "training", 24, seed=3)
    write_ade20k(root, "validation", 8, seed=4)
    return root


def detection_cfg(coco_root: Path, out: Path, **extra):
    return load_config(None, overrides(DETECTION_RUN, **{"data.root": coco_root, "train.output_dir": out, **extra}),
                       DETECTION.schema)


def segmentation_cfg(ade_root: Path, out: Path, **extra):
    return load_config(None, overrides(SEGMENTATION_RUN, **{"data.root": ade_root, "train.output_dir": out, **extra}),
                       SEGMENTATION.schema)


# --- the backbone ------------------------------------------------------------------------------------------------

def test_backbone_maps_are_timms_features_only_maps_then_normalised():
    torch.manual_seed(0)
    backbone = MambaOutBackbone("mambaout_femto").eval()
    for norm in backbone.norms:  # non-trivial affine parameters, so the norms are seen at work
        torch.nn.init.normal_(norm.weight, 1, 0.2), torch.nn.init.normal_(norm.bias, 0, 0.2)
    reference = timm.create_model("mambaout_femto", pretrained=False, features_only=True, feature_cls="getter")
    reference.model.load_state_dict(backbone.body.state_dict(), strict=False)  # timm's has a head we lack
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ours, theirs = backbone(images), reference.eval()(images)
        raw = backbone.body.forward_intermediates(images, intermediates_only=True)
    assert backbone.strides == [4, 8, 16, 32] and backbone.out_channels == [48, 96, 192, 288]
    for x, y, r, norm, stride, channels in zip(ours, theirs, raw, backbone.norms, backbone.strides,
                                               backbone.out_channels):
        assert x.shape == y.shape == (2, channels, 96 // stride, 128 // stride)  # NCHW
        # before the added norms: timm's maps (to float rounding: our block computes its GEMMs in slices)
        torch.testing.assert_close(r, y, rtol=1e-5, atol=1e-5)
        expected = torch.nn.functional.layer_norm(r.permute(0, 2, 3, 1), (channels,), norm.weight, norm.bias, 1e-6)
        torch.testing.assert_close(x, expected.permute(0, 3, 1, 2), rtol=0, atol=1e-6)


def test_the_ssm_twin_is_a_backbone_too():
    backbone = MambaOutBackbone("mambaout_femto_ssm", depths=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(x.shape) for x in maps] == [(1, 48, 16, 16), (1, 96, 8, 8), (1, 192, 4, 4), (1, 288, 2, 2)]
    with pytest.raises(ValueError, match="must be a MambaOut variant"):
        MambaOutBackbone("resnet18")


@pytest.fixture(scope="module")
def train_py_checkpoint(image_root, tmp_path_factory) -> Path:
    """last.pth of a one-step train.py run of MambaOut-Femto (32 px images)."""
    out = tmp_path_factory.mktemp("imagenet_run")
    train(load_config(None, tiny_overrides(image_root, out, **{"train.max_steps": 1})))
    return out / "last.pth"


def test_a_train_py_checkpoint_gives_the_backbone_its_weights(train_py_checkpoint):
    trained = load_training_checkpoint(train_py_checkpoint)["model"]
    backbone_keys = [key for key in trained if not key.startswith("head.")]
    detector = build_maskrcnn("mambaout_femto", 2, train_py_checkpoint)
    segmenter = build_upernet("mambaout_femto", 3, train_py_checkpoint)
    for model in (detector.backbone.backbone, segmenter.backbone):
        body = model.body.state_dict()
        assert sorted(body) == sorted(backbone_keys)
        assert all(torch.equal(body[key], trained[key]) for key in backbone_keys)
    fresh = build_maskrcnn("mambaout_femto", 2).backbone.backbone.body.state_dict()
    assert not torch.equal(fresh["stem.conv1.weight"], trained["stem.conv1.weight"])


def test_a_checkpoint_of_another_variant_is_refused_naming_the_variant_it_looks_like(train_py_checkpoint):
    with pytest.raises(CheckpointError, match="it looks like mambaout_femto .*Create the model as mambaout_femto"):
        MambaOutBackbone("mambaout_kobe", train_py_checkpoint)


# --- fine-tuning runs --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_detector(coco_root, tmp_path_factory) -> tuple[Path, dict]:
    """The run folder of a 60-step detection fine-tune, and its final metrics."""
    out = tmp_path_factory.mktemp("detection") / "run"
    outcome = finetune(detection_cfg(coco_root, out, **{"train.max_steps": 60}), DETECTION)
    assert outcome.step == 60
    return out, outcome.final_eval


def test_detection_fine_tune_finds_the_shapes(trained_detector):
    out, metrics = trained_detector
    assert metrics["bbox_AP50"] >= 50 and metrics["segm_AP50"] >= 50, metrics
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,lr,train_loss,bbox_AP,bbox_AP50") and len(rows) == 2
    assert float(rows[1].split(",")[5]) == metrics["bbox_AP50"]
    assert {"config.yaml", "manifest.json", "steps.csv", "last.pth", "best.pth", "tensorboard"} <= {
        path.name for path in out.iterdir()}


def test_segmentation_fine_tune_segments_the_shapes(ade_root, tmp_path):
    outcome = finetune(segmentation_cfg(ade_root, tmp_path / "seg"), SEGMENTATION)
    assert outcome.step == 60 and outcome.final_eval["mIoU"] >= 60 and outcome.final_eval["aAcc"] >= 80, \
        outcome.final_eval


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_a_resumed_fine_tune_is_bit_exact(task, coco_root, ade_root, tmp_path, caplog):
    """Stopped after 2 of 4 steps (2 micro-batches each: accumulation, drop path, the detector's samplers or the
    decoder's dropout and BatchNorm), then rerun: every weight, buffer and optimizer tensor as uninterrupted."""
    def run(out: Path, steps: int) -> None:
        settings = {"train.max_steps": steps, "optim.global_batch_size": 4, "train.micro_batch_size": 2}
        cfg = (detection_cfg(coco_root, out, **settings) if task == "detection"
               else segmentation_cfg(ade_root, out, **settings))
        finetune(cfg, DETECTION if task == "detection" else SEGMENTATION)

    run(tmp_path / "whole", 4)
    run(tmp_path / "stopped", 2)
    caplog.set_level(logging.INFO, logger="mambaout")
    run(tmp_path / "stopped", 4)
    assert f"resuming {tmp_path / 'stopped'} at optimizer step 2" in caplog.text
    a, b = (load_training_checkpoint(tmp_path / name / "last.pth") for name in ("whole", "stopped"))
    assert a["train_state"]["step"] == b["train_state"]["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items(), strict=True):
        assert ka == kb and all(torch.equal(va[name], vb[name]) for name in va)
    losses = [(tmp_path / name / "steps.csv").read_text().splitlines() for name in ("whole", "stopped")]
    assert [row.split(",")[3] for row in losses[0]] == [row.split(",")[3] for row in losses[1]]  # the loss column


def test_one_and_two_processes_fine_tune_the_same_detector_and_evaluate_it_exactly(coco_root, trained_detector,
                                                                                     tmp_path):
    """The trained detector continued for 2 steps of 2 micro-batches of 2 images, on 1 process (2 accumulation
    steps) and on 2 (torchrun, gloo): the same losses and weights up to float summation order (1e-5). A micro-batch
    is the unit: its padding, its samplers' draws (seeded per micro-batch) and its loss normalisation are the same
    on both. The 2-process evaluation (each process its images, COCOeval on the gathered results) equals a
    single-process evaluation of the same weights to the last digit."""
    start, settings = str(trained_detector[0] / "last.pth"), {"train.max_steps": 62}
    finetune(detection_cfg(coco_root, tmp_path / "one", **settings), DETECTION, resume=start)
    command = torchrun(2, "scripts/finetune_detection.py", "--resume", start,
                       *overrides(DETECTION_RUN, **settings, **{"data.root": coco_root,
                                                                 "train.output_dir": tmp_path / "two"}))
    done = subprocess.run(command, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "x 2 shards x 1 accumulation steps" in done.stderr
    one, two = (load_training_checkpoint(tmp_path / name / "last.pth") for name in ("one", "two"))
    assert one["train_state"]["step"] == two["train_state"]["step"] == 62
    for key in one["model"]:
        torch.testing.assert_close(one["model"][key], two["model"][key], rtol=0, atol=1e-5, msg=key)
    rows = [[row.split(",") for row in (tmp_path / name / "steps.csv").read_text().splitlines()[1:]]
            for name in ("one", "two")]
    assert [int(r[0]) for r in rows[1]] == [61, 62]
    assert [float(r[3]) for r in rows[0]] == pytest.approx([float(r[3]) for r in rows[1]], rel=1e-5)

    cfg = detection_cfg(coco_root, tmp_path / "unused")
    model = DETECTION.build_model(cfg, None)
    model.load_state_dict(two["model"])
    _, val_set = DETECTION.build_datasets(cfg)
    loader = DataLoader(val_set, batch_sampler=EvalBatchSampler(len(val_set), 1, 1, 0), collate_fn=val_set.collate)
    alone = evaluate_detection(model, loader, create_runtime("cpu"), val_set)
    with open(tmp_path / "two" / "metrics.csv") as f:
        logged = next(csv.DictReader(f))
    assert alone["bbox_AP50"] >= 50
    assert {key: float(logged[key]) if logged[key] else None for key in alone} == alone


# --- clear errors ------------------------------------------------------------------------------------------------

def test_a_missing_annotation_file_ends_the_command_in_one_line(coco_root, tmp_path):
    command = [sys.executable, "scripts/finetune_detection.py",
               *overrides(DETECTION_RUN, **{"data.root": coco_root, "train.output_dir": tmp_path / "run",
                                            "data.train_annotations": "annotations/missing.json"})]
    done = subprocess.run(command, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"finetune_detection.py: error: {coco_root}/annotations/missing.json: no such annotation file; data.root "
        "and the annotation paths must point at a COCO-format instances JSON (e.g. "
        "annotations/instances_train2017.json)")
    assert not (tmp_path / "run").exists()


def test_categories_that_do_not_match_are_refused(coco_root, tmp_path):
    annotations = coco_root / "annotations" / "instances_train2017.json"
    with pytest.raises(ConfigError, match=r"model.num_classes=5 but .* has 2 categories; set model.num_classes=2"):
        CocoDetection(coco_root / "train2017", annotations, num_classes=5, train=True)
    doc = json.loads(annotations.read_text())
    doc["annotations"][0]["category_id"] = 42
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(doc))
    with pytest.raises(DatasetFormatError, match=r"1 annotations have category ids 42 that are not among its "
                                                 r"categories \(3, 7\)"):
        CocoDetection(coco_root / "train2017", broken, num_classes=2, train=True)
    val_doc = {**doc, "categories": [CATEGORIES[0], {"id": 7, "name": "ball"}], "annotations": []}
    (tmp_path / "val.json").write_text(json.dumps(val_doc))
    with pytest.raises(DatasetFormatError, match="list different categories"):
        finetune_command(DETECTION, "finetune_detection.py", "", overrides(
            DETECTION_RUN, **{"data.root": coco_root, "data.val_annotations": tmp_path / "val.json",
                              "data.val_images": coco_root / "train2017", "train.output_dir": tmp_path / "x"}))


def test_images_without_instances_are_skipped_for_training_and_refused_when_none_has_one(coco_root, tmp_path,
                                                                                            caplog):
    annotations = coco_root / "annotations" / "instances_train2017.json"
    train_set = CocoDetection(coco_root / "train2017", annotations, num_classes=2, train=True)
    eval_set = CocoDetection(coco_root / "train2017", annotations, num_classes=2, train=False)
    assert (len(train_set), len(eval_set)) == (31, 32)
    assert ("1 of 32 images have no instance to train on and are skipped for training, like mmdetection and "
            "torchvision's references do (train2017_0031.png)") in caplog.text
    doc = json.loads(annotations.read_text())
    (tmp_path / "empty.json").write_text(json.dumps({**doc, "annotations": []}))
    with pytest.raises(DatasetFormatError, match="none of its 32 images has an instance to train on"):
        CocoDetection(coco_root / "train2017", tmp_path / "empty.json", num_classes=2, train=True)


def test_missing_images_and_ade20k_annotations_are_named(coco_root, ade_root, tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"32 of the 32 images of .* are not in .*val2017 \(train2017_0000"):
        CocoDetection(coco_root / "val2017", coco_root / "annotations" / "instances_train2017.json", num_classes=2,
                      train=False)
    root = write_ade20k(tmp_path / "ade", "training", 3, seed=5)
    (root / "annotations" / "training" / "ADE_training_0001.png").unlink()
    with pytest.raises(DatasetFormatError, match=r"1 of the 3 images in .* have no annotation in .* "
                                                 r"\(ADE_training_0001.png\)"):
        ADE20K(root, "training", num_classes=3)
    Image.new("L", (64, 64)).save(root / "annotations" / "training" / "ADE_training_0001.png")
    with pytest.raises(DatasetFormatError, match=r"1 annotations .* are not the size of their image "
                                                 r"\(ADE_training_0001.png \(64, 64\) vs \(160, 128\)\)"):
        ADE20K(root, "training", num_classes=3)
    with pytest.raises(DatasetNotFoundError, match="data.root must hold images/validation/"):
        ADE20K(root, "validation", num_classes=3)
    assert all(issubclass(error, USER_ERRORS) for error in (ConfigError, DatasetFormatError, DatasetNotFoundError,
                                                             CheckpointError))


def test_settings_the_fine_tuning_runs_cannot_honour_are_refused(ade_root, tmp_path):
    for setting, message in (("train.micro_batch_size=1", "BatchNorm needs at least 2 images"),
                             ("runtime.deterministic=true", "no deterministic CUDA backward"),
                             ("runtime.device=xla", "need eager devices"),
                             ("runtime.peak_tflops=100", "log no MFU")):
        cfg = load_config(None, overrides(SEGMENTATION_RUN, **{"data.root": ade_root}) + [setting],
                          SEGMENTATION.schema)
        with pytest.raises(ConfigError, match=message):
            cfg.derived(1)


# --- recipes, schedules, transforms, metrics ---------------------------------------------------------------------

CONFIGS = REPO / "configs" / "downstream"
DROP_PATH = {"tiny": 0.3, "small": 0.4, "base": 0.6}


@pytest.mark.parametrize("variant", sorted(DROP_PATH))
def test_shipped_configs_are_the_papers_recipes(variant):
    det = load_config(CONFIGS / f"maskrcnn_mambaout_{variant}_coco.yaml", schema=DETECTION.schema)
    assert (det.model.name, det.model.drop_path_rate, det.model.num_classes) == (
        f"mambaout_{variant}", DROP_PATH[variant], 80)
    assert (det.data.short_side, det.data.max_size, det.data.hflip) == (800, 1333, 0.5)
    assert (det.optim.global_batch_size, det.optim.lr, det.optim.weight_decay) == (16, 1e-4, 0.05)
    assert (det.sched.epochs, det.sched.milestones, det.sched.gamma, det.sched.warmup_steps) == (12, (8, 11), 0.1, 500)
    assert (det.train.precision, det.eval.every_epochs, det.derived(8).accum_steps) == ("fp16", 1, 1)
    seg = load_config(CONFIGS / f"upernet_mambaout_{variant}_ade20k.yaml", schema=SEGMENTATION.schema)
    assert (seg.model.name, seg.model.drop_path_rate, seg.model.num_classes, seg.model.aux_weight) == (
        f"mambaout_{variant}", DROP_PATH[variant], 150, 0.4)
    assert (seg.data.crop_size, seg.data.scale, seg.data.ratio_range, seg.data.cat_max_ratio) == (
        512, (2048, 512), (0.5, 2.0), 0.75)
    assert (seg.optim.global_batch_size, seg.optim.lr, seg.optim.weight_decay) == (16, 1e-4, 0.01)
    assert (seg.sched.total_steps, seg.sched.warmup_steps, seg.sched.power, seg.sched.min_lr) == (160000, 1500, 1.0, 0)
    assert (seg.train.precision, seg.eval.every_steps, seg.derived(8).accum_steps) == ("fp16", 16000, 1)


def test_the_segmentation_command_prints_its_resolved_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune_command(SEGMENTATION, "finetune_segmentation.py", "", [
            "--config", str(CONFIGS / "upernet_mambaout_small_ade20k.yaml"), "--print-config",
            "train.micro_batch_size=4"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert exit_info.value.code == 0 and printed["model"]["name"] == "mambaout_small"
    assert printed["derived"] == {"lr": 1e-4, "micro_batch_size": 4, "num_shards": 1, "accum_steps": 4,
                                  "output_dir": "runs/segmentation_mambaout_small"}


def test_schedules_follow_mmcv():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1)
    steps = WarmupSchedule(optimizer, 1e-4, warmup_steps=500, warmup_ratio=0.001, decay=step_decay([800, 1100], 0.1))
    assert steps.lr_at(0) == pytest.approx(1e-7)
    assert steps.lr_at(250) == pytest.approx(1e-4 * (1 - 0.999 * 0.5))
    assert [steps.lr_at(s) for s in (500, 799, 800, 1099, 1100)] == pytest.approx([1e-4, 1e-4, 1e-5, 1e-5, 1e-6])
    poly = WarmupSchedule(optimizer, 1e-4, warmup_steps=1500, warmup_ratio=1e-6, decay=poly_decay(160000, 1.0, 0))
    assert [poly.lr_at(s) for s in (1500, 80000, 160000)] == pytest.approx([1e-4 * (1 - 1500 / 160000), 5e-5, 0])
    poly.set_step(80000)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-5)


def test_segmentation_samples_are_keyed_cropped_padded_and_labelled(ade_root):
    augment = SegAugment(crop_size=144, scale=(160, 128), ratio_range=(0.75, 1.0))
    dataset = ADE20K(ade_root, "training", num_classes=3, augment=augment)
    first, again, other = dataset[(1, 11)], dataset[(1, 11)], dataset[(1, 12)]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert not torch.equal(first["image"], other["image"])
    assert first["image"].shape == (3, 144, 144) and first["label"].shape == (144, 144)
    values = set(first["label"].unique().tolist())
    assert values <= {0, 1, 2, IGNORE_INDEX} and IGNORE_INDEX in values  # the frame (0) and the padding
    evaluation = ADE20K(ade_root, "validation", num_classes=3, test_scale=(320, 256))[1]  # a 160x128 image
    assert evaluation["image"].shape == (3, 256, 320) and evaluation["label"].shape == (128, 160)


def test_upernet_gives_logits_at_the_input_size_with_the_backbones_norms_only():
    model = build_upernet("mambaout_femto", 5, decoder_channels=32, backbone_options={"depths": (1, 1, 1, 1)})
    assert all(isinstance(norm, torch.nn.Identity) for norm in model.decoder.feature_norms)
    outputs = model.train()(torch.randn(2, 3, 100, 72))
    assert outputs["out"].shape == outputs["aux"].shape == (2, 5, 100, 72)
    assert set(model.eval()(torch.randn(1, 3, 100, 72))) == {"out"}


def test_segmentation_metrics_from_a_confusion_matrix():
    confusion = torch.tensor([[8, 2, 0], [1, 3, 0], [0, 0, 0]])  # rows: true class; class 2 never occurs
    metrics = segmentation_metrics(confusion)
    assert metrics["aAcc"] == pytest.approx(100 * 11 / 14)
    assert metrics["mIoU"] == pytest.approx(100 * (8 / 11 + 3 / 6) / 2)
    assert metrics["mAcc"] == pytest.approx(100 * (8 / 10 + 3 / 4) / 2)
