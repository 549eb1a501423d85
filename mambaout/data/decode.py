"""Reading and decoding image files for the tensor pipelines.

JPEGs decode with TorchCodec's ``decode_jpeg`` where it is installed and works, else with torchvision's
(libjpeg-turbo on the CPU, nvJPEG on a GPU, either way); ``jpeg_decoder`` makes that choice once per process and
the manifest records it (``Pipeline.describe``). Other formats, CMYK JPEGs and whatever libjpeg-turbo's strict
decoder refuses go through PIL, whose ``convert("RGB")`` is what the ``timm`` pipeline sees. On baseline,
progressive and grey JPEGs all three give the same pixels (tests/test_decode.py; docs/DATA.md), EXIF-oriented
ones included: TorchCodec would turn those, so it decodes them without their APP1 segments (``without_app1``).

torchvision 0.29 deprecates its image decoders in favour of TorchCodec (0.16+, which needs torch >= 2.11); the
XLA environment's torch 2.9 cannot have TorchCodec, and the GPU machines' torchvision 0.26 still decodes, so
torchvision stays the fallback, its deprecation warning silenced once (when it is chosen) rather than per image.
"""
from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

_logger = logging.getLogger(__name__)

JPEG_START = b"\xff\xd8\xff"
JPEG_DECODERS = ("torchcodec", "torchvision", "PIL")  # the order ``jpeg_decoder`` tries them in


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


# --- the JPEG decoder: TorchCodec, else torchvision, else PIL; chosen once per process ----------------------------

Decode = Callable[..., "torch.Tensor | list[torch.Tensor]"]


@dataclass(frozen=True)
class JpegDecoder:
    """One library's ``decode_jpeg``: ``decode(source, mode, device)`` with ``source`` a 1-d uint8 CPU tensor or
    a list of them (then a list back: one batched call on CUDA), ``mode`` "UNCHANGED" or "RGB"."""
    name: str  # torchcodec, torchvision or PIL
    version: str
    decode: Decode

    @property
    def label(self) -> str:
        """What the manifest records, e.g. ``torchcodec 0.17.0+cu130``."""
        return f"{self.name} {self.version}"


def without_app1(data: torch.Tensor) -> torch.Tensor:
    """``data`` without the APP1 segments of its header (EXIF, XMP: metadata, no pixel data), or ``data`` itself
    when it has none. TorchCodec always turns an image by its EXIF orientation (CPU and CUDA, no option to say
    no); torchvision (``apply_exif_orientation=False``), PIL's ``open``/``convert`` (timm) and ``jpeg_header`` do
    not, so TorchCodec gets the bytes without it and decodes the stored pixels as they do."""
    view = memoryview(data.numpy())
    size, pos, start, kept = len(view), 2, 0, []
    while pos + 4 <= size and view[pos] == 0xFF:
        marker = view[pos + 1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image: no more metadata
            break
        length = (view[pos + 2] << 8) | view[pos + 3]
        if length < 2 or pos + 2 + length > size:
            break
        if marker == 0xE1:
            kept.append((start, pos))
            start = pos + 2 + length
        pos += 2 + length
    if not kept:
        return data
    kept.append((start, size))
    return torch.cat([data[begin:end] for begin, end in kept])


def _torchcodec() -> JpegDecoder:
    import torchcodec  # may fail oddly (FFmpeg libraries for its video part, a torch it was not built for)
    from torchcodec.decoders import decode_jpeg

    def decode(source, mode: str = "RGB", device: torch.device | str = "cpu"):
        if isinstance(source, (list, tuple)):
            return decode_jpeg([without_app1(data) for data in source], mode=mode, device=device)
        return decode_jpeg(without_app1(source), mode=mode, device=device)

    return JpegDecoder("torchcodec", getattr(torchcodec, "__version__", "unknown"), decode)


def _torchvision() -> JpegDecoder:
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    # 0.29 deprecates its decoders (warning on every call): used on purpose here, as the fallback
    warnings.filterwarnings("ignore", message=r".*image decoding and encoding capabilities of TorchVision are "
                            r"deprecated", category=DeprecationWarning)

    def decode(source, mode: str = "RGB", device: torch.device | str = "cpu"):
        return decode_jpeg(source, mode=ImageReadMode[mode], device=device)

    return JpegDecoder("torchvision", torchvision.__version__, decode)


def _pil() -> JpegDecoder:
    """The last resort (a torchvision without decoders and no TorchCodec): PIL on the CPU, copied to the device."""
    import PIL

    def decode(source, mode: str = "RGB", device: torch.device | str = "cpu"):
        if isinstance(source, (list, tuple)):
            return [pil_rgb(data).to(device) for data in source]
        return pil_rgb(source).to(device)

    return JpegDecoder("PIL", PIL.__version__, decode)


_LOADERS: dict[str, Callable[[], JpegDecoder]] = {"torchcodec": _torchcodec, "torchvision": _torchvision,
                                                  "PIL": _pil}
_PROBE_COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200), (128, 128, 128))


def _probe() -> tuple[torch.Tensor, torch.Tensor]:
    """A 16x16 JPEG of four flat 8x8 blocks, unsubsampled (any decoder returns their colours to within a grey level
    or two), with an EXIF orientation that must not be applied (``without_app1``), and those colours as uint8
    ``[3, 16, 16]``."""
    pixels = np.zeros((16, 16, 3), np.uint8)
    for index, colour in enumerate(_PROBE_COLOURS):
        row, col = divmod(index, 2)
        pixels[8 * row:8 * row + 8, 8 * col:8 * col + 8] = colour
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    return torch.frombuffer(bytearray(encoded.getvalue()), dtype=torch.uint8), torch.from_numpy(pixels).permute(2, 0, 1)


def check_decoder(decoder: JpegDecoder, device: torch.device | str = "cpu") -> None:
    """Raises unless ``decoder`` decodes the probe JPEG right on ``device``, alone and as a batch of two."""
    data, expected = _probe()
    single = decoder.decode(data, "UNCHANGED" if torch.device(device).type == "cpu" else "RGB", device)
    batch = decoder.decode([data, data], "RGB", device)
    if not isinstance(batch, list) or len(batch) != 2:
        raise RuntimeError(f"a batch of 2 JPEGs decoded to {type(batch).__name__} of {len(batch)}")
    for image in (single, *batch):
        if image.shape != expected.shape or image.dtype != torch.uint8:
            raise RuntimeError(f"the probe JPEG decoded to {tuple(image.shape)} {image.dtype}, not (3, 16, 16) uint8")
        error = (image.cpu().int() - expected.int()).abs().max().item()
        if error > 3:
            raise RuntimeError(f"the probe JPEG decoded {error} grey levels off its colours")


def load_decoder(name: str, device: torch.device | str = "cpu") -> JpegDecoder:
    """The named decoder (of ``JPEG_DECODERS``), checked on the probe JPEG on ``device``; raises if it does not
    import or decodes wrong."""
    decoder = _LOADERS[name]()
    check_decoder(decoder, device)
    return decoder


_lock = threading.Lock()
_chosen: JpegDecoder | None = None
_on_device: dict[str, JpegDecoder] = {}


def jpeg_decoder() -> JpegDecoder:
    """This process's JPEG decoder: the first of ``JPEG_DECODERS`` that imports and decodes the probe JPEG right
    on the CPU, chosen on the first call (one log line says which, and why not the ones before it)."""
    global _chosen
    with _lock:
        if _chosen is None:
            _chosen = _choose("cpu", JPEG_DECODERS)
        return _chosen


def _choose(device: str, names: tuple[str, ...]) -> JpegDecoder:
    refused = []
    for name in names:
        try:
            decoder = load_decoder(name, device)
        except ModuleNotFoundError as error:
            refused.append(f"{name} is not installed" if error.name == name else f"{name}: {error}")
            continue
        except Exception as error:  # noqa: BLE001 - an import or a decode that fails in any way: not this one
            refused.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            continue
        broken = [reason for reason in refused if "is not installed" not in reason]
        (_logger.warning if broken else _logger.info)(
            "JPEG decoding on %s: %s%s", device, decoder.label, f" ({'; '.join(refused)})" if refused else "")
        return decoder
    raise RuntimeError(f"no JPEG decoder works on {device}: {'; '.join(refused)}")


def _decoder_on(device: torch.device) -> JpegDecoder:
    """The decoder for ``device``: the process's one, checked once on that device; where it fails there (say a
    TorchCodec built without CUDA), the next library that works there, else the CPU's decoding copied over."""
    decoder = jpeg_decoder()
    if device.type == "cpu":
        return decoder
    key = str(device)
    with _lock:
        if key not in _on_device:
            libraries = tuple(name for name in JPEG_DECODERS[JPEG_DECODERS.index(decoder.name):] if name != "PIL")
            if not libraries:  # PIL's decoding copies to the device itself
                _on_device[key] = decoder
                return decoder
            try:
                _on_device[key] = _choose(key, libraries)
            except RuntimeError as error:
                _logger.warning("%s: decoding on the CPU with %s and copying", error, decoder.label)
                _on_device[key] = _via_cpu(decoder)
        return _on_device[key]


def _via_cpu(decoder: JpegDecoder) -> JpegDecoder:
    def decode(source, mode: str = "RGB", device: torch.device | str = "cpu"):
        if isinstance(source, (list, tuple)):
            return [decoder.decode(data, mode).to(device) for data in source]
        return decoder.decode(source, mode).to(device)

    return JpegDecoder(decoder.name, f"{decoder.version} (on the CPU)", decode)


def reset_jpeg_decoder() -> None:
    """Forgets the choice (tests; the next call chooses again)."""
    global _chosen
    with _lock:
        _chosen = None
        _on_device.clear()


# --- decoding ----------------------------------------------------------------------------------------------------

def decode_rgb(data: torch.Tensor) -> torch.Tensor:
    """uint8 ``[3, h, w]`` RGB of an encoded image; raises on unreadable data."""
    if is_jpeg(data):
        try:
            image = jpeg_decoder().decode(data, "UNCHANGED")
        except (RuntimeError, ValueError):
            image = None  # PIL below reads some files libjpeg-turbo's strict mode refuses, or raises itself
        if image is not None and image.shape[0] in (1, 3):  # grey is replicated, as PIL's L -> RGB; CMYK: PIL's
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
    device = torch.device(device)
    decoder = _decoder_on(device)
    try:
        return list(decoder.decode(jpegs, "RGB", device))
    except (RuntimeError, ValueError) as error:
        _logger.info("batched JPEG decoding on %s failed (%s); decoding file by file", device, error)
    images: list[torch.Tensor | None] = []
    for data in jpegs:
        try:
            images.append(decoder.decode(data, "RGB", device))
        except (RuntimeError, ValueError):
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
