"""The COCO instance format: a folder of images and a JSON file of their categories, boxes and masks (polygons or
RLE), read with pycocotools; detections written back as COCO results and scored with COCOeval.

Every problem with the files is one ``DatasetNotFoundError`` / ``DatasetFormatError`` (or ``ConfigError`` for a
class count that does not match) that names the file and what to do.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from ..config import ConfigError
from ..data import DatasetFormatError, DatasetNotFoundError
from .lists import collate_lists, preview

log = logging.getLogger("mambaout")

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6], in this order
IOU_TYPES = ("bbox", "segm")


class CocoDetection(Dataset):
    """Images with their instances (boxes, labels 1..K, binary masks) for torchvision's Mask R-CNN.

    Labels number the JSON's categories in id order from 1 (0 is torchvision's background); ``category_ids``
    maps them back. Crowd regions and boxes under a pixel wide or high are not training targets. For training
    (``train=True``) the images without any other instance are skipped, as mmdetection and torchvision's
    references do (a warning says how many, and which); evaluation keeps every image, as COCOeval counts them.
    Items take the ``(index, sample_seed)`` keys of ``MicroBatchSampler``: the flip is drawn from the seed.
    """

    collate = staticmethod(collate_lists)  # images of different sizes: torchvision's detectors take lists

    def __init__(self, images: str | os.PathLike, annotations: str | os.PathLike, *, num_classes: int,
                 train: bool, hflip: float = 0.5) -> None:
        self.images_dir, self.annotation_file = Path(images), Path(annotations)
        self.train, self.hflip = train, hflip
        self.coco = read_coco(self.annotation_file)
        categories = sorted(self.coco.dataset["categories"], key=lambda category: category["id"])
        self.category_ids = [category["id"] for category in categories]
        self.classes = [category["name"] for category in categories]
        _check_categories(self.coco, self.annotation_file, self.category_ids, num_classes)
        self.labels = {category_id: label for label, category_id in enumerate(self.category_ids, start=1)}
        image_ids = sorted(self.coco.getImgIds())
        _check_image_files(self.coco, image_ids, self.images_dir, self.annotation_file)
        self.image_ids = self._with_instances(image_ids) if train else image_ids

    def _with_instances(self, image_ids: list[int]) -> list[int]:
        kept, skipped = [], []
        for image_id in image_ids:
            if self._instances(image_id):
                kept.append(image_id)
            else:
                skipped.append(self.coco.imgs[image_id]["file_name"])
        if not kept:
            raise DatasetFormatError(
                f"{self.annotation_file}: none of its {len(image_ids)} images has an instance to train on (a "
                "non-crowd annotation with a box at least 1 px wide and high); check that this is an instances "
                "file (instances_*.json) of the images in " + str(self.images_dir))
        if skipped:
            log.warning("%s: %d of %d images have no instance to train on and are skipped for training, like "
                        "mmdetection and torchvision's references do (%s); they stay in evaluation sets",
                        self.annotation_file, len(skipped), len(image_ids), preview(skipped))
        return kept

    def _instances(self, image_id: int) -> list[dict[str, Any]]:
        """The annotations of an image that are training targets."""
        return [ann for ann in self.coco.imgToAnns[image_id]
                if not ann.get("iscrowd", 0) and ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        image_id = self.image_ids[index]
        image = self._read_image(image_id)
        if not self.train:
            return {"image": image, "image_id": image_id}
        target = self._target(image_id)
        if sample_seed is not None and random.Random(sample_seed).random() < self.hflip:
            image, target = _flip(image, target)
        return {"image": image, "target": target, "image_id": image_id}

    def _read_image(self, image_id: int) -> torch.Tensor:
        info = self.coco.imgs[image_id]
        path = self.images_dir / info["file_name"]
        with Image.open(path) as file:
            image = file.convert("RGB")
        if image.size != (info["width"], info["height"]):
            raise DatasetFormatError(
                f"{path} is {image.size[0]}x{image.size[1]} but {self.annotation_file} says "
                f"{info['width']}x{info['height']}: the annotations are of other images; use the annotation file "
                "of these images")
        return pil_to_tensor(image)

    def _target(self, image_id: int) -> dict[str, torch.Tensor]:
        instances = self._instances(image_id)
        boxes = torch.tensor([ann["bbox"] for ann in instances], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        masks = np.stack([self.coco.annToMask(ann) for ann in instances])
        return {"boxes": boxes,
                "labels": torch.tensor([self.labels[ann["category_id"]] for ann in instances], dtype=torch.int64),
                "masks": torch.from_numpy(masks)}

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the training data for resuming: the annotation file's content and the images used."""
        digest = hashlib.sha256(self.annotation_file.read_bytes()).hexdigest()
        return {"num_images": len(self), "num_classes": len(self.classes), "annotations_sha256": digest}

    def to_results(self, image_id: int, detections: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """COCO result entries (boxes as xywh, masks as RLE thresholded at 0.5) of one image's detections (host
        tensors of torchvision's Mask R-CNN in eval mode, in the image's own coordinates)."""
        boxes = detections["boxes"].tolist()
        masks = (detections["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(boxes) else []
        return [{"image_id": image_id, "category_id": self.category_ids[label - 1], "score": score,
                 "bbox": [x0, y0, x1 - x0, y1 - y0],
                 "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}}
                for (x0, y0, x1, y1), label, score, rle in zip(
                    boxes, detections["labels"].tolist(), detections["scores"].tolist(), rles)]


def read_coco(annotation_file: Path) -> COCO:
    """The indexed content of a COCO JSON file; a missing or malformed file is an error that names it."""
    if not annotation_file.is_file():
        raise DatasetNotFoundError(
            f"{annotation_file}: no such annotation file; data.root and the annotation paths must point at a "
            "COCO-format instances JSON (e.g. annotations/instances_train2017.json)")
    try:
        doc = json.loads(annotation_file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetFormatError(f"{annotation_file}: not a JSON file ({error})") from None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(doc.get(key), list)]
    if missing:
        raise DatasetFormatError(f"{annotation_file}: not a COCO instances file: no list of {', '.join(missing)}")
    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


def _check_categories(coco: COCO, annotation_file: Path, category_ids: list[int], num_classes: int) -> None:
    if len(category_ids) != num_classes:
        raise ConfigError(
            f"model.num_classes={num_classes} but {annotation_file} has {len(category_ids)} categories; set "
            f"model.num_classes={len(category_ids)}")
    unknown = sorted({ann["category_id"] for ann in coco.dataset["annotations"]} - set(category_ids))
    if unknown:
        count = sum(ann["category_id"] in unknown for ann in coco.dataset["annotations"])
        raise DatasetFormatError(
            f"{annotation_file}: {count} annotations have category ids {preview(unknown)} that are not among its "
            f"categories ({preview(category_ids)}); add those categories to the file or remove their annotations")


def _check_image_files(coco: COCO, image_ids: list[int], images_dir: Path, annotation_file: Path) -> None:
    if not images_dir.is_dir():
        raise DatasetNotFoundError(f"{images_dir}: no such image folder (the images of {annotation_file})")
    present = {entry.name for entry in os.scandir(images_dir)}
    names = [coco.imgs[i]["file_name"] for i in image_ids]
    missing = [name for name in names if name not in present and not (images_dir / name).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{len(missing)} of the {len(image_ids)} images of {annotation_file} are not in {images_dir} "
            f"({preview(missing)}); point the image folder setting at the folder holding them")


def check_same_categories(train: CocoDetection, val: CocoDetection) -> None:
    """A model is evaluated on the categories it learns: the two files must list the same ones."""
    if (train.category_ids, train.classes) != (val.category_ids, val.classes):
        raise DatasetFormatError(
            f"{train.annotation_file} and {val.annotation_file} list different categories "
            f"({preview(train.classes)} vs {preview(val.classes)}); use the annotation files of one dataset")


def _flip(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


def coco_metrics(coco: COCO, results: list[dict[str, Any]]) -> dict[str, float | None]:
    """COCOeval's box and mask AP, AP50, AP75, APs, APm, APl in percent (``bbox_AP``, ``segm_AP50``...); None
    where COCOeval has no value (-1: no ground truth of that size). No detection at all scores 0."""
    metrics: dict[str, float | None] = {}
    for iou_type in IOU_TYPES:
        stats = _cocoeval_stats(coco, results, iou_type) if results else [0.0] * len(COCO_METRICS)
        metrics.update({f"{iou_type}_{name}": 100 * value if value >= 0 else None
                        for name, value in zip(COCO_METRICS, stats)})
    return metrics


def _cocoeval_stats(coco: COCO, results: list[dict[str, Any]], iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
        evaluation = COCOeval(coco, coco.loadRes(results), iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats[:len(COCO_METRICS)].tolist()
