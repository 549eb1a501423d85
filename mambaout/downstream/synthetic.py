"""Synthetic datasets in the COCO and ADE20K layouts: coloured squares and discs drawn on noise, that a detector and
a segmenter learn in a few dozen CPU steps (tests/test_downstream.py, scripts/benchmark_downstream.py: the
fine-tuning runs end to end without COCO or ADE20K)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

# Category ids of the COCO files, deliberately not 1..K: labels must be mapped both ways.
CATEGORIES = ({"id": 3, "name": "square"}, {"id": 7, "name": "disc"})
COLOURS = {"square": (225, 45, 40), "disc": (40, 205, 70)}
SIZES = ((128, 128), (160, 128), (128, 160))  # (width, height), taken in turn


def _polygon(kind: str, x: int, y: int, w: int, h: int) -> list[tuple[float, float]]:
    if kind == "square":
        return [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    return [(x + w / 2 + w / 2 * math.cos(2 * math.pi * t / 24), y + h / 2 + h / 2 * math.sin(2 * math.pi * t / 24))
            for t in range(24)]


def draw_scene(rng: np.random.Generator, width: int, height: int, count: int
               ) -> tuple[Image.Image, list[tuple[str, list[tuple[float, float]], np.ndarray]]]:
    """Noise with ``count`` non-overlapping shapes; each shape as (kind, polygon, its binary mask)."""
    pixels = np.clip(rng.normal(110, 35, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    taken = np.zeros((height, width), bool)
    shapes = []
    for _ in range(50):  # rejection sampling of free spots
        if len(shapes) == count:
            break
        kind = ("square", "disc")[int(rng.integers(2))]
        w, h = (int(v) for v in rng.integers(28, 52, 2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        if taken[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2].any():
            continue
        polygon = _polygon(kind, x, y, w, h)
        ImageDraw.Draw(image).polygon(polygon, fill=COLOURS[kind])
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).polygon(polygon, fill=1)
        mask = np.asarray(mask).astype(bool)
        taken |= mask
        shapes.append((kind, polygon, mask))
    return image, shapes


def write_coco(root: Path, split: str, num_images: int, seed: int, empty: int = 0,
               sizes: tuple[tuple[int, int], ...] = SIZES) -> Path:
    """``root/<split>/*.png`` and ``root/annotations/instances_<split>.json``; squares as polygons, discs as RLE;
    the last ``empty`` images without any shape; image sizes (width, height) taken from ``sizes`` in turn."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    ids = {c["name"]: c["id"] for c in CATEGORIES}
    doc = {"images": [], "annotations": [], "categories": list(CATEGORIES)}
    for index in range(num_images):
        width, height = sizes[index % len(sizes)]
        count = 0 if index >= num_images - empty else int(rng.integers(1, 4))
        image, shapes = draw_scene(rng, width, height, count)
        name = f"{split}_{index:04d}.png"
        image.save(root / split / name)
        doc["images"].append({"id": 100 + index, "file_name": name, "width": width, "height": height})
        for kind, polygon, mask in shapes:
            ys, xs = np.nonzero(mask)
            box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
            if kind == "square":
                segmentation = [[coordinate for point in polygon for coordinate in point]]
            else:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": 100 + index,
                                       "category_id": ids[kind], "bbox": box, "area": float(mask.sum()),
                                       "iscrowd": 0, "segmentation": segmentation})
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(doc))
    return path


def write_ade20k(root: Path, split: str, num_images: int, seed: int,
                 sizes: tuple[tuple[int, int], ...] = SIZES) -> Path:
    """``root/images/<split>/*.jpg`` and ``root/annotations/<split>/*.png``: class 1 the noise, 2 squares, 3 discs,
    0 ("other", ignored) a 3-pixel frame; image sizes as ``write_coco``'s."""
    rng = np.random.default_rng(seed)
    images, labels = root / "images" / split, root / "annotations" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for index in range(num_images):
        width, height = sizes[index % len(sizes)]
        image, shapes = draw_scene(rng, width, height, int(rng.integers(1, 4)))
        label = np.ones((height, width), np.uint8)
        for kind, _, mask in shapes:
            label[mask] = 2 if kind == "square" else 3
        label[:3], label[-3:], label[:, :3], label[:, -3:] = 0, 0, 0, 0
        image.save(images / f"ADE_{split}_{index:04d}.jpg", quality=95)
        Image.fromarray(label).save(labels / f"ADE_{split}_{index:04d}.png")
    return root
