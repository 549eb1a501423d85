"""Mask R-CNN with a MambaOut backbone (the paper's COCO setup): torchvision's detector over an FPN of the
normalised stage maps, its training loss, and box and mask AP with COCOeval.

What is not invariant to the process count or the accumulation split, and why: torchvision pads the images of
a micro-batch to the largest one (the padding reaches the features near the border through the backbone's
norms), and its RPN and RoI samplers draw per image in turn and normalise the losses over the micro-batch. So a
micro-batch is the unit: the same micro-batches (fixed ``train.micro_batch_size``) give the same run on 1 or N
processes, the draws being seeded per micro-batch (``finetune.seed_draws``); another micro-batch size is
another run. Evaluation runs one image per forward, so its result is exact on any process count.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..config import ConfigError
from ..engine import MicroBatchLoss
from ..runtime import Runtime
from ..trainer import RunPlan
from .backbone import MambaOutBackbone
from .coco import COCO_METRICS, IOU_TYPES, CocoDetection, check_same_categories, coco_metrics
from .config import DetectionConfig, backbone_overrides
from .finetune import Task, seed_draws
from .schedule import WarmupSchedule, step_decay

ROI_SIZE = 7  # the box head's RoIAlign output (torchvision's and mmdetection's)


class PyramidBackbone(nn.Module):
    """The MambaOut stage maps through an FPN (P2-P5, and P6 max-pooled from P5): the ``OrderedDict`` of NCHW
    maps torchvision's detectors take, all with ``out_channels`` channels."""

    def __init__(self, backbone: MambaOutBackbone, out_channels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fpn = FeaturePyramidNetwork(backbone.out_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(level), x) for level, x in enumerate(self.backbone(images))))


def build_maskrcnn(model_name: str, num_classes: int, checkpoint: str | os.PathLike | None = None, *,
                   backbone_options: dict[str, Any] | None = None, fpn_channels: int = 256,
                   box_head_width: int = 1024, mask_head_channels: int = 256, **options) -> MaskRCNN:
    """torchvision's Mask R-CNN over a MambaOut backbone (``MambaOutBackbone``: stage maps with the added norms)
    and an FPN, with mmdetection's heads by default (a two-layer box MLP of ``box_head_width``, four 3x3 mask
    convs of ``mask_head_channels``).

    Args:
        model_name: the MambaOut variant of the backbone.
        num_classes: object categories (COCO: 80); torchvision's background class is added.
        checkpoint: ImageNet weights of the backbone (any file ``mambaout.create_model`` reads); None: random.
        backbone_options: ``create_model`` overrides of the backbone (``drop_path_rate``, ``depths``, ...).
        options: ``torchvision.models.detection.MaskRCNN`` keywords (``min_size``, ``max_size``,
            ``rpn_post_nms_top_n_train``, ``box_batch_size_per_image``, ...).
    """
    backbone = MambaOutBackbone(model_name, checkpoint, **(backbone_options or {}))
    classes = num_classes + 1
    return MaskRCNN(
        PyramidBackbone(backbone, fpn_channels), num_classes=None,
        box_head=TwoMLPHead(fpn_channels * ROI_SIZE ** 2, box_head_width),
        box_predictor=FastRCNNPredictor(box_head_width, classes),
        mask_head=MaskRCNNHeads(fpn_channels, (mask_head_channels,) * 4, dilation=1),
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, classes),
        **options)


def detector_from_config(cfg: DetectionConfig, checkpoint: str | None) -> MaskRCNN:
    m = cfg.model
    train_proposals, test_proposals = m.rpn_proposals
    try:
        return build_maskrcnn(
            m.name, m.num_classes, checkpoint, backbone_options=backbone_overrides(m), fpn_channels=m.fpn_channels,
            box_head_width=m.box_head_width, mask_head_channels=m.mask_head_channels,
            min_size=cfg.data.short_side, max_size=cfg.data.max_size, rpn_post_nms_top_n_train=train_proposals,
            rpn_post_nms_top_n_test=test_proposals, box_batch_size_per_image=m.rois_per_image)
    except ValueError as error:  # not a MambaOut variant
        raise ConfigError(f"model.name: {error}") from None


def detection_loss(seed: int, runtime: Runtime) -> MicroBatchLoss:
    """The sum of Mask R-CNN's five losses (RPN objectness and box, RoI class, box and mask) of a micro-batch,
    its random draws seeded by (step, micro-batch). Images travel as uint8 and become [0, 1] floats on the
    device; the detector resizes and normalises them."""
    def loss(model: nn.Module, batch: dict[str, Any], step: int, micro_ids: list[int]) -> torch.Tensor:
        seed_draws(seed, step, micro_ids)
        images = [runtime.to_device(image).float().div_(255) for image in batch["image"]]
        targets = [{key: runtime.to_device(value) for key, value in target.items()} for target in batch["target"]]
        with runtime.autocast():
            losses = model(images, targets)
        return sum(losses.values())
    return loss


@torch.no_grad()
def evaluate_detection(model: nn.Module, loader, runtime: Runtime, dataset: CocoDetection
                       ) -> dict[str, float | None]:
    """Box and mask AP over the evaluation set: each process detects its images, the COCO results of all
    processes are gathered, and COCOeval scores them once, on the main process."""
    model.eval()
    results: list[dict[str, Any]] = []
    for batch in loader:
        images = [runtime.to_device(image).float().div_(255) for image in batch["image"]]
        with runtime.autocast():
            outputs = model(images)
        for image_id, output in zip(batch["image_id"], outputs):
            host = {key: value.float().cpu() if value.is_floating_point() else value.cpu()
                    for key, value in output.items()}
            results += dataset.to_results(image_id, host)
    results = [entry for part in runtime.gather_objects(results) for entry in part]
    metrics = coco_metrics(dataset.coco, results) if runtime.is_main else None
    return runtime.gather_objects(metrics)[0]


def _datasets(cfg: DetectionConfig) -> tuple[CocoDetection, CocoDetection]:
    data = cfg.data
    if data.root is None:
        raise ConfigError("data.root is not set: pass data.root=DIR, the folder of the COCO-format dataset")
    root = os.path.expanduser(data.root)
    train = CocoDetection(os.path.join(root, data.train_images), os.path.join(root, data.train_annotations),
                          num_classes=cfg.model.num_classes, train=True, hflip=data.hflip)
    val = CocoDetection(os.path.join(root, data.val_images), os.path.join(root, data.val_annotations),
                        num_classes=cfg.model.num_classes, train=False)
    check_same_categories(train, val)
    return train, val


def _schedule(cfg: DetectionConfig, optimizer, lr: float, steps_per_epoch: int) -> WarmupSchedule:
    s = cfg.sched
    milestones = [epoch * steps_per_epoch for epoch in s.milestones]
    return WarmupSchedule(optimizer, lr, warmup_steps=s.warmup_steps, warmup_ratio=s.warmup_ratio,
                          decay=step_decay(milestones, s.gamma))


def _plan(cfg: DetectionConfig, steps_per_epoch: int) -> RunPlan:
    total = cfg.sched.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    return RunPlan(steps_per_epoch, total, eval_every_epochs=cfg.eval.every_epochs,
                   checkpoint_every_steps=cfg.train.checkpoint_every_steps)


def _input_pipeline(cfg: DetectionConfig) -> dict[str, Any]:
    return {"train": f"flip {cfg.data.hflip}; in the detector: resize to short side {cfg.data.short_side}, long "
                     f"side <= {cfg.data.max_size}, ImageNet normalisation, padding to a multiple of 32",
            "eval": "in the detector: the same resize and normalisation, results mapped back to the image"}


DETECTION = Task(
    name="detection", schema=DetectionConfig,
    metrics=tuple(f"{iou_type}_{name}" for iou_type in IOU_TYPES for name in COCO_METRICS), score="bbox_AP",
    build_datasets=_datasets, build_model=detector_from_config,
    micro_loss=lambda cfg, runtime: detection_loss(cfg.train.seed, runtime),
    evaluate=evaluate_detection, schedule=_schedule, plan=_plan, input_pipeline=_input_pipeline)
