"""The tensor augmentation shared by every pipeline and device: RandAugment's ops, random erasing and
normalisation applied to uint8 image batches from the plans of ``plan.py``.

Each op reproduces the PIL operation timm calls, in integer or float32 arithmetic that follows Pillow's C code
(its rounding, its fixed-point grey conversion, its 3x3 smoothing order, its affine sampling convention), so
the colour ops agree with timm's PIL result to 0-1 grey levels; docs/DATA.md has the measured table.

``Augmenter`` applies a batch of plans in one of two ways, with the same op functions:
* grouped (eager devices): for each RandAugment layer the batch is ordered by op and every op runs once, on the
  contiguous slice of the samples that drew it; the grouping is computed on the host from the plan;
* masked (``fixed_shapes``, XLA): every op runs on the whole batch and ``where`` keeps it for the samples that
  drew it, so shapes never depend on the draws and one compiled graph serves every batch. Geometry then samples
  through gathers, which XLA lowers (its ``grid_sample`` falls back to the host).
Each sample's result depends on its own plan only, so neither the batch composition nor the device count nor
the choice between workers and device changes a pixel (on one device type: bit for bit).
"""
from __future__ import annotations

import functools
import itertools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import plan as P
from .sampling import keyed_normal

NOISE_TABLE_KEY = 0x6D616D62616F7574  # b"mambaout"
TRUNCATION_SLACK = 1e-3
"""Added before truncating a resampled value: PIL interpolates in double precision, float32 lands a few 1e-5
below integers that PIL hits exactly (flat areas), which truncation would turn into one grey level less."""

Op = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 1, 1, 1)


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """``x[i, c] -> lut[i, c, x]`` for a lookup table ``[n, 1 or c, 256]``: one gather (PIL's ``point``)."""
    n, c, h, w = x.shape
    return lut.expand(n, c, 256).gather(2, x.reshape(n, c, h * w).to(torch.int64)).reshape(n, c, h, w)


def _levels(x: torch.Tensor) -> torch.Tensor:
    """The 256 grey levels, int32 ``[1, 1, 256]``, for building lookup tables."""
    return torch.arange(256, dtype=torch.int32, device=x.device).reshape(1, 1, 256)


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, image, factor)`` (ImageEnhance): float32 ``in1 + alpha * (in2 - in1)``,
    clipped and truncated as Pillow's C loop does."""
    degenerate = degenerate.to(torch.float32)
    blended = degenerate + _per_sample(factor) * (image.to(torch.float32) - degenerate)
    return blended.clamp_(0, 255).to(torch.uint8)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion (ITU-R 601-2 in 16-bit fixed point) as float32 ``[n, 1, h, w]``: every
    intermediate is an integer below 2**24, so float32 holds it exactly."""
    r, g, b = x.to(torch.float32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) * (1 / 65536)).floor_().unsqueeze(1)


def autocontrast(x, args, matrix, fill, gather):
    """``ImageOps.autocontrast``: each channel stretched from its [min, max] to [0, 255] (unchanged when flat).
    PIL's ``int(ix * scale + offset)`` in exact integer arithmetic."""
    low = x.amin(dim=(2, 3), keepdim=True).to(torch.int32).squeeze(-1)  # [n, c, 1]
    span = x.amax(dim=(2, 3), keepdim=True).to(torch.int32).squeeze(-1) - low
    levels = _levels(x)
    stretched = ((levels - low).clamp_(min=0) * 255 // span.clamp(min=1)).clamp_(max=255)
    return _apply_lut(x, torch.where(span > 0, stretched, levels).to(torch.uint8))


def equalize(x, args, matrix, fill, gather):
    """``ImageOps.equalize``: per channel, PIL's lookup table from the cumulative histogram."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).to(torch.int64)
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    last_bin = 255 - (hist.flip(1) > 0).to(torch.int32).argmax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, last_bin.to(torch.int64))) // 255
    below = hist.cumsum(1) - hist  # pixels in the bins below each one
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp_(max=255)
    lut = torch.where(((hist > 0).sum(1, keepdim=True) > 1) & (step > 0), lut, _levels(x).reshape(1, 256))
    return lut.to(torch.uint8).gather(1, flat).reshape(n, c, h, w)


def invert(x, args, matrix, fill, gather):
    return 255 - x


def posterize(x, args, matrix, fill, gather):
    """``ImageOps.posterize`` keeping ``args`` bits; 0 bits gives black (Pillow <= 12; 13 raises there)."""
    bits = args.to(torch.int32)
    mask = (torch.full_like(bits, 0xFF) << (8 - bits)) & 0xFF  # both operands int32: XLA shifts like types only
    return _apply_lut(x, (_levels(x) & mask.reshape(-1, 1, 1)).to(torch.uint8))


def solarize(x, args, matrix, fill, gather):
    """``ImageOps.solarize``: values at or above the threshold inverted."""
    levels = _levels(x)
    return _apply_lut(x, torch.where(levels < args.reshape(-1, 1, 1), levels, 255 - levels).to(torch.uint8))


def solarize_add(x, args, matrix, fill, gather):
    """timm's ``solarize_add``: ``args`` added (capped at 255) to values below 128."""
    levels = _levels(x)
    added = (levels + args.to(torch.int32).reshape(-1, 1, 1)).clamp_(max=255)
    return _apply_lut(x, torch.where(levels < 128, added, levels).to(torch.uint8))


def color(x, args, matrix, fill, gather):
    """``ImageEnhance.Color``: blend with the image's grey version."""
    return _blend(_grey(x), x, args)


def contrast(x, args, matrix, fill, gather):
    """``ImageEnhance.Contrast``: blend with the mean grey level, ``int(mean + 0.5)`` in integers."""
    grey = _grey(x).to(torch.int32)
    count = grey.shape[-1] * grey.shape[-2]
    mean = (2 * grey.sum(dim=(1, 2, 3), dtype=torch.int64) + count) // (2 * count)
    return _blend(_per_sample(mean), x, args)


def brightness(x, args, matrix, fill, gather):
    """``ImageEnhance.Brightness``: blend with black, ``0 + alpha * (x - 0)``."""
    return (x.to(torch.float32) * _per_sample(args)).clamp_(0, 255).to(torch.uint8)


# Pillow's kernel weights, divided in float32 as Pillow scales its kernel; kept as Python numbers (exact float32
# values) so no per-batch tensor is copied to the device for them.
_SMOOTH_SIDE = (torch.tensor(1.0) / torch.tensor(13.0)).item()
_SMOOTH_CENTRE = (torch.tensor(5.0) / torch.tensor(13.0)).item()


def sharpness(x, args, matrix, fill, gather):
    """``ImageEnhance.Sharpness``: blend with ``ImageFilter.SMOOTH`` of the image (3x3, border pixels kept),
    summed in Pillow's order so the smoothed image is bit-identical to Pillow's."""
    values = x.to(torch.float32)
    side, centre = _SMOOTH_SIDE, _SMOOTH_CENTRE

    def row(r: torch.Tensor, middle: float) -> torch.Tensor:
        return r[..., :-2] * side + r[..., 1:-1] * middle + r[..., 2:] * side

    total = 0.5 + row(values[..., 2:, :], side)
    total += row(values[..., 1:-1, :], centre)
    total += row(values[..., :-2, :], side)
    smooth = values.clone()
    smooth[..., 1:-1, 1:-1] = total.clamp_(0, 255).trunc_()
    return _blend(smooth, values, args)


def _cubic_weights(t: torch.Tensor) -> list[torch.Tensor]:
    """The cubic convolution weights of torch's bicubic ``grid_sample`` (A = -0.75) for taps -1, 0, 1, 2."""
    a = -0.75

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _sample_by_gathers(values: torch.Tensor, ix: torch.Tensor, iy: torch.Tensor, bicubic: bool) -> torch.Tensor:
    """``grid_sample(..., padding_mode='border', align_corners=False)`` at source positions ``ix, iy`` (pixel
    units, centres at integers) written with gathers, which XLA compiles natively."""
    n, c, h, w = values.shape
    x0, y0 = ix.floor(), iy.floor()
    tx, ty = ix - x0, iy - y0
    if bicubic:
        offsets, wx, wy = (-1, 0, 1, 2), _cubic_weights(tx), _cubic_weights(ty)
    else:
        offsets, wx, wy = (0, 1), [1 - tx, tx], [1 - ty, ty]
    flat = values.reshape(n, c, h * w)
    columns = [(x0.to(torch.int64) + o).clamp(0, w - 1) for o in offsets]
    result = 0
    for oy, weight_y in zip(offsets, wy):
        rows = (y0.to(torch.int64) + oy).clamp(0, h - 1) * w
        line = 0
        for column, weight_x in zip(columns, wx):
            index = (rows + column).reshape(n, 1, h * w).expand(n, c, h * w)
            line = line + flat.gather(2, index).reshape(n, c, h, w) * weight_x.unsqueeze(1)
        result = result + line * weight_y.unsqueeze(1)
    return result


@functools.lru_cache(maxsize=8)
def _pixel_centres(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + 0.5`` and ``y + 0.5`` of every output pixel, each ``[1, h, w]``: computed on the CPU and copied once per
    size and device (no copy per batch; on XLA the cached tensors are device data from the first graph on)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                            indexing="ij")
    return xs[None].to(device), ys[None].to(device)


def _source_grid(matrix: torch.Tensor, h: int, w: int, device: torch.device) -> torch.Tensor:
    """``grid_sample``'s normalised input positions ``[n, h, w, 2]`` for PIL's inverse affine ``matrix``
    (output pixel centre ``(x + 0.5, y + 0.5)`` -> input position, then to [-1, 1]). Multiplied out elementwise,
    not as a matrix product: where TF32 or bf16 matmuls are allowed (``runtime.matmul_precision``) a product would
    round the positions (~0.1 px at 224 with TF32, ~0.8 px with bf16)."""
    xs, ys = _pixel_centres(h, w, device)
    m = matrix.reshape(-1, 6, 1, 1)
    grid_x = (m[:, 0] * xs + m[:, 1] * ys + m[:, 2]) * (2 / w) - 1
    grid_y = (m[:, 3] * xs + m[:, 4] * ys + m[:, 5]) * (2 / h) - 1
    return torch.stack([grid_x, grid_y], dim=-1)


def _resampled(sampled: torch.Tensor, inside: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """PIL's output of a transform: ``fill`` where the source position left the image, else the interpolated
    value clipped and truncated (PIL's ``(UINT8)v``)."""
    sampled = torch.where(inside, sampled, fill.to(torch.float32).reshape(1, -1, 1, 1))
    return sampled.clamp_(0, 255).add_(TRUNCATION_SLACK).to(torch.uint8)


def _affine(x: torch.Tensor, matrix: torch.Tensor, fill: torch.Tensor, bicubic: bool, gather: bool) -> torch.Tensor:
    """PIL's ``Image.transform(AFFINE)`` (timm's Rotate, ShearX/Y, TranslateX/Y): output pixel centre
    ``(x + 0.5, y + 0.5)`` maps through ``matrix`` to an input position; positions outside the image take
    ``fill``; inside, taps beyond the edge repeat the edge. Bilinear is PIL's filter; bicubic uses torch's
    kernel (A = -0.75; PIL's affine bicubic has A = -1)."""
    n, c, h, w = x.shape
    grid = _source_grid(matrix, h, w, x.device)
    inside = (grid.abs().amax(-1) < 1).unsqueeze(1)  # PIL tests the position before interpolating
    values = x.to(torch.float32)
    if gather:
        sampled = _sample_by_gathers(values, (grid[..., 0] + 1) * (w / 2) - 0.5, (grid[..., 1] + 1) * (h / 2) - 0.5,
                                     bicubic)
    else:
        sampled = F.grid_sample(values, grid, mode="bicubic" if bicubic else "bilinear", padding_mode="border",
                                align_corners=False)
    return _resampled(sampled, inside, fill)


def affine_bilinear(x, args, matrix, fill, gather):
    return _affine(x, matrix, fill, bicubic=False, gather=gather)


def affine_bicubic(x, args, matrix, fill, gather):
    return _affine(x, matrix, fill, bicubic=True, gather=gather)


OPS: tuple[Op, ...] = (autocontrast, equalize, invert, posterize, solarize, solarize_add, color, contrast,
                       brightness, sharpness, affine_bilinear, affine_bicubic)
"""Indexed by the device op ids of ``plan.py``."""
assert OPS.index(brightness) == P.BRIGHTNESS and OPS.index(affine_bicubic) == P.AFFINE_BICUBIC


_noise_tables: dict[torch.device, torch.Tensor] = {}


def noise_table(device: torch.device, length: int) -> torch.Tensor:
    """At least ``length`` standard normal values, the same on every machine and device (``keyed_normal`` of
    their positions, computed on the CPU, then copied): erased pixels take the values from their sample's keyed
    offset on, in the order of their positions in the image, so erasing noise needs no generator on the device,
    no transfer from the host and, for a box, only a strided view of the table."""
    table = _noise_tables.get(device)
    if table is None or len(table) < length:
        table = keyed_normal(torch.tensor(NOISE_TABLE_KEY), torch.arange(length)).to(device)
        _noise_tables[device] = table
    return table


def _noise_table_for(images: torch.Tensor, boxes: int) -> torch.Tensor:
    """The table covering every offset (< 2**NOISE_TABLE_BITS) plus the pixels and box colours of an image."""
    h, w = images.shape[-2:]
    return noise_table(images.device, (1 << P.NOISE_TABLE_BITS) + 3 * h * w + 3 * boxes)


class Augmenter:
    """Applies batches of plans: RandAugment (uint8), then ``x / 255``, normalisation and random erasing, as
    timm's ``RandAugment -> ToTensor -> Normalize -> RandomErasing``.

    ``images`` are uint8 ``[n, 3, h, w]`` on the compute device (the grouped path may write into them);
    ``plan`` holds host tensors (``plan.py``); ``to_device`` moves a batch tensor to the compute device
    (sharded on XLA).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], fill: Sequence[int], erase_mode: str,
                 fixed_shapes: bool = False) -> None:
        self.mean, self.std = torch.tensor(mean).reshape(3, 1, 1), torch.tensor(std).reshape(3, 1, 1)
        self.fill = torch.tensor(fill, dtype=torch.uint8)
        self.erase_mode = erase_mode
        self.fixed_shapes = fixed_shapes
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mean, std and fill on ``device``. Eager devices keep one copy each: a copy per batch is a blocking
        host-to-device copy on CUDA, a host sync that would stall the host behind the queued step. Traced devices
        (``fixed_shapes``) copy per batch: there the copy is a graph input, and under XLA SPMD one tensor reused
        by the training and evaluation graphs made a graph more."""
        if self.fixed_shapes:
            return self.mean.to(device), self.std.to(device), self.fill.to(device)
        if device not in self._on_device:
            self._on_device[device] = (self.mean.to(device), self.std.to(device), self.fill.to(device))
        return self._on_device[device]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> float32 ``(x / 255 - mean) / std``, the operations of ToTensor and Normalize."""
        mean, std, _ = self._constants(images.device)
        return images.to(torch.float32).div_(255).sub_(mean).div_(std)

    def __call__(self, images: torch.Tensor, plan: dict[str, torch.Tensor],
                 to_device: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if plan["ops"].shape[1]:
            apply = self._rand_augment_masked if self.fixed_shapes else self._rand_augment_grouped
            images = apply(images, plan, to_device)
        images = self.normalize(images)
        if not plan["erase"].shape[1]:
            return images
        erase = self._erase_masked if self.fixed_shapes else self._erase_grouped
        return erase(images, plan, to_device)

    # --- RandAugment ---------------------------------------------------------------------------------------
    def _rand_augment_grouped(self, x, plan, to_device):
        fill = self._constants(x.device)[2]
        ops = plan["ops"].tolist()
        natural = list(range(len(ops)))
        order = natural  # position in x -> sample
        for layer in range(len(ops[0])):
            by_op = sorted(natural, key=lambda position: ops[order[position]][layer])
            if by_op != natural:  # each op's samples made contiguous
                x, order = x[to_device(torch.tensor(by_op))], [order[position] for position in by_op]
            rows = slice(None) if order == natural else torch.tensor(order)
            args, matrices = to_device(plan["args"][rows, layer]), to_device(plan["affine"][rows, layer])
            start = 0
            for op, run in itertools.groupby(ops[sample][layer] for sample in order):
                end = start + len(list(run))
                if op != P.NO_OP:
                    x[start:end] = OPS[op](x[start:end], args[start:end], matrices[start:end], fill, False)
                start = end
        if order != natural:
            x = x[to_device(torch.argsort(torch.tensor(order)))]
        return x

    def _rand_augment_masked(self, x, plan, to_device):
        fill = self._constants(x.device)[2]
        ops, args, matrices = (to_device(plan[key]) for key in ("ops", "args", "affine"))
        for layer in range(ops.shape[1]):
            for op_id, op in enumerate(OPS):
                drew = _per_sample(ops[:, layer] == op_id)
                x = torch.where(drew, op(x, args[:, layer], matrices[:, layer], fill, True), x)
        return x

    # --- random erasing ------------------------------------------------------------------------------------
    def _box_values(self, table: torch.Tensor, offset, box: int, image_size: tuple[int, int]) -> torch.Tensor:
        """The ``rand`` or ``const`` value of box ``box``: a colour per channel (``[3, 1, 1]``, or per sample
        ``[n, 3, 1, 1]``), table entries past every pixel's."""
        if self.erase_mode == "const":
            return torch.zeros((), device=table.device)
        height, width = image_size
        channels = torch.arange(3, device=table.device).reshape(3, 1, 1)
        return table[offset + 3 * height * width + box * 3 + channels]

    def _erase_grouped(self, images, plan, to_device):
        """Per sample and box, on the host-known boxes: pixel noise is a strided view of the table."""
        n, c, h, w = images.shape
        table = _noise_table_for(images, plan["erase"].shape[1])
        for index, (boxes, offset) in enumerate(zip(plan["erase"].tolist(), plan["noise"].tolist())):
            for box, (top, left, box_h, box_w) in enumerate(boxes):
                if not box_h:
                    continue
                region = images[index, :, top:top + box_h, left:left + box_w]
                if self.erase_mode == "pixel":
                    region.copy_(table.as_strided((c, box_h, box_w), (h * w, w, 1), offset + top * w + left))
                else:
                    region.copy_(self._box_values(table, offset, box, (h, w)).expand_as(region))
        return images

    def _erase_masked(self, images, plan, to_device):
        """Every sample, every box, through masks; the same values as ``_erase_grouped``."""
        n, c, h, w = images.shape
        table = _noise_table_for(images, plan["erase"].shape[1])
        boxes, offsets = to_device(plan["erase"]), to_device(plan["noise"]).reshape(n, 1, 1, 1)
        rows = torch.arange(h, device=images.device).reshape(1, 1, h, 1)
        columns = torch.arange(w, device=images.device).reshape(1, 1, 1, w)
        channels = torch.arange(c, device=images.device).reshape(1, c, 1, 1)
        if self.erase_mode == "pixel":
            fill = table[offsets + (channels * h + rows) * w + columns]
        for box in range(boxes.shape[1]):
            top, left, box_h, box_w = (_per_sample(v) for v in boxes[:, box].unbind(1))
            inside = (rows >= top) & (rows < top + box_h) & (columns >= left) & (columns < left + box_w)
            if self.erase_mode != "pixel":
                fill = self._box_values(table, offsets, box, (h, w))
            images = torch.where(inside, fill, images)
        return images
