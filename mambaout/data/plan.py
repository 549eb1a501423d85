"""Every random parameter of a training sample, drawn on the host from one keyed generator.

The tensor pipelines (``tensor``, ``nvjpeg``) split timm's DeiT transform in two: the host draws the parameters
here, in the DataLoader worker, from ``sample_generator(sample_seed)``; the pixels are then computed from these
parameters by plain tensor ops (``augment.py``) on whatever device runs them. The distributions are timm's,
call for call: the random-resized crop of ``RandomResizedCropAndInterpolation.get_params``, the random
interpolation, the horizontal flip, RandAugment as timm parses its policy string (op choice with replacement,
the per-op probability, Gaussian magnitude noise clipped to [0, mmax], the level-to-argument functions with
their random sign, the random filter of geometric ops) and ``RandomErasing``'s boxes. Geometric RandAugment ops
become the 2x3 inverse affine matrix PIL would use, so the device runs one affine op for all of them.

A plan is a dict of fixed-shape tensors, so DataLoader's default collate batches it and a compiled (XLA) step
sees the same shapes for every batch.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from timm.data.auto_augment import rand_augment_transform

from .sampling import sample_generator

NOISE_TABLE_BITS = 20
"""The erasing noise comes from a table of 2**20 normal values (``augment.noise_table``) at a keyed offset."""

INTERPOLATIONS = ("bilinear", "bicubic")
"""Filters the tensor pipelines offer (PIL's affine transform knows no other smooth filter); ids are positions."""


class UnsupportedAugmentation(ValueError):
    """A setting the tensor pipelines cannot reproduce; the message names the key and the way out."""


# Device op ids: positions in ``augment.OPS``. Geometric ops share one affine op per filter.
AUTOCONTRAST, EQUALIZE, INVERT, POSTERIZE, SOLARIZE, SOLARIZE_ADD, COLOR, CONTRAST, BRIGHTNESS, SHARPNESS, \
    AFFINE_BILINEAR, AFFINE_BICUBIC = range(12)
AFFINE_OPS = (AFFINE_BILINEAR, AFFINE_BICUBIC)  # per filter, in the order of INTERPOLATIONS
NO_OP = -1


def _negate(value: float, rng: random.Random) -> float:
    """timm's ``_randomly_negate``: the same draw, from ``rng``."""
    return -value if rng.random() > 0.5 else value


def _enhance(level: float, rng: random.Random) -> float:
    return level / 10 * 1.8 + 0.1


def _enhance_increasing(level: float, rng: random.Random) -> float:
    return max(0.1, 1.0 + _negate(level / 10 * 0.9, rng))


def _posterize(level: float, rng: random.Random) -> float:
    return int(level / 10 * 4)


def _solarize(level: float, rng: random.Random) -> float:
    return min(256, int(level / 10 * 256))


# timm op name -> (device op, level -> argument). Geometric ops are (None, level -> timm's argument); their
# matrices are built by ``_affine_matrix``. The arithmetic is timm's ``LEVEL_TO_ARG`` (checked against it by
# tests/test_pipelines.py with the same random stream).
LEVELS: dict[str, tuple[int | None, Callable[[float, random.Random], float]]] = {
    "AutoContrast": (AUTOCONTRAST, lambda level, rng: 0.0),
    "Equalize": (EQUALIZE, lambda level, rng: 0.0),
    "Invert": (INVERT, lambda level, rng: 0.0),
    "Posterize": (POSTERIZE, _posterize),
    "PosterizeIncreasing": (POSTERIZE, lambda level, rng: 4 - _posterize(level, rng)),
    "PosterizeOriginal": (POSTERIZE, lambda level, rng: _posterize(level, rng) + 4),
    "Solarize": (SOLARIZE, _solarize),
    "SolarizeIncreasing": (SOLARIZE, lambda level, rng: 256 - _solarize(level, rng)),
    "SolarizeAdd": (SOLARIZE_ADD, lambda level, rng: min(128, int(level / 10 * 110))),
    "Color": (COLOR, _enhance),
    "ColorIncreasing": (COLOR, _enhance_increasing),
    "Contrast": (CONTRAST, _enhance),
    "ContrastIncreasing": (CONTRAST, _enhance_increasing),
    "Brightness": (BRIGHTNESS, _enhance),
    "BrightnessIncreasing": (BRIGHTNESS, _enhance_increasing),
    "Sharpness": (SHARPNESS, _enhance),
    "SharpnessIncreasing": (SHARPNESS, _enhance_increasing),
    "Rotate": (None, lambda level, rng: _negate(level / 10 * 30.0, rng)),
    "ShearX": (None, lambda level, rng: _negate(level / 10 * 0.3, rng)),
    "ShearY": (None, lambda level, rng: _negate(level / 10 * 0.3, rng)),
}


def _affine_matrix(name: str, value: float, size: int) -> list[float]:
    """PIL's inverse affine map (output pixel centre -> input position) of a geometric op on a square image of
    ``size`` pixels, as timm's op calls ``Image.transform`` / ``Image.rotate``."""
    if name == "ShearX":
        return [1.0, value, 0.0, 0.0, 1.0, 0.0]
    if name == "ShearY":
        return [1.0, 0.0, 0.0, value, 1.0, 0.0]
    if name in ("TranslateXRel", "TranslateX"):
        return [1.0, 0.0, value, 0.0, 1.0, 0.0]
    if name in ("TranslateYRel", "TranslateY"):
        return [1.0, 0.0, 0.0, 0.0, 1.0, value]
    # Rotate: Image.rotate's matrix about the centre, its trigonometry rounded to 15 digits as Pillow does
    angle = -math.radians(value)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    centre = size / 2
    return [a, b, a * -centre + b * -centre + centre, -b, a, -b * -centre + a * -centre + centre]


@dataclass(frozen=True)
class _RandOp:
    name: str
    device_op: int | None  # None: geometric
    level: Callable[[float, random.Random], float]
    prob: float
    magnitude: float
    magnitude_std: float
    magnitude_max: float


class SamplePlanner:
    """Draws a sample's plan: ``draw(sample_seed, width, height)`` -> ``(crop, plan)``.

    ``crop`` is ``[top, left, height, width, interpolation id, flip]`` (int64), the random-resized crop of the
    source image; ``plan`` holds what the augmentation applies after it: ``ops`` (int64 ``[layers]``, -1 = the
    layer's op was skipped), ``args`` (float32 ``[layers]``), ``affine`` (float32 ``[layers, 6]``), ``erase``
    (int64 ``[boxes, 4]`` of top, left, height, width; height 0 = no box) and ``noise`` (int64: the erasing
    noise's offset in ``augment.noise_table``).
    """

    def __init__(self, img_size: int, *, rand_augment: str | None, random_erase_prob: float, random_erase_mode: str,
                 random_erase_count: int, crop_scale: Sequence[float], crop_ratio: Sequence[float], hflip: float,
                 interpolation: str, mean: Sequence[float]) -> None:
        if interpolation != "random" and interpolation not in INTERPOLATIONS:
            raise UnsupportedAugmentation(
                f"aug.interpolation={interpolation!r}: the tensor pipelines resize with "
                f"{' or '.join(INTERPOLATIONS)} (or 'random', one of them per image); use one of those, or "
                "data.pipeline=timm for PIL's other filters")
        self.img_size = img_size
        self.crop_scale = tuple(crop_scale)
        self.log_ratio = (math.log(crop_ratio[0]), math.log(crop_ratio[1]))
        self.crop_ratio = tuple(crop_ratio)
        self.hflip = hflip
        self.interpolations = INTERPOLATIONS if interpolation == "random" else (interpolation,)
        self.erase_prob = random_erase_prob
        self.erase_mode = random_erase_mode
        self.erase_count = random_erase_count if random_erase_prob > 0 else 0  # no boxes: no erasing pass
        self.log_erase_aspect = (math.log(0.3), math.log(1 / 0.3))  # timm's RandomErasing defaults
        self.fill = tuple(min(255, round(255 * channel)) for channel in mean)  # timm's img_mean for RandAugment
        self._parse_rand_augment(rand_augment, interpolation)

    def _parse_rand_augment(self, policy: str | None, interpolation: str) -> None:
        """timm parses the policy string (magnitude, layers, probability, noise, op set, weights); the ops it
        picks must be ones this module reproduces."""
        self.ops: list[_RandOp] = []
        self.num_layers, self.choice_weights = 0, None
        if not policy:
            return
        if not policy.startswith("rand"):
            raise UnsupportedAugmentation(
                f"aug.rand_augment={policy!r}: the tensor pipelines reproduce timm's RandAugment ('rand-...'); "
                "for AutoAugment or AugMix policies use data.pipeline=timm")
        size = self.img_size
        hparams = {"translate_const": int(size * 0.45), "img_mean": self.fill}
        if interpolation != "random":
            hparams["interpolation"] = interpolation
        transform = rand_augment_transform(policy, hparams)
        self.num_layers = transform.num_layers
        self.choice_weights = None if transform.choice_weights is None else list(transform.choice_weights)
        for op in transform.ops:
            level = self._level_function(op.name, op.hparams)
            if level is None:
                raise UnsupportedAugmentation(
                    f"aug.rand_augment={policy!r} uses the op {op.name}, which the tensor pipelines do not "
                    f"implement (they do: {', '.join(sorted(LEVELS))}, TranslateX/Y[Rel]); use data.pipeline=timm")
            device_op, level_fn = level
            self.ops.append(_RandOp(op.name, device_op, level_fn, op.prob, op.magnitude, op.magnitude_std,
                                    op.magnitude_max or 10.0))

    def _level_function(self, name: str, hparams: dict[str, Any]):
        if name in LEVELS:
            return LEVELS[name]
        if name in ("TranslateXRel", "TranslateYRel"):
            pct, size = hparams.get("translate_pct", 0.45), self.img_size
            return None, lambda level, rng: _negate(level / 10 * pct, rng) * size  # pixels = pct * width
        if name in ("TranslateX", "TranslateY"):
            const = float(hparams["translate_const"])
            return None, lambda level, rng: _negate(level / 10 * const, rng)
        return None

    def draw(self, sample_seed: int, width: int, height: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        crop, plan, _ = self.draw_with_names(sample_seed, width, height)
        return crop, plan

    def draw_with_names(self, sample_seed: int, width: int, height: int
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
        """``draw``, and the timm names of the RandAugment ops that were applied (for statistics)."""
        rng = sample_generator(sample_seed)
        top, left, crop_h, crop_w = self._crop_box(rng, width, height)
        interpolation = INTERPOLATIONS.index(rng.choice(self.interpolations))
        flip = rng.random() < self.hflip
        ops, args, affine, names = self._rand_augment(rng)
        erase = self._erase_boxes(rng)
        # two tensors, cut into views: building each field alone costs more than drawing all of them
        integers = torch.tensor([top, left, crop_h, crop_w, interpolation, flip, *ops, *erase,
                                 rng.getrandbits(NOISE_TABLE_BITS)], dtype=torch.int64)
        floats = torch.tensor([*args, *affine], dtype=torch.float32)
        layers, boxes = self.num_layers, self.erase_count
        crop, ops_t, erase_t, noise = integers.split([6, layers, 4 * boxes, 1])
        args_t, affine_t = floats.split([layers, 6 * layers])
        plan = {"ops": ops_t, "args": args_t, "affine": affine_t.view(layers, 6), "erase": erase_t.view(boxes, 4),
                "noise": noise.view(())}
        return crop, plan, names

    def _crop_box(self, rng: random.Random, width: int, height: int) -> tuple[int, int, int, int]:
        """timm's ``RandomResizedCropAndInterpolation.get_params``, draw for draw."""
        area = width * height
        for _ in range(10):
            target_area = rng.uniform(*self.crop_scale) * area
            aspect = math.exp(rng.uniform(*self.log_ratio))
            crop_w = int(round(math.sqrt(target_area * aspect)))
            crop_h = int(round(math.sqrt(target_area / aspect)))
            if crop_w <= width and crop_h <= height:
                return rng.randint(0, height - crop_h), rng.randint(0, width - crop_w), crop_h, crop_w
        in_ratio = width / height  # fallback: the central crop
        if in_ratio < min(self.crop_ratio):
            crop_w, crop_h = width, int(round(width / min(self.crop_ratio)))
        elif in_ratio > max(self.crop_ratio):
            crop_h, crop_w = height, int(round(height * max(self.crop_ratio)))
        else:
            crop_w, crop_h = width, height
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def _choose_ops(self, rng: random.Random) -> list[_RandOp]:
        """numpy's ``choice(ops, layers, replace=weights is None, p=weights)``, as RandAugment calls it."""
        if self.choice_weights is None:
            return [rng.choice(self.ops) for _ in range(self.num_layers)]
        pool, weights, chosen = list(self.ops), list(self.choice_weights), []
        for _ in range(self.num_layers):  # without replacement: one weighted draw at a time
            index = rng.choices(range(len(pool)), weights)[0]
            chosen.append(pool.pop(index))
            weights.pop(index)
        return chosen

    def _rand_augment(self, rng: random.Random) -> tuple[list[int], list[float], list[float], list[str]]:
        ops, args, affine, applied = [], [], [], []
        for op in self._choose_ops(rng):
            if op.prob < 1.0 and rng.random() > op.prob:  # timm's AugmentOp.__call__ from here on
                ops.append(NO_OP), args.append(0.0), affine.extend([0.0] * 6)
                continue
            magnitude = op.magnitude
            if op.magnitude_std == float("inf"):
                magnitude = rng.uniform(0, magnitude)
            elif op.magnitude_std > 0:
                magnitude = rng.gauss(magnitude, op.magnitude_std)
            magnitude = max(0.0, min(magnitude, op.magnitude_max))
            value = op.level(magnitude, rng)
            applied.append(op.name)
            if op.device_op is None:
                ops.append(AFFINE_OPS[INTERPOLATIONS.index(rng.choice(self.interpolations))])
                args.append(0.0)
                affine.extend(_affine_matrix(op.name, value, self.img_size))
            else:
                ops.append(op.device_op), args.append(value), affine.extend([0.0] * 6)
        return ops, args, affine, applied

    def _erase_boxes(self, rng: random.Random) -> list[int]:
        """timm's ``RandomErasing._erase``, draw for draw; up to ``random_erase_count`` boxes."""
        boxes = [0, 0, 0, 0] * self.erase_count
        if not self.erase_count or rng.random() > self.erase_prob:
            return boxes
        size = self.img_size
        count = 1 if self.erase_count == 1 else rng.randint(1, self.erase_count)
        for box in range(count):
            for _ in range(10):
                target_area = rng.uniform(0.02, 1 / 3) * size * size / count
                aspect = math.exp(rng.uniform(*self.log_erase_aspect))
                h = int(round(math.sqrt(target_area * aspect)))
                w = int(round(math.sqrt(target_area / aspect)))
                if w < size and h < size:
                    boxes[4 * box:4 * box + 4] = [rng.randint(0, size - h), rng.randint(0, size - w), h, w]
                    break
        return boxes
