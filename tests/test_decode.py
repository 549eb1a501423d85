"""JPEG decoding through TorchCodec where it works, torchvision's decoders as the fallback, PIL for the rest.

The three give the same pixels on the project's test photos (baseline, progressive, 4:2:0 and 4:4:4, grey, odd
sizes, EXIF orientations: TorchCodec would apply them, nobody else does); CMYK JPEGs and other formats go to PIL
whichever decoder was chosen; the choice falls back when TorchCodec cannot be imported (or imports but decodes
wrong), and the manifest records it.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import tiny_overrides
from mambaout.config import load_config
from mambaout.data import decode as D
from mambaout.data import fidelity
from mambaout.data.decode import decode_jpegs_on, decode_rgb, read_bytes
from mambaout.trainer import train


@pytest.fixture(autouse=True)
def fresh_choice():
    """Each test chooses the decoder afresh, and leaves no patched choice behind."""
    D.reset_jpeg_decoder()
    yield
    D.reset_jpeg_decoder()


def loaded(name: str, device: str = "cpu") -> D.JpegDecoder:
    try:
        return D.load_decoder(name, device)
    except Exception as error:  # noqa: BLE001 - not installed, or does not load with this torch
        pytest.skip(f"{name} does not decode here ({type(error).__name__}: {error})")


def torchcodec_works() -> bool:
    try:
        D.load_decoder("torchcodec")
    except Exception:  # noqa: BLE001
        return False
    return True


def without_torchcodec(monkeypatch) -> None:
    """``import torchcodec`` fails from here on, as in an environment without it (the XLA one)."""
    for module in [name for name in sys.modules if name == "torchcodec" or name.startswith("torchcodec.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "torchcodec", None)


@pytest.fixture(scope="module")
def photo_jpegs(tmp_path_factory, image_root) -> list[Path]:
    """JPEGs of real photos (scikit-learn's, at 64 px and at odd sizes) and of the conftest images: baseline and
    progressive, 4:2:0 and 4:4:4, colour and grey, some with an EXIF orientation (and XMP) in their header."""
    root = tmp_path_factory.mktemp("decode")
    paths = []

    def save(image: Image.Image, name: str, **options) -> None:
        paths.append(root / f"{name}.jpg")
        image.save(paths[-1], quality=options.pop("quality", 90), **options)

    for index, photo in enumerate(fidelity.sample_photos(12, 64) + fidelity.sample_photos(4, 227, seed=1)):
        save(photo, f"photo{index}", progressive=index % 2 == 1, subsampling=2 if index % 3 else 0)
        if index % 4 == 0:
            save(photo.convert("L"), f"grey{index}", progressive=index % 8 == 0)
    save(fidelity.sample_photos(1, 64)[0].resize((333, 251)), "odd", quality=75)
    for orientation in range(2, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        photo = fidelity.sample_photos(1, 64, seed=orientation)[0].resize((48, 64))
        extra = {"xmp": b'<x:xmpmeta xmlns:x="adobe:ns:meta/"/>'} if orientation == 8 else {}  # a second APP1
        if orientation == 5:
            save(photo.convert("L"), "grey_exif5", exif=exif.tobytes())
        else:
            save(photo, f"exif{orientation}", exif=exif.tobytes(), progressive=orientation % 2 == 0, **extra)
    for index, path in enumerate(sorted(image_root.rglob("*.png"))[::6]):
        save(Image.open(path), f"conftest{index}", quality=92, progressive=index % 2 == 0)
    return paths


def test_torchcodec_torchvision_and_pil_give_the_same_pixels(photo_jpegs):
    codec, vision = loaded("torchcodec"), loaded("torchvision")
    data = [read_bytes(str(path)) for path in photo_jpegs]
    for path, encoded in zip(photo_jpegs, data):
        ours, theirs = codec.decode(encoded, "UNCHANGED"), vision.decode(encoded, "UNCHANGED")
        assert ours.shape[0] == (1 if path.name.startswith("grey") else 3), path
        assert tuple(ours.shape[1:]) == D.jpeg_header(encoded)[::-1], path  # never turned by its EXIF orientation
        assert torch.equal(ours, theirs), path
        assert torch.equal(codec.decode(encoded, "RGB"), vision.decode(encoded, "RGB")), path
    batch = codec.decode(data, "RGB")  # the batched call, on the CPU one file after another
    assert all(torch.equal(image, codec.decode(encoded, "RGB")) for image, encoded in zip(batch, data))
    assert D.jpeg_decoder().name == "torchcodec"
    assert fidelity.decode_differences([str(path) for path in photo_jpegs]).max == 0  # decode_rgb: PIL's pixels


def test_torchcodec_is_kept_from_applying_exif_orientations(photo_jpegs):
    """TorchCodec turns an image by its EXIF orientation, always; the probe refuses a decoder that does (so a
    TorchCodec whose bytes ``without_app1`` did not clean would be passed over), and the cleaned bytes differ
    from the file's only by the APP1 segments."""
    codec = loaded("torchcodec")
    from torchcodec.decoders import decode_jpeg

    turning = D.JpegDecoder("torchcodec", "as is", lambda source, mode="RGB", device="cpu": decode_jpeg(
        source, mode=mode, device=device))
    with pytest.raises(RuntimeError, match="grey levels off"):
        D.check_decoder(turning)
    turned = [path for path in photo_jpegs if "exif" in path.name]
    assert len(turned) == 7
    for path in turned:
        encoded = read_bytes(str(path))
        as_is, stored = decode_jpeg(encoded, mode="UNCHANGED"), codec.decode(encoded, "UNCHANGED")
        assert as_is.shape != stored.shape or not torch.equal(as_is, stored), path  # 5-8 swap width and height
        cleaned = D.without_app1(encoded)
        assert len(cleaned) < len(encoded) and bytes(cleaned[-2:].tolist()) == b"\xff\xd9"
    plain = read_bytes(str(photo_jpegs[0]))
    assert D.without_app1(plain) is plain


def test_cmyk_jpegs_and_other_formats_decode_with_pil(photo_jpegs, tmp_path, monkeypatch):
    photo = Image.open(photo_jpegs[0])
    cmyk, png = tmp_path / "cmyk.jpg", tmp_path / "photo.png"
    photo.convert("CMYK").save(cmyk, quality=90)
    photo.save(png)
    palette = tmp_path / "palette.png"
    photo.convert("P").save(palette)

    def check() -> None:
        for path in (cmyk, png, palette):
            assert torch.equal(decode_rgb(read_bytes(str(path))), fidelity.to_tensor(Image.open(path))), path
        with pytest.raises(OSError):  # PIL's UnidentifiedImageError
            decode_rgb(torch.frombuffer(bytearray(b"\xff\xd8\xff not a jpeg"), dtype=torch.uint8))

    check()
    chosen = D.jpeg_decoder().name
    without_torchcodec(monkeypatch)
    D.reset_jpeg_decoder()
    check()
    assert D.jpeg_decoder().name == "torchvision" and chosen in ("torchcodec", "torchvision")


def test_without_torchcodec_torchvision_decodes_the_same(photo_jpegs, monkeypatch, caplog):
    data = [read_bytes(str(path)) for path in photo_jpegs]
    first = [decode_rgb(encoded) for encoded in data]
    batch_first = decode_jpegs_on(torch.device("cpu"), data)
    chosen = D.jpeg_decoder()

    without_torchcodec(monkeypatch)
    D.reset_jpeg_decoder()
    with caplog.at_level(logging.INFO, logger=D.__name__):
        fallback = D.jpeg_decoder()
        assert D.jpeg_decoder() is fallback  # chosen once
    assert fallback.name == "torchvision" and chosen.name in ("torchcodec", "torchvision")
    lines = [record for record in caplog.records if record.name == D.__name__]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "torchcodec is not installed" in lines[0].message
    assert all(torch.equal(a, decode_rgb(encoded)) for a, encoded in zip(first, data))
    assert all(torch.equal(a, b) for a, b in zip(batch_first, decode_jpegs_on(torch.device("cpu"), data)))


def test_a_broken_or_wrong_torchcodec_is_passed_over_with_one_warning(monkeypatch, caplog):
    def broken():
        raise OSError("libtorchcodec_core8.so: undefined symbol: _ZN3c10...")

    def wrong():
        def decode(source, mode="RGB", device="cpu"):
            image = torch.zeros(3, 16, 16, dtype=torch.uint8)
            return [image, image] if isinstance(source, list) else image
        return D.JpegDecoder("torchcodec", "9.9", decode)

    for loader, reason in [(broken, "OSError: libtorchcodec_core8.so"), (wrong, "grey levels off")]:
        monkeypatch.setitem(D._LOADERS, "torchcodec", loader)
        D.reset_jpeg_decoder()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=D.__name__):
            assert D.jpeg_decoder().name == "torchvision"
            D.jpeg_decoder()
        lines = [record for record in caplog.records if record.name == D.__name__]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING and reason in lines[0].message

    monkeypatch.setitem(D._LOADERS, "torchvision", broken)  # a torchvision whose decoders are gone: PIL
    D.reset_jpeg_decoder()
    assert D.jpeg_decoder().name == "PIL"
    data, expected = D._probe()
    assert torch.equal(decode_rgb(data), expected)
    assert torch.equal(decode_jpegs_on(torch.device("cpu"), [data])[0], expected)


def test_batched_decoding_falls_back_file_by_file(photo_jpegs, monkeypatch):
    good = [read_bytes(str(path)) for path in photo_jpegs[:4]]
    junk = torch.frombuffer(bytearray(b"\xff\xd8\xff not a jpeg"), dtype=torch.uint8)
    for patched in (False, True):
        if patched:
            without_torchcodec(monkeypatch)
            D.reset_jpeg_decoder()
        images = decode_jpegs_on(torch.device("cpu"), [good[0], junk, *good[1:]])
        assert images[1] is None and len(images) == 5
        assert all(torch.equal(a, decode_rgb(b)) for a, b in zip([images[0], *images[2:]], good))


def tiny_run(image_root: Path, out: Path, pipeline: str) -> dict:
    overrides = tiny_overrides(image_root, out, **{"data.pipeline": pipeline, "train.max_steps": 1,
                                                   "train.checkpoint_every_steps": None})
    train(load_config(None, overrides))
    return json.loads((out / "manifest.json").read_text())["input_pipeline"]


def test_the_manifest_records_the_decoder(image_root, tmp_path, monkeypatch):
    import PIL
    import torchvision

    chosen = tiny_run(image_root, tmp_path / "chosen", "tensor")
    assert chosen == {"pipeline": "tensor", "augment_on": "workers", "jpeg_decoder": D.jpeg_decoder().label}
    assert chosen["jpeg_decoder"].startswith("torchcodec" if torchcodec_works() else "torchvision")
    without_torchcodec(monkeypatch)
    D.reset_jpeg_decoder()
    fallback = tiny_run(image_root, tmp_path / "fallback", "nvjpeg")
    assert fallback == {"pipeline": "nvjpeg", "augment_on": "device",
                        "jpeg_decoder": f"torchvision {torchvision.__version__}"}
    assert tiny_run(image_root, tmp_path / "timm", "timm")["jpeg_decoder"] == f"PIL {PIL.__version__}"


@pytest.mark.cuda
def test_torchcodec_and_torchvision_decode_alike_on_the_gpu(photo_jpegs):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    codec, vision = loaded("torchcodec", "cuda"), loaded("torchvision", "cuda")
    colour = [read_bytes(str(path)) for path in photo_jpegs if not path.name.startswith("grey")]
    for ours, theirs, encoded in zip(codec.decode(colour, "RGB", "cuda"), vision.decode(colour, "RGB", "cuda"),
                                     colour):
        assert ours.device.type == "cuda" and ours.shape == theirs.shape
        cpu = codec.decode(encoded, "RGB")
        assert (ours.cpu().int() - cpu.int()).abs().float().mean() < 2.0  # nvJPEG's own IDCT
        assert (ours.int() - theirs.int()).abs().max() <= 1
    assert D.jpeg_decoder().name == "torchcodec"
    assert decode_jpegs_on(torch.device("cuda"), colour[:2])[0].device.type == "cuda"
