"""UperNet with a MambaOut backbone (the paper's ADE20K setup): segmentation_models_pytorch's UperNet decoder over
the normalised stage maps (its own encoders are timm's models, not ours), the recipe's auxiliary FCN head, the
training loss, and mIoU / pixel accuracy from a confusion matrix summed over the processes.

What is not invariant to the process count or the accumulation split, and why: the decoder's BatchNorm
normalises each micro-batch with its own statistics, and under torchrun each process updates its running
statistics from its own micro-batches (DDP then broadcasts rank 0's), so the running statistics, used at test,
follow the split. The weights see the same micro-batches whatever the process count (fixed
``train.micro_batch_size``), dropout and drop path seeded per micro-batch (``finetune.seed_draws``). Evaluation
runs one whole image per forward, with the running statistics: exact on any process count.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import nn
from torchvision.ops import Conv2dNormActivation

from ..config import ConfigError
from ..engine import MicroBatchLoss
from ..runtime import Runtime
from ..trainer import RunPlan
from .ade20k import ADE20K, IGNORE_INDEX, SegAugment
from .backbone import MambaOutBackbone
from .config import SegmentationConfig, backbone_overrides
from .finetune import Task, seed_draws
from .schedule import WarmupSchedule, poly_decay

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUX_STAGE = 2  # the auxiliary head reads stage 3 (stride 16), as mmsegmentation's UperNet configs
AUX_CHANNELS = 256
SEGMENTATION_METRICS = ("mIoU", "mAcc", "aAcc")


class UperNet(nn.Module):
    """[B, 3, H, W] normalised images -> ``{"out": [B, classes, H, W] logits}``, plus ``"aux"`` (the auxiliary
    head's logits, also at the input size) in training when the model has that head.

    The decoder is smp's ``UPerNetDecoder`` (pyramid pooling on stage 4, FPN over stages 1-3, fusion at stride
    4). It normalises the stage maps itself; our backbone already does (the recipe's added LayerNorms), so its
    norms are replaced by identities rather than applied twice.
    """

    def __init__(self, backbone: MambaOutBackbone, num_classes: int, decoder_channels: int = 512,
                 auxiliary_head: bool = True, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        # smp's decoder takes an encoder's maps at strides 1, 2, 4, ..., 32 and uses those from stride 4 on
        self.decoder = UPerNetDecoder(encoder_channels=[0, 0, *backbone.out_channels],
                                      decoder_channels=decoder_channels)
        self.decoder.feature_norms = nn.ModuleList(nn.Identity() for _ in backbone.out_channels)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(decoder_channels, num_classes, 1))
        self.aux_head = nn.Sequential(
            Conv2dNormActivation(backbone.out_channels[AUX_STAGE], AUX_CHANNELS, 3), nn.Dropout2d(dropout),
            nn.Conv2d(AUX_CHANNELS, num_classes, 1)) if auxiliary_head else None

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        size = images.shape[-2:]
        maps = self.backbone(images)
        logits = self.classifier(self.decoder([None, None, *maps]))
        outputs = {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}
        if self.aux_head is not None and self.training:
            aux = self.aux_head(maps[AUX_STAGE])
            outputs["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return outputs


def build_upernet(model_name: str, num_classes: int, checkpoint: str | os.PathLike | None = None, *,
                  backbone_options: dict[str, Any] | None = None, decoder_channels: int = 512,
                  auxiliary_head: bool = True, dropout: float = 0.1) -> UperNet:
    """UperNet over a MambaOut backbone (``MambaOutBackbone``: stage maps with the added norms).

    Args:
        model_name: the MambaOut variant of the backbone.
        num_classes: classes of the label maps (ADE20K: 150).
        checkpoint: ImageNet weights of the backbone (any file ``mambaout.create_model`` reads); None: random.
        backbone_options: ``create_model`` overrides of the backbone (``drop_path_rate``, ``depths``, ...).
        decoder_channels: width of the decoder (the recipe's: 512).
        auxiliary_head: an FCN head on stage 3 for the auxiliary loss of training.
        dropout: channel dropout before the classifiers (the recipe's: 0.1).
    """
    backbone = MambaOutBackbone(model_name, checkpoint, **(backbone_options or {}))
    return UperNet(backbone, num_classes, decoder_channels, auxiliary_head, dropout)


def segmenter_from_config(cfg: SegmentationConfig, checkpoint: str | None) -> UperNet:
    m = cfg.model
    try:
        return build_upernet(m.name, m.num_classes, checkpoint, backbone_options=backbone_overrides(m),
                             decoder_channels=m.decoder_channels, auxiliary_head=m.aux_weight > 0)
    except ValueError as error:  # not a MambaOut variant
        raise ConfigError(f"model.name: {error}") from None


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float, ImageNet mean and std (the backbone's pretraining)."""
    mean = images.new_tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std = images.new_tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


def segmentation_loss(seed: int, aux_weight: float, runtime: Runtime) -> MicroBatchLoss:
    """Pixel cross-entropy (ignored pixels left out) of the logits, plus ``aux_weight`` x that of the auxiliary
    head; dropout and drop path drawn from generators seeded by (step, micro-batch)."""
    def loss(model: nn.Module, batch: dict[str, Any], step: int, micro_ids: list[int]) -> torch.Tensor:
        seed_draws(seed, step, micro_ids)
        images = normalize(runtime.to_device(batch["image"]))
        labels = runtime.to_device(batch["label"]).long()
        with runtime.autocast():
            outputs = model(images)
            total = F.cross_entropy(outputs["out"], labels, ignore_index=IGNORE_INDEX)
            if "aux" in outputs:
                total = total + aux_weight * F.cross_entropy(outputs["aux"], labels, ignore_index=IGNORE_INDEX)
        return total
    return loss


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader, runtime: Runtime, dataset: ADE20K) -> dict[str, float | None]:
    """mIoU, mean class accuracy and pixel accuracy (percent) over the evaluation set: each image's logits are
    resized to its label map, the int64 confusion matrix of every process summed once at the end."""
    model.eval()
    classes = dataset.num_classes
    confusion = torch.zeros(classes * classes, dtype=torch.int64, device=runtime.device)
    for batch in loader:
        for image, label in zip(batch["image"], batch["label"]):
            with runtime.autocast():
                logits = model(normalize(runtime.to_device(image)[None]))["out"]
            label = runtime.to_device(label).long()
            logits = F.interpolate(logits.float(), size=label.shape, mode="bilinear", align_corners=False)
            valid = label != IGNORE_INDEX
            confusion += torch.bincount(label[valid] * classes + logits[0].argmax(0)[valid],
                                        minlength=classes * classes)
    return segmentation_metrics(runtime.sum_across(confusion).view(classes, classes).cpu())


def segmentation_metrics(confusion: torch.Tensor) -> dict[str, float | None]:
    """From a [true, predicted] confusion matrix: mIoU and mAcc over the classes that occur (in the labels or the
    predictions for IoU, in the labels for accuracy), aAcc over all labelled pixels; percent, None without
    any labelled pixel."""
    confusion = confusion.double()
    hits, labelled, predicted = confusion.diag(), confusion.sum(1), confusion.sum(0)
    union = labelled + predicted - hits
    if labelled.sum() == 0:
        return dict.fromkeys(SEGMENTATION_METRICS)
    return {"mIoU": 100 * (hits / union)[union > 0].mean().item(),
            "mAcc": 100 * (hits / labelled)[labelled > 0].mean().item(),
            "aAcc": 100 * (hits.sum() / labelled.sum()).item()}


def _datasets(cfg: SegmentationConfig) -> tuple[ADE20K, ADE20K]:
    data = cfg.data
    if data.root is None:
        raise ConfigError("data.root is not set: pass data.root=DIR, the folder holding images/ and annotations/")
    augment = SegAugment(crop_size=data.crop_size, scale=data.scale, ratio_range=data.ratio_range,
                         cat_max_ratio=data.cat_max_ratio, hflip=data.hflip, photometric=data.photometric)
    common = {"num_classes": cfg.model.num_classes, "test_scale": data.scale,
              "reduce_zero_label": data.reduce_zero_label}
    root = os.path.expanduser(data.root)
    return ADE20K(root, data.train_split, augment=augment, **common), ADE20K(root, data.val_split, **common)


def _schedule(cfg: SegmentationConfig, optimizer, lr: float, steps_per_epoch: int) -> WarmupSchedule:
    s = cfg.sched
    return WarmupSchedule(optimizer, lr, warmup_steps=s.warmup_steps, warmup_ratio=s.warmup_ratio,
                          decay=poly_decay(s.total_steps, s.power, s.min_lr / lr))


def _plan(cfg: SegmentationConfig, steps_per_epoch: int) -> RunPlan:
    total = cfg.sched.total_steps if cfg.train.max_steps is None else min(cfg.sched.total_steps, cfg.train.max_steps)
    return RunPlan(steps_per_epoch, total, eval_every_steps=cfg.eval.every_steps,
                   checkpoint_every_steps=cfg.train.checkpoint_every_steps)


def _input_pipeline(cfg: SegmentationConfig) -> dict[str, Any]:
    d = cfg.data
    return {"train": f"rescale to fit {list(d.scale)} x ratio {list(d.ratio_range)}, crop {d.crop_size} "
                     f"(cat_max_ratio {d.cat_max_ratio}), flip {d.hflip}, photometric {d.photometric}, pad",
            "eval": f"rescale to fit {list(d.scale)}; logits resized to the label map",
            "reduce_zero_label": d.reduce_zero_label}


SEGMENTATION = Task(
    name="segmentation", schema=SegmentationConfig, metrics=SEGMENTATION_METRICS, score="mIoU",
    build_datasets=_datasets, build_model=segmenter_from_config,
    micro_loss=lambda cfg, runtime: segmentation_loss(cfg.train.seed, cfg.model.aux_weight, runtime),
    evaluate=evaluate_segmentation, schedule=_schedule, plan=_plan, input_pipeline=_input_pipeline)
