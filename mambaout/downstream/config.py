"""The fine-tuning commands' schemas: `DetectionConfig` (scripts/finetune_detection.py, Mask R-CNN on COCO-format
data) and `SegmentationConfig` (scripts/finetune_segmentation.py, UperNet on the ADE20K layout).

They are built like train.py's `Config` (same YAML, `base:`, overrides, checks and listings) from its `optim`,
`train`, `runtime` and `tracking` sections, with the recipe's defaults, and sections of their own. The defaults are
the paper's recipes (Mask R-CNN 1x; UperNet 160k); `configs/downstream/*.yaml` add the backbone of each variant with
its drop path (the authors' note: tiny 0.3, small 0.3-0.4, base 0.6).
"""
from dataclasses import dataclass, field
from typing import Any

from ..config import (EACH_POSITIVE, FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, RANGE, Check, ConfigError,
                      OptimConfig, RuntimeConfig, Schema, TrackingConfig, TrainConfig, _key, accumulation_steps)

BACKBONE = "Backbone: a mambaout_* variant (the _ssm twins included), with a LayerNorm on each stage output."
CHECKPOINT = ("ImageNet weights of the backbone: a train.py checkpoint, the release file (either key layout) or "
              "timm's; its classifier is left out; null = random init.")
DROP_PATH = ("Stochastic depth of the backbone's last block (linspace from 0); the authors: tiny 0.3, small 0.3-0.4, "
             "base 0.6.")
DEPTHS = "Blocks per stage instead of the variant's (experiments, tests); null = the variant's."
DIMS = "Channels per stage instead of the variant's; null = the variant's."
AT_MOST_ONE = Check("in (0, 1]", lambda v: 0 < v <= 1)
Stages = tuple[int, int, int, int]


@dataclass
class DetectionModelConfig:
    """The detector: a MambaOut backbone, an FPN and torchvision's Mask R-CNN heads."""
    name: str = _key("mambaout_tiny", BACKBONE)
    checkpoint: str | None = _key(None, CHECKPOINT)
    drop_path_rate: float = _key(0.3, DROP_PATH, FRACTION)
    depths: Stages | None = _key(None, DEPTHS, EACH_POSITIVE)
    dims: Stages | None = _key(None, DIMS, EACH_POSITIVE)
    num_classes: int = _key(80, "Object categories (COCO: 80); must equal the annotation files'.", POSITIVE)
    fpn_channels: int = _key(256, "Channels of the FPN's maps (P2-P6) and of the heads' inputs.", POSITIVE)
    box_head_width: int = _key(1024, "Width of the box head's two fully connected layers.", POSITIVE)
    mask_head_channels: int = _key(256, "Channels of the mask head's four 3x3 convolutions.", POSITIVE)
    rpn_proposals: tuple[int, int] = _key(
        (1000, 1000), "Region proposals kept per image after NMS, in training and at test (mmdetection's).",
        EACH_POSITIVE)
    rois_per_image: int = _key(512, "Proposals sampled per image (a quarter positive) to train the box and mask heads.",
                               POSITIVE)


@dataclass
class CocoDataConfig:
    """COCO-format data: image folders and instances JSON files, relative to root (or absolute)."""
    root: str | None = _key(None, "Dataset folder (e.g. the one holding train2017/, val2017/, annotations/).")
    train_images: str = _key("train2017", "Folder of the training images.")
    train_annotations: str = _key("annotations/instances_train2017.json", "Instances JSON of the training images.")
    val_images: str = _key("val2017", "Folder of the evaluation images.")
    val_annotations: str = _key("annotations/instances_val2017.json", "Instances JSON of the evaluation images.")
    short_side: int = _key(800, "Images are resized (inside the detector) to this shorter side ...", POSITIVE)
    max_size: int = _key(1333, "... with the longer side at most this.", POSITIVE)
    hflip: float = _key(0.5, "Horizontal flip probability in training.", PROBABILITY)
    num_workers: int = _key(4, "Data-loading worker processes per device; 0 = load in the main process.",
                            NON_NEGATIVE)


@dataclass
class StepScheduleConfig:
    """Epochs, linear warm-up, then the lr divided at milestone epochs (mmdetection's 1x schedule)."""
    epochs: int = _key(12, "Training epochs (1x: 12).", POSITIVE)
    milestones: tuple[int, int] = _key((8, 11), "Epochs after which the lr is multiplied by gamma.", EACH_POSITIVE)
    gamma: float = _key(0.1, "Factor of each lr step.", AT_MOST_ONE)
    warmup_steps: int = _key(500, "Optimizer steps of linear warm-up.", NON_NEGATIVE)
    warmup_ratio: float = _key(0.001, "lr at the start of the warm-up, as a fraction of optim.lr.", AT_MOST_ONE)


@dataclass
class EpochEvalConfig:
    """COCOeval (box and mask AP) on the evaluation set, one image per forward on each device."""
    every_epochs: int = _key(1, "Evaluate every this many epochs (and at the end).", POSITIVE)


@dataclass
class DetectionConfig(Schema):
    """A Mask R-CNN fine-tuning run (scripts/finetune_detection.py)."""
    model: DetectionModelConfig = field(default_factory=DetectionModelConfig)
    data: CocoDataConfig = field(default_factory=CocoDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(global_batch_size=16, lr=1e-4, weight_decay=0.05))
    sched: StepScheduleConfig = field(default_factory=StepScheduleConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(micro_batch_size=2))
    eval: EpochEvalConfig = field(default_factory=EpochEvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def derived(self, num_shards: int) -> "FinetuneDerived":
        return derive_finetune(self, num_shards)


@dataclass
class SegmentationModelConfig:
    """The segmenter: a MambaOut backbone and an UperNet decoder (segmentation_models_pytorch's)."""
    name: str = _key("mambaout_tiny", BACKBONE)
    checkpoint: str | None = _key(None, CHECKPOINT)
    drop_path_rate: float = _key(0.3, DROP_PATH, FRACTION)
    depths: Stages | None = _key(None, DEPTHS, EACH_POSITIVE)
    dims: Stages | None = _key(None, DIMS, EACH_POSITIVE)
    num_classes: int = _key(150, "Classes of the label maps (ADE20K: 150, 'other' left out).", POSITIVE)
    decoder_channels: int = _key(512, "Channels of the UperNet decoder (PPM, FPN, fusion).", POSITIVE)
    aux_weight: float = _key(0.4, "Weight of the auxiliary FCN head's loss on stage 3; 0 = no auxiliary head.",
                             NON_NEGATIVE)


@dataclass
class Ade20kDataConfig:
    """ADE20K-layout data and the recipe's transforms (mmsegmentation's ADE20K pipeline)."""
    root: str | None = _key(None, "Dataset folder holding images/<split>/*.jpg and annotations/<split>/*.png.")
    train_split: str = _key("training", "Split to train on.")
    val_split: str = _key("validation", "Split to evaluate on.")
    reduce_zero_label: bool = _key(True, "Label 0 is 'other': ignored, and class c is c - 1 (ADE20K's convention).")
    scale: tuple[int, int] = _key(
        (2048, 512), "Images are resized to fit (long side, short side): x a random ratio in training, as is at test.",
        EACH_POSITIVE)
    ratio_range: tuple[float, float] = _key((0.5, 2.0), "Range of the training resize ratio.", RANGE)
    crop_size: int = _key(512, "Square training crop (padded with the ignore label where the image is smaller).",
                          POSITIVE)
    cat_max_ratio: float = _key(
        0.75, "Redraw a crop (up to 10 times) where one class covers more than this; 1 = never.", AT_MOST_ONE)
    hflip: float = _key(0.5, "Horizontal flip probability in training.", PROBABILITY)
    photometric: bool = _key(True, "Photometric distortion in training (brightness, contrast, saturation, hue).")
    num_workers: int = _key(4, "Data-loading worker processes per device; 0 = load in the main process.",
                            NON_NEGATIVE)


@dataclass
class PolyScheduleConfig:
    """Iterations, linear warm-up, then polynomial decay (mmsegmentation's 160k schedule)."""
    total_steps: int = _key(160000, "Optimizer steps of the run.", POSITIVE)
    warmup_steps: int = _key(1500, "Optimizer steps of linear warm-up.", NON_NEGATIVE)
    warmup_ratio: float = _key(1e-6, "lr at the start of the warm-up, as a fraction of optim.lr.", AT_MOST_ONE)
    power: float = _key(1.0, "Power of the polynomial decay.", POSITIVE)
    min_lr: float = _key(0.0, "lr at the last step.", NON_NEGATIVE)


@dataclass
class StepEvalConfig:
    """mIoU, mean class accuracy and pixel accuracy on the evaluation set, one whole image per forward."""
    every_steps: int = _key(16000, "Evaluate every this many optimizer steps (and at the end).", POSITIVE)


@dataclass
class SegmentationConfig(Schema):
    """An UperNet fine-tuning run (scripts/finetune_segmentation.py)."""
    model: SegmentationModelConfig = field(default_factory=SegmentationModelConfig)
    data: Ade20kDataConfig = field(default_factory=Ade20kDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(global_batch_size=16, lr=1e-4, weight_decay=0.01))
    sched: PolyScheduleConfig = field(default_factory=PolyScheduleConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(micro_batch_size=2))
    eval: StepEvalConfig = field(default_factory=StepEvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def derived(self, num_shards: int) -> "FinetuneDerived":
        return derive_finetune(self, num_shards)


def backbone_overrides(model: DetectionModelConfig | SegmentationModelConfig) -> dict[str, Any]:
    """The ``create_model`` overrides of a model section's backbone: its drop path, and depths/dims where set."""
    structure = {"depths": model.depths, "dims": model.dims}
    return {"drop_path_rate": model.drop_path_rate, **{k: v for k, v in structure.items() if v is not None}}


@dataclass(frozen=True)
class FinetuneDerived:
    """What follows from a fine-tuning config and the number of data shards; recorded, never read back."""
    lr: float
    micro_batch_size: int
    num_shards: int
    accum_steps: int
    output_dir: str


def derive_finetune(cfg: DetectionConfig | SegmentationConfig, num_shards: int) -> FinetuneDerived:
    """The batch split (refused when it does not divide the global batch) and the lr, after the checks that a
    fine-tuning run adds: devices it runs on, batch statistics of the segmenter."""
    if cfg.runtime.device == "xla":
        raise ConfigError("runtime.device=xla: the fine-tuning runs need eager devices (torchvision's detector and "
                          "whole-image evaluation change shape from image to image); use cpu or cuda")
    if cfg.runtime.deterministic:
        raise ConfigError("runtime.deterministic=true: RoIAlign and bilinear upsampling have no deterministic CUDA "
                          "backward, so fine-tuning runs cannot ask for one; set it false (CPU runs are exact anyway)")
    if cfg.runtime.peak_tflops is not None:
        raise ConfigError("runtime.peak_tflops: the fine-tuning runs log no MFU (their images differ in size, and "
                          "so do their FLOPs); leave it null")
    micro = cfg.train.micro_batch_size
    if isinstance(cfg, SegmentationConfig) and micro < 2:
        raise ConfigError(f"train.micro_batch_size={micro}: the UperNet decoder's BatchNorm needs at least 2 images "
                          "per micro-batch in training; use 2 or more")
    return FinetuneDerived(
        lr=cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * cfg.optim.global_batch_size / 1024,
        micro_batch_size=micro,
        num_shards=num_shards,
        accum_steps=accumulation_steps(cfg.optim.global_batch_size, micro, num_shards),
        output_dir=cfg.train.output_dir or f"runs/{type(cfg).__name__.removesuffix('Config').lower()}_{cfg.model.name}",
    )
