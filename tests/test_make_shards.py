"""scripts/make_shards.py on a tiny real folder: the shards hold the folder's samples in its order, byte for byte,
read back by tarfile, webdataset's own reader and pyarrow; small size limits give several shards and row groups;
a split is never overwritten by accident; interrupted writes leave no torn shard; errors are one clear line."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mambaout.data import scan_split

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_shards", REPO / "scripts" / "make_shards.py")
make_shards = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("make_shards", make_shards)  # dataclasses look their module up there
_spec.loader.exec_module(make_shards)

CLASSES = ("cat", "dog", "fox")
SUFFIXES = (".jpg", ".png", ".JPEG", ".webp")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """3 classes: 7 training images each, 2 validation images each (JPEG, PNG, upper-case .JPEG, WebP); one class
    has a sub-folder, which the folder's order visits after the class's own files."""
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    for split, count in (("train", 7), ("val", 2)):
        for label, name in enumerate(CLASSES):
            for i in range(count):
                folder = root / split / name / ("more" if label == 1 and i >= 5 else "")
                folder.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (12 + i, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}{SUFFIXES[(i + label) % len(SUFFIXES)]}")
    return root


def run(*argv) -> None:
    assert make_shards.main([str(arg) for arg in argv]) == 0


def expected(src: Path, split: str) -> list[tuple[str, int]]:
    """The folder's samples, with the training classes (as training gives them to the validation split)."""
    _, classes = scan_split(src, "train")
    return scan_split(src, split, classes)[0]


def refusal(*argv) -> str:
    with pytest.raises(SystemExit) as raised:
        make_shards.main([str(arg) for arg in argv])
    message = str(raised.value.code)
    assert message.startswith("make_shards: ") and "\n" not in message and "Traceback" not in message, message
    return message


def read_tars(out: Path, split: str) -> list[tuple[str, str, bytes, bytes]]:
    """(key, image extension, image bytes, cls bytes) of each sample, in the order of _info.json's shards; the
    members strictly alternate cls, image, with timm-neutral attributes."""
    info = json.loads((out / "_info.json").read_text())["splits"][split]
    samples = []
    for filename, length in zip(info["filenames"], info["shard_lengths"]):
        with tarfile.open(out / filename) as tar:
            members = tar.getmembers()
            assert len(members) == 2 * length
            for cls, image in zip(members[::2], members[1::2]):
                key, extension = image.name.split(".")
                assert cls.name == f"{key}.cls"
                assert all((m.mode, m.mtime, m.uid, m.gid, m.uname, m.gname) == (0o644, 0, 0, 0, "", "")
                           for m in (image, cls))
                samples.append((key, extension, tar.extractfile(image).read(), tar.extractfile(cls).read()))
    return samples


def check_wds_samples(samples, src: Path, split: str) -> None:
    folder = expected(src, split)
    assert len(samples) == len(folder)
    for index, ((key, extension, data, cls), (path, target)) in enumerate(zip(samples, folder)):
        assert key == f"{index:08d}"
        assert extension == {".jpeg": "jpg"}.get(Path(path).suffix.lower(), Path(path).suffix.lower()[1:])
        assert data == Path(path).read_bytes()
        assert cls == str(target).encode()


def test_wds_holds_the_folder_in_order(src, tmp_path):
    out = tmp_path / "wds"
    run(src, out, "--format", "wds", "--shard-size", 0.02)
    info = json.loads((out / "_info.json").read_text())
    assert info["name"] == src.name and info["num_classes"] == 3 and set(info["splits"]) == {"train", "val"}
    for split in ("train", "val"):
        entry = info["splits"][split]
        assert entry["name"] == split and entry["num_samples"] == sum(entry["shard_lengths"])
        assert entry["filenames"] == [f"{split}-{i:06d}.tar" for i in range(len(entry["filenames"]))]
        check_wds_samples(read_tars(out, split), src, split)
    assert len(info["splits"]["train"]["filenames"]) > 3
    assert all(os.path.getsize(path) <= 0.02e6 for path in out.glob("*.tar"))
    assert (out / "classes.txt").read_text().splitlines() == list(CLASSES)
    assert sorted(path.name for path in out.iterdir() if not path.name.endswith(".tar")) == ["_info.json",
                                                                                            "classes.txt"]


def test_a_shuffle_seed_writes_the_same_samples_in_a_keyed_order(src, tmp_path):
    orders = []
    for name in ("a", "b"):
        run(src, tmp_path / name, "--format", "wds", "--shard-size", 0.02, "--splits", "train", "--shuffle-seed", 5)
        orders.append([(image, int(cls)) for _, _, image, cls in read_tars(tmp_path / name, "train")])
    folder = [(Path(path).read_bytes(), target) for path, target in expected(src, "train")]
    assert orders[0] == orders[1] != folder  # keyed by the seed: the same on every conversion
    assert sorted(orders[0]) == sorted(folder)  # the same samples, labels kept


def test_webdataset_reads_the_same_samples(src, tmp_path):
    webdataset = pytest.importorskip("webdataset")
    out = tmp_path / "wds"
    run(src, out, "--format", "wds", "--shard-size", 0.02, "--splits", "train")
    filenames = json.loads((out / "_info.json").read_text())["splits"]["train"]["filenames"]
    dataset = webdataset.WebDataset([str(out / name) for name in filenames], shardshuffle=False, empty_check=False)
    samples = []
    for sample in dataset:
        extension = next(key for key in ("jpg", "png", "webp") if key in sample)
        samples.append((sample["__key__"], extension, sample[extension], sample["cls"]))
    check_wds_samples(samples, src, "train")


def test_parquet_holds_the_folder_in_order(src, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "parquet"
    run(src, out, "--format", "parquet", "--shard-size", 0.005, "--row-group-mb", 0.002)
    for split in ("train", "val"):
        files = sorted((out / "data").glob(f"{split}-*.parquet"))
        assert [path.name for path in files] == [f"{split}-{i:05d}-of-{len(files):05d}.parquet"
                                                 for i in range(len(files))]
        rows, row_groups = [], 0
        for path in files:
            parquet = pq.ParquetFile(path)
            assert str(parquet.schema_arrow.field("image").type) == "struct<bytes: binary, path: string>"
            assert str(parquet.schema_arrow.field("label").type) == "int64"
            row_groups += parquet.metadata.num_row_groups
            rows += parquet.read().to_pylist()
        folder = expected(src, split)
        assert [(row["image"]["bytes"], row["image"]["path"], row["label"]) for row in rows] == [
            (Path(path).read_bytes(), Path(path).relative_to(src / split).as_posix(), target)
            for path, target in folder]
        if split == "train":
            assert len(files) > 2 and row_groups > len(files)
    assert (out / "classes.txt").read_text().splitlines() == list(CLASSES)


def test_refuses_to_overwrite_a_split_and_replaces_it_with_overwrite(src, tmp_path):
    out = tmp_path / "wds"
    run(src, out, "--format", "wds", "--shard-size", 0.01, "--splits", "train")
    many = sorted(out.glob("train-*.tar"))
    message = refusal(src, out, "--format", "wds", "--splits", "train")
    assert "already holds split 'train'" in message and "--overwrite" in message
    run(src, out, "--format", "wds", "--splits", "val")  # another split is added beside it
    info = json.loads((out / "_info.json").read_text())
    assert set(info["splits"]) == {"train", "val"}
    check_wds_samples(read_tars(out, "val"), src, "val")

    run(src, out, "--format", "wds", "--splits", "train", "--overwrite")  # 256 MB: one shard, the others go
    assert sorted(out.glob("train-*.tar")) == [out / "train-000000.tar"] and len(many) > 1
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["filenames"] == ["train-000000.tar"] and set(info["splits"]) == {"train", "val"}
    check_wds_samples(read_tars(out, "train"), src, "train")

    run(src, tmp_path / "parquet", "--format", "parquet", "--splits", "val")
    assert "already holds split 'val'" in refusal(src, tmp_path / "parquet", "--format", "parquet")


def test_an_interrupted_write_leaves_no_torn_shard(src, tmp_path, monkeypatch):
    samples = expected(src, "train")
    real = make_shards.read_image

    def failing(path: str) -> bytes:
        if path == samples[7][0]:
            raise make_shards.UserError(f"cannot read {path}")
        return real(path)

    monkeypatch.setattr(make_shards, "read_image", failing)
    out = tmp_path / "wds"
    assert "cannot read" in refusal(src, out, "--format", "wds", "--shard-size", 0.01, "--splits", "train")
    names = sorted(path.name for path in out.iterdir())
    assert names and "_info.json" not in names and all(name.endswith((".tar", ".txt")) for name in names), names
    for path in out.glob("*.tar"):
        with tarfile.open(path) as tar:  # each shard here is whole: 2 members (10 kB shards hold one sample)
            key = tar.getmembers()[0].name.split(".")[0]
            assert [member.name.split(".")[1] for member in tar.getmembers()][0] == "cls" and key != "00000007"


@pytest.mark.parametrize("case", ["missing src", "missing split", "unknown scheme", "unsupported image"])
def test_clear_errors(case, src, tmp_path):
    out = tmp_path / "out"
    if case == "missing src":
        message = refusal(tmp_path / "nowhere", out, "--format", "wds")
        assert "nowhere does not exist" in message
    elif case == "missing split":
        message = refusal(src, out, "--format", "wds", "--splits", "train,test")
        assert "no split test" in message and "--splits" in message and "'train'" in message
    elif case == "unknown scheme":
        message = refusal(src, "foo://bucket/data", "--format", "wds")
        assert "foo://bucket/data" in message and "s3://" in message and "gs://" in message
    else:
        odd = tmp_path / "odd"
        (odd / "train" / "cat").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(odd / "train" / "cat" / "a.bmp")
        message = refusal(odd, out, "--format", "wds")
        assert "a.bmp" in message and "PNG or JPEG" in message
        assert not out.exists() or not any(out.glob("*.tar"))


def test_s3_bucket(src, tmp_path, monkeypatch):
    """An object store through s3fs, against moto's S3 server: shards are uploaded whole; a missing bucket is named."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    import fsspec

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(name, "test")
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://{host}:{port}"})
        s3fs.S3FileSystem.clear_instance_cache()
        fs = fsspec.filesystem("s3")
        fs.mkdir("bucket")
        message = refusal(src, "s3://no-such-bucket/wds", "--format", "wds")
        assert "bucket 'no-such-bucket'" in message and "does not exist" in message

        run(src, "s3://bucket/imagenet/wds", "--format", "wds", "--shard-size", 0.02, "--splits", "val")
        info = json.loads(fs.cat_file("bucket/imagenet/wds/_info.json"))
        samples = []
        for filename in info["splits"]["val"]["filenames"]:
            with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"bucket/imagenet/wds/{filename}"))) as tar:
                members = tar.getmembers()
                samples += [(image.name.split(".")[0], image.name.split(".")[1], tar.extractfile(image).read(),
                             tar.extractfile(cls).read()) for cls, image in zip(members[::2], members[1::2])]
        _, classes = scan_split(src, "train")
        names = ["_info.json", "classes.txt", *info["splits"]["val"]["filenames"]]
        assert sorted(fs.ls("bucket/imagenet/wds", detail=False)) == sorted(f"bucket/imagenet/wds/{name}"
                                                                            for name in names)
        assert fs.cat_file("bucket/imagenet/wds/classes.txt").decode().splitlines() == classes
        check_wds_samples(samples, src, "val")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
