"""Data: datasets, timm-based transforms, and keyed (worker- and shard-independent) sampling."""
from .datasets import ImageDataset, SyntheticDataset, build_dataset, dataset_fingerprint
from .sources.folder import (
    DatasetFormatError,
    DatasetNotFoundError,
    ilsvrc2012_id_to_synset,
    imagenet_synsets,
    scan_split,
)
from .sampling import (
    PAD_INDEX,
    EvalBatchSampler,
    MicroBatchSampler,
    derive_seed,
    seeded_rngs,
    shard_indices,
)
from .transforms import build_eval_transform, build_mixup, build_train_transform, mixup_micro_batch

__all__ = [
    "PAD_INDEX",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "EvalBatchSampler",
    "ImageDataset",
    "MicroBatchSampler",
    "SyntheticDataset",
    "build_dataset",
    "build_eval_transform",
    "build_mixup",
    "build_train_transform",
    "dataset_fingerprint",
    "derive_seed",
    "ilsvrc2012_id_to_synset",
    "imagenet_synsets",
    "mixup_micro_batch",
    "scan_split",
    "seeded_rngs",
    "shard_indices",
]
