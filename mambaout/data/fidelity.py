"""How close the tensor pipelines are to timm's PIL pipeline: measured, not assumed.

Two kinds of evidence, both on real photos (scikit-learn ships two; any folder of images works):
* the same parameters through both implementations, op by op (``op_differences``, ``crop_resize_differences``,
  ``decode_differences``, ``eval_differences``): the largest and the mean absolute pixel difference;
* the same recipe drawn by both (``augmentation_statistics``): the distribution of the output pixels and how often
  each RandAugment op, flip, filter and erasing is applied, to compare within sampling error.

``scripts/compare_pipelines.py`` prints the tables of docs/DATA.md; tests/test_pipelines.py asserts on them.
"""
from __future__ import annotations

import collections
import math
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TVF
from PIL import Image
from timm.data import auto_augment

from . import augment as A
from . import plan as P
from .decode import decode_rgb
from .transforms import build_eval_transform, build_train_transform  # also installs the 0-bit posterize fix
from .tensor_pipeline import TensorEvalReader, crop_resize_flip

COLOR_OPS = {  # timm op -> (device op, a random argument as timm's level function can produce it, or None)
    "AutoContrast": (P.AUTOCONTRAST, None),
    "Equalize": (P.EQUALIZE, None),
    "Invert": (P.INVERT, None),
    "PosterizeIncreasing": (P.POSTERIZE, lambda rng: rng.randint(0, 4)),
    "PosterizeOriginal": (P.POSTERIZE, lambda rng: rng.randint(4, 8)),
    "SolarizeIncreasing": (P.SOLARIZE, lambda rng: rng.randint(0, 256)),
    "SolarizeAdd": (P.SOLARIZE_ADD, lambda rng: rng.randint(0, 110)),
    "ColorIncreasing": (P.COLOR, lambda rng: rng.uniform(0.1, 1.9)),
    "ContrastIncreasing": (P.CONTRAST, lambda rng: rng.uniform(0.1, 1.9)),
    "BrightnessIncreasing": (P.BRIGHTNESS, lambda rng: rng.uniform(0.1, 1.9)),
    "SharpnessIncreasing": (P.SHARPNESS, lambda rng: rng.uniform(0.1, 1.9)),
}
GEOMETRIC_OPS = {  # timm op -> its argument at magnitude m (before the random sign), for a side of `size`
    "Rotate": lambda m, size: m / 10 * 30,
    "ShearX": lambda m, size: m / 10 * 0.3,
    "ShearY": lambda m, size: m / 10 * 0.3,
    "TranslateXRel": lambda m, size: m / 10 * 0.45,
    "TranslateYRel": lambda m, size: m / 10 * 0.45,
}
FILL = (124, 116, 104)  # timm's img_mean for the ImageNet mean


@dataclass
class Difference:
    """Absolute pixel differences (0-255 scale) between timm's PIL result and ours for the same parameters."""
    name: str
    max: float
    mean: float
    over_one: float  # fraction of values that differ by more than one grey level


def _difference(name: str, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Difference:
    largest, total, over, count = 0.0, 0.0, 0, 0
    for ours, theirs in pairs:
        diff = (ours.to(torch.float64) - theirs.to(torch.float64)).abs()
        largest, total = max(largest, diff.max().item()), total + diff.sum().item()
        over, count = over + int((diff > 1).sum()), count + diff.numel()
    return Difference(name, largest, total / count, over / count)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def sample_photos(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    """``count`` square crops of scikit-learn's two sample photos, resized to ``size``: real photographic
    content (edges, textures, smooth skies) at a test-friendly size."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(image) for image in load_sample_images().images]
    rng = random.Random(seed)
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        side = rng.randint(size, min(photo.size))
        left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        crops.append(photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC))
    return crops


def _run_op(op: int, image: torch.Tensor, arg: float = 0.0, matrix: Sequence[float] = (0.0,) * 6,
            gather: bool = False) -> torch.Tensor:
    return A.OPS[op](image.unsqueeze(0), torch.tensor([arg], dtype=torch.float32),
                     torch.tensor([matrix], dtype=torch.float32), torch.tensor(FILL, dtype=torch.uint8), gather)[0]


def op_differences(images: Sequence[Image.Image], seed: int = 0, gather: bool = False) -> list[Difference]:
    """Every RandAugment op of the recipe, ours against timm's PIL op with the same argument (and, for the
    geometric ops, the same filter), on each image. ``gather``: the fixed-shape (XLA) sampling."""
    rng = random.Random(seed)
    rows = []
    for name, (op, draw) in COLOR_OPS.items():
        pairs = []
        for image in images:
            args = () if draw is None else (draw(rng),)
            theirs = auto_augment.NAME_TO_OP[name](image, *args)
            pairs.append((_run_op(op, to_tensor(image), *args), to_tensor(theirs)))
        rows.append(_difference(name, pairs))
    for name, level in GEOMETRIC_OPS.items():
        for filter_id, (resample, filter_name) in enumerate(((Image.BILINEAR, "bilinear"), (Image.BICUBIC, "bicubic"))):
            pairs = []
            for image in images:
                value = level(rng.uniform(0, 10), image.width) * rng.choice((-1, 1))
                theirs = auto_augment.NAME_TO_OP[name](image, value, fillcolor=FILL, resample=resample)
                pixels = value * image.width if name.startswith("Translate") else value
                matrix = P._affine_matrix(name, pixels, image.width)
                pairs.append((_run_op(P.AFFINE_OPS[filter_id], to_tensor(image), matrix=matrix, gather=gather),
                              to_tensor(theirs)))
            rows.append(_difference(f"{name} ({filter_name})", pairs))
    return rows


def crop_resize_differences(images: Sequence[Image.Image], size: int, seed: int = 0) -> list[Difference]:
    """The random-resized crop (box drawn as the recipe draws it) with each filter: PIL's resize (timm) against
    torchvision's antialiased tensor resize (ours)."""
    rng = random.Random(seed)
    planner = P.SamplePlanner(size, rand_augment=None, random_erase_prob=0, random_erase_mode="pixel",
                              random_erase_count=1, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0,
                              interpolation="random", mean=(0.5, 0.5, 0.5))
    rows = []
    for filter_id, mode in enumerate((TVF.InterpolationMode.BILINEAR, TVF.InterpolationMode.BICUBIC)):
        pairs = []
        for image in images:
            top, left, h, w = planner._crop_box(rng, image.width, image.height)
            theirs = TVF.resized_crop(image, top, left, h, w, [size, size], interpolation=mode)
            pairs.append((crop_resize_flip(to_tensor(image), [top, left, h, w, filter_id, 0], size),
                          to_tensor(theirs)))
        rows.append(_difference(f"random-resized crop ({P.INTERPOLATIONS[filter_id]})", pairs))
    return rows


def decode_differences(paths: Sequence[str]) -> Difference:
    """``decode_rgb`` (libjpeg-turbo through TorchCodec or torchvision) against PIL's decoding and RGB conversion."""
    from .decode import read_bytes

    return _difference("decode", ((decode_rgb(read_bytes(path)), to_tensor(Image.open(path))) for path in paths))


def eval_differences(images: Sequence[Image.Image], size: int, crop_pct: float = 1.0,
                     interpolation: str = "bicubic") -> Difference:
    """The evaluation geometry (short-side resize, centre crop): PIL (timm) against tensors (ours)."""
    reader = TensorEvalReader(size, crop_pct, interpolation)
    timm_geometry = build_eval_transform(size, crop_pct=crop_pct, interpolation=interpolation).transforms[:2]
    pairs = []
    for image in images:
        theirs = image
        for step in timm_geometry:
            theirs = step(theirs)
        pairs.append((reader.prepare(to_tensor(image), None)["image"], to_tensor(theirs)))
    return _difference(f"eval resize + centre crop ({interpolation})", pairs)


# --- the same recipe drawn by both pipelines -------------------------------------------------------------

@dataclass
class AugmentationStatistics:
    """What ``count`` recipe-augmented images look like: per channel, the mean over images of each image's pixel
    mean and of its mean square (with the spread of both over images, for standard errors), and how many
    times each RandAugment op (timm's name), flip, filter and erasing was applied."""
    count: int
    channel_mean: np.ndarray
    channel_mean_sq: np.ndarray
    spread_mean: np.ndarray
    spread_mean_sq: np.ndarray
    events: collections.Counter

    @property
    def channel_std(self) -> np.ndarray:
        return np.sqrt(self.channel_mean_sq - self.channel_mean ** 2)

    def compare(self, other: "AugmentationStatistics", sigmas: float = 4.0) -> list[str]:
        """What differs by more than ``sigmas`` standard errors (empty when the two agree)."""
        problems = []
        for name, a, b, sa, sb in (("pixel mean", self.channel_mean, other.channel_mean, self.spread_mean,
                                    other.spread_mean),
                                   ("pixel mean square", self.channel_mean_sq, other.channel_mean_sq,
                                    self.spread_mean_sq, other.spread_mean_sq)):
            error = np.sqrt(sa ** 2 / self.count + sb ** 2 / other.count)
            for channel in np.flatnonzero(np.abs(a - b) > sigmas * error):
                problems.append(f"{name} of channel {channel}: {a[channel]:.4f} vs {b[channel]:.4f} "
                                f"(standard error {error[channel]:.4f})")
        for event in sorted(set(self.events) | set(other.events)):
            p, q = self.events[event] / self.count, other.events[event] / other.count
            pooled = (self.events[event] + other.events[event]) / (self.count + other.count)
            error = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / self.count + 1 / other.count))
            if abs(p - q) > sigmas * error:
                problems.append(f"frequency of {event}: {p:.4f} vs {q:.4f} per image (standard error {error:.4f})")
        return problems


def _statistics(images: Iterable[torch.Tensor], events: collections.Counter) -> AugmentationStatistics:
    means, squares = [], []
    for image in images:
        means.append(image.double().mean(dim=(1, 2)).numpy())
        squares.append(image.double().square().mean(dim=(1, 2)).numpy())
    means, squares = np.stack(means), np.stack(squares)
    return AugmentationStatistics(len(means), means.mean(0), squares.mean(0), means.std(0), squares.std(0), events)


def timm_statistics(images: Sequence[Image.Image], count: int, size: int, rand_augment: str, erase_prob: float,
                    seed: int = 0) -> AugmentationStatistics:
    """timm's train transform on ``count`` draws over ``images``, with its ops, flips and erasings counted by
    wrapping the callables it calls."""
    from .sampling import derive_seed, seeded_rngs

    events: collections.Counter = collections.Counter()
    transform = build_train_transform(size, rand_augment=rand_augment, random_erase_prob=erase_prob)
    for op in transform.transforms[2].ops:
        op.aug_fn = _counting(op.aug_fn, op.name, events)
    transform.transforms[1] = _counting_change(transform.transforms[1], "flip", events)
    transform.transforms[-1] = _counting_change(transform.transforms[-1], "erase", events, copy=True)

    def outputs():
        for index in range(count):
            with seeded_rngs(derive_seed(seed, "timm", index)):
                yield transform(images[index % len(images)])
    return _statistics(outputs(), events)


def _counting(function, name: str, events: collections.Counter):
    def counted(*args, **kwargs):
        events[name] += 1
        return function(*args, **kwargs)
    return counted


def _counting_change(step, name: str, events: collections.Counter, copy: bool = False):
    """``step`` that counts the calls where it changed its input (a new object, or other values in place)."""
    def counted(x):
        before = x.clone() if copy else x
        after = step(x)
        events[name] += (after is not x) if not copy else not torch.equal(before, after)
        return after
    return counted


def tensor_statistics(images: Sequence[Image.Image], count: int, size: int, rand_augment: str, erase_prob: float,
                      seed: int = 0) -> AugmentationStatistics:
    """The tensor pipeline's sample (augmented as in the workers) on as many draws, with the ops, flips and
    erasings counted from the plans."""
    from .sampling import derive_seed
    from .tensor_pipeline import on_the_host

    planner = P.SamplePlanner(size, rand_augment=rand_augment, random_erase_prob=erase_prob, random_erase_mode="pixel",
                              random_erase_count=1, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.5,
                              interpolation="random", mean=(0.485, 0.456, 0.406))
    augmenter = A.Augmenter((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), planner.fill, "pixel")
    events: collections.Counter = collections.Counter()
    sources = [to_tensor(image) for image in images]

    def outputs():
        for index in range(count):
            source = sources[index % len(sources)]
            crop, plan, applied = planner.draw_with_names(derive_seed(seed, "tensor", index), source.shape[-1],
                                                          source.shape[-2])
            events.update(applied)
            events["flip"] += int(crop[-1])
            events["erase"] += int(plan["erase"][:, 2].any())
            image = crop_resize_flip(source, crop.tolist(), size)
            yield augmenter(image.unsqueeze(0), {k: v.unsqueeze(0) for k, v in plan.items()}, on_the_host)[0]
    return _statistics(outputs(), events)
