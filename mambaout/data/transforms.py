"""Train and eval transforms and Mixup/CutMix, built with timm.

Defaults are the published MambaOut recipe: random-resized crop (scale 0.08-1, ratio 3/4-4/3) with a
random bilinear/bicubic interpolation, horizontal flip, RandAugment ``rand-m9-mstd0.5-inc1``, random
erasing 0.25 (pixel mode, one box) on CPU; evaluation resizes (bicubic) and centre-crops at crop_pct 1.0.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, auto_augment, create_transform
from timm.data.mixup import cutmix_bbox_and_lam, one_hot
from torchvision import transforms as tv_transforms

from .sampling import seeded_rngs


# Posterize with 0 bits, identical on every Pillow version.
# timm's increasing-severity posterize ("inc1" RandAugment, as in the recipe) keeps 4 - int(m / 10 * 4)
# bits; magnitude noise clipped at 10 gives 0 bits. Pillow <= 12 returned an all-black image there (the
# behaviour the reference trained with); Pillow 13 raises "bits must be between or equal to 1 and 8" and
# would crash training after a few hundred images. We register an op that keeps the old result.
_timm_posterize = auto_augment.posterize


def _posterize_black_at_zero_bits(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    if bits_to_keep < 1:
        return image.point(lambda _: 0)
    return _timm_posterize(image, bits_to_keep, **kwargs)


auto_augment.NAME_TO_OP.update({name: _posterize_black_at_zero_bits
                                for name, op in auto_augment.NAME_TO_OP.items() if op is _timm_posterize})


def build_train_transform(
        img_size: int,
        *,
        rand_augment: str | None = "rand-m9-mstd0.5-inc1",
        random_erase_prob: float = 0.25,
        random_erase_mode: str = "pixel",
        random_erase_count: int = 1,
        crop_scale: Sequence[float] = (0.08, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        interpolation: str = "random",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> tv_transforms.Compose:
    """PIL image -> normalised tensor with the training augmentation (``rand_augment=None`` disables
    RandAugment). All draws use python ``random``, numpy and torch CPU RNGs, which the dataset seeds
    per sample."""
    return create_transform(
        img_size,
        is_training=True,
        scale=tuple(crop_scale),
        ratio=tuple(crop_ratio),
        hflip=hflip,
        color_jitter=None,  # the recipe has none (DeiT-style trainers drop it whenever RandAugment is on)
        auto_augment=rand_augment or None,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
        re_prob=random_erase_prob,
        re_mode=random_erase_mode,
        re_count=random_erase_count,
    )


def build_eval_transform(
        img_size: int,
        *,
        crop_pct: float = 1.0,
        interpolation: str = "bicubic",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> tv_transforms.Compose:
    """PIL image -> normalised tensor: resize the short side to ``img_size / crop_pct``, centre-crop ``img_size``."""
    return create_transform(
        img_size,
        is_training=False,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
    )


def build_mixup(mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float, mode: str,
                label_smoothing: float, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix (which also smooths the labels), or None when no sample would ever be mixed
    (both alphas 0, or ``prob`` 0); the loss then applies label smoothing itself."""
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or prob <= 0:
        return None
    return FixedShapeMixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                           mode=mode, label_smoothing=label_smoothing, num_classes=num_classes)


class FixedShapeMixup(Mixup):
    """timm's Mixup/CutMix (batch mode) computed as one fixed graph: ``where(box, flipped, blend)``.

    The random draws are timm's and every pixel and target equals timm's result, but neither the CutMix box's size
    nor the Mixup/CutMix choice nor lam changes the operations, so a compiled step (XLA) is built once, not once
    per draw. The per-sample modes (``pair``, ``elem``) are timm's own.
    """

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode != "batch":
            return super().__call__(x, target)
        lam, use_cutmix = self._params_per_batch()
        top = bottom = left = right = 0  # Mixup: an empty box, every pixel blended
        blend = lam
        if use_cutmix:  # the box pasted, the rest kept (blend 1)
            (top, bottom, left, right), lam = cutmix_bbox_and_lam(
                x.shape, lam, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam)
            blend = 1.0
        # Every number one tensor, sent in one copy: XLA bakes Python numbers into the graph as constants, so each
        # lam and box would be a graph of its own. The weights are rounded from their Python floats, exactly as
        # timm's scalars are; the box bounds are exact in float32. Pinned and not blocking: on CUDA a copy from
        # pageable memory, blocking or not, would wait for the queued work.
        params = torch.tensor([blend, 1.0 - blend, lam, 1.0 - lam, top, bottom, left, right],
                              dtype=torch.float32, pin_memory=x.is_cuda).to(x.device, non_blocking=True)
        weights, bounds = params[:4], params[4:]
        rows = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)
        cols = torch.arange(x.shape[-1], device=x.device, dtype=torch.float32)
        box = (((rows >= bounds[0]) & (rows < bounds[1]))[:, None]
               & ((cols >= bounds[2]) & (cols < bounds[3]))[None, :])
        flipped = x.flip(0)
        x.copy_(torch.where(box, flipped, x * weights[0] + flipped * weights[1]))
        off_value = self.label_smoothing / self.num_classes
        y = one_hot(target, self.num_classes, on_value=1.0 - self.label_smoothing + off_value, off_value=off_value)
        return x, y * weights[2] + y.flip(0) * weights[3]


def mixup_micro_batch(mixup: Mixup, images: torch.Tensor, targets: torch.Tensor,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixes one micro-batch (``images`` in place) and returns ``(images, soft_targets)``.

    timm draws from numpy's global RNG; seeding it here makes the draw a pure function of ``seed``
    (``derive_seed(seed, "mix", step, micro)`` in the loop), whatever the sharding.
    """
    if len(images) % 2:
        raise ValueError(f"Mixup/CutMix pairs each sample with its mirror in the micro-batch, so the micro-batch "
                         f"size must be even, got {len(images)}")
    with seeded_rngs(seed):
        return mixup(images, targets)
