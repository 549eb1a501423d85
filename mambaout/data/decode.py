"""Reading and decoding image files for the tensor pipelines.

JPEGs decode with ``torchvision.io.decode_jpeg`` (libjpeg-turbo on the CPU, nvJPEG on a GPU); other formats,
CMYK JPEGs and whatever libjpeg-turbo's strict decoder refuses go through PIL, whose ``convert("RGB")`` is what
the ``timm`` pipeline sees. On baseline and progressive RGB JPEGs both decoders give the same pixels.

torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec; they still work, from 0.26 (the
GPU machines' version) to 0.29, and the deprecation warning is silenced here, once, rather than per image.
"""
from __future__ import annotations

import io
import logging
import os
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

_logger = logging.getLogger(__name__)

JPEG_START = b"\xff\xd8\xff"
warnings.filterwarnings("ignore", message=r".*image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)


def read_bytes(path: str) -> torch.Tensor:
    """The file's bytes as a uint8 tensor (writable, so torch shares it without a copy)."""
    with open(path, "rb") as file:
        data = bytearray(os.fstat(file.fileno()).st_size)
        file.readinto(data)
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def is_jpeg(data: torch.Tensor) -> bool:
    return bytes(data[:3].tolist()) == JPEG_START


def pil_rgb(data: torch.Tensor) -> torch.Tensor:
    """PIL's decoding and RGB conversion (what timm's pipeline sees), as uint8 ``[3, h, w]``."""
    with Image.open(io.BytesIO(data.numpy())) as image:
        rgb = np.array(image.convert("RGB"))  # decodes fully: truncated files fail here
    return torch.from_numpy(rgb).permute(2, 0, 1)


def decode_rgb(data: torch.Tensor) -> torch.Tensor:
    """uint8 ``[3, h, w]`` RGB of an encoded image; raises on unreadable data."""
    if is_jpeg(data):
        try:
            image = decode_jpeg(data, mode=ImageReadMode.UNCHANGED)
        except RuntimeError:
            image = None  # PIL below reads some files libjpeg-turbo's strict mode refuses, or raises itself
        if image is not None and image.shape[0] in (1, 3):  # grey is replicated, as PIL's L -> RGB
            return image.expand(3, -1, -1) if image.shape[0] == 1 else image
    return pil_rgb(data)


def jpeg_header(data: torch.Tensor) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG that nvJPEG can decode to RGB (colour or grey), from its header alone;
    None for other files (decoded on the CPU instead). Raises on a header PIL cannot parse."""
    if not is_jpeg(data):
        return None
    with Image.open(io.BytesIO(data.numpy())) as image:  # reads the header, not the pixels
        return image.size if image.mode in ("RGB", "L") else None


def decode_jpegs_on(device: torch.device, jpegs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Decodes host JPEG byte tensors to uint8 ``[3, h, w]`` images on ``device``: one batched call (nvJPEG on
    CUDA) and, if that refuses the batch, file by file, each one that ``device`` cannot decode through the CPU
    decoders of ``decode_rgb``. None for a file that no decoder reads (its header looked sound to the worker)."""
    if not jpegs:
        return []
    try:
        return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as error:
        _logger.info("batched JPEG decoding on %s failed (%s); decoding file by file", device, error)
    images: list[torch.Tensor | None] = []
    for data in jpegs:
        try:
            images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            try:
                images.append(decode_rgb(data).to(device))
            except Exception as error:  # noqa: BLE001 - Pillow raises many types on malformed data
                _logger.warning("undecodable JPEG (%s: %s): a blank image takes its place", type(error).__name__,
                                error)
                images.append(None)
    return images


def looks_complete(data: torch.Tensor) -> bool:
    """Whether a JPEG ends with its end-of-image marker (padding after it allowed): a truncated file does not.
    The check the workers of the ``nvjpeg`` pipeline can afford instead of decoding."""
    tail = bytes(data[-64:].tolist()).rstrip(b"\x00\n\r ")
    return tail.endswith(b"\xff\xd9")
