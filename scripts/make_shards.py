#!/usr/bin/env python3
"""Converts a class-folder dataset into tar shards (webdataset) or parquet files, locally or on an object store.

    python scripts/make_shards.py /data/imagenet s3://bucket/imagenet-wds --format wds
    python scripts/make_shards.py /data/imagenet /data/imagenet-parquet --format parquet --splits val

SRC is what training reads as data.format=folder (SRC/<split>/<class>/<image>, or the flat ImageNet validation
folder), listed by mambaout.data.scan_split. Sample i of each split in the output is sample i of the folder
(same image bytes, never re-encoded, same class index; other splits take the first split's classes, train's when
it is converted, as training does), so a run on the shards is the run on the folder. Sharding exists for storage
that serves few large files well and many small ones badly: object stores, network file systems.

Layouts (MB = 10^6 bytes):

* wds (timm's imagenet-1k-wds): OUT/<split>-000000.tar, ... Each sample is two consecutive members,
  <key>.cls (the class index as ASCII digits) and <key>.jpg|png|webp (the file's bytes; .jpeg is named jpg), with
  key the sample's index in the split, zero-padded to 8 digits. A tar is at most --shard-size MB (unless it holds a
  single larger sample). OUT/_info.json lists each converted split (timm reads it): {"name", "num_classes",
  "splits": {split: {"name", "num_samples", "filenames", "shard_lengths"}}}; converting another split into the same
  OUT adds it there. Other image types (.bmp, .ppm, .tif) are refused: convert them to PNG or JPEG first.
* parquet (Hugging Face's layout): OUT/data/<split>-00000-of-00012.parquet, ... with columns image
  (struct of bytes: binary, path: string, the path below SRC/<split>) and label (int64); row groups of at most
  --row-group-mb MB of image bytes, files of at most --shard-size MB of image bytes (at least one image each).
  The schema carries Hugging Face's features (Image, ClassLabel with the class names).

Both write OUT/classes.txt (one class name per line, in index order). OUT is a folder or an fsspec URL (s3://,
gs://, file://, ...; credentials and endpoints come from each filesystem's usual environment, e.g. AWS_PROFILE or
FSSPEC_S3_ENDPOINT_URL). Every file is written under a temporary name and renamed, or, on an object store, staged
in a local temporary file (TMPDIR) and uploaded in one piece, so an interrupted run leaves no torn file under a
final name. A split already in OUT is only replaced with --overwrite (which also removes its shards that the new
layout does not reuse; an interrupted --overwrite is repaired by running it again).
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import posixpath
import random
import re
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import fsspec.core

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mambaout.data import scan_split  # noqa: E402

MB = 1_000_000
TAR_BLOCK = tarfile.BLOCKSIZE  # 512: every member is a header block plus its data padded to whole blocks
TAR_RECORD = tarfile.RECORDSIZE  # tarfile ends an archive with two zero blocks, padded to a whole record
WDS_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}
SCHEMES = "a local path, file://, s3:// (package s3fs) or gs:// (package gcsfs)"


class UserError(Exception):
    """A problem the user fixes: the message names it and the fix (printed without a traceback)."""


@dataclass
class Shard:
    name: str  # below OUT
    samples: range  # indices into the split's samples
    row_groups: list[range] = field(default_factory=list)  # parquet


@dataclass
class Split:
    name: str
    folder: Path
    samples: list[tuple[str, int]]
    sizes: list[int]


# --- output --------------------------------------------------------------------------------------------------------

class Destination:
    """OUT through fsspec: atomic whole-file writes (temporary name + rename, or one upload to an object store)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") or url
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except (ValueError, ImportError) as error:
            raise UserError(f"cannot open OUT {url} ({error}); give {SCHEMES}") from None
        self.root = root.rstrip("/")
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.object_store = bool(protocols & OBJECT_STORES)
        self.fs.invalidate_cache()

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name) if self.root else name

    def show(self, name: str) -> str:
        return f"{self.url}/{name}"

    def check(self) -> None:
        """A missing bucket, refused credentials or a file in place of the folder fail here, before any work."""
        try:
            if self.object_store:
                bucket = self.root.split("/", 1)[0]
                if not self.fs.exists(bucket):
                    raise UserError(f"bucket {bucket!r} of OUT {self.url} does not exist (or is not visible with "
                                    "these credentials); create it first or fix the URL")
            elif self.fs.isfile(self.root):
                raise UserError(f"OUT {self.url} is a file; give a folder (it is created if missing)")
            else:
                self.fs.makedirs(self.root, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot use OUT {self.url}: {error}") from None

    def names(self, folder: str = "") -> list[str]:
        """File names directly in ``folder`` (below OUT); none when it does not exist."""
        try:
            entries = self.fs.ls(self.path(folder) if folder else self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(entry.rstrip("/")) for entry in entries)

    def read(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            return None

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        """A binary stream that becomes ``name`` only when the block ends without an error."""
        final = self.path(name)
        if self.object_store:
            with tempfile.TemporaryDirectory(prefix="make_shards-") as folder:
                staged = os.path.join(folder, "part")
                with open(staged, "wb") as stream:
                    yield stream
                self.fs.put_file(staged, final)  # one upload: the object appears whole or not at all
            return
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        temporary = posixpath.join(posixpath.dirname(final), f".{posixpath.basename(final)}.{uuid.uuid4().hex}.tmp")
        try:
            with self.fs.open(temporary, "wb") as stream:
                yield stream
            self.fs.mv(temporary, final)
        finally:
            if self.fs.exists(temporary):
                self.fs.rm(temporary)

    def write(self, name: str, data: bytes) -> None:
        with self.open(name) as stream:
            stream.write(data)

    def remove(self, names: Sequence[str]) -> None:
        for name in names:
            self.fs.rm(self.path(name))


# --- input ---------------------------------------------------------------------------------------------------------

def check_source(src: Path, splits: Sequence[str]) -> None:
    if not src.is_dir():
        raise UserError(f"SRC {src} does not exist or is not a folder; give the folder that holds the splits "
                        f"(SRC/train/<class>/<image>)")
    missing = [split for split in splits if not (src / split).is_dir()]
    if missing:
        present = sorted(entry.name for entry in src.iterdir() if entry.is_dir() and not entry.name.startswith("."))
        raise UserError(f"SRC {src} has no split {', '.join(missing)} (its folders: {present or 'none'}); pass "
                        f"--splits with the splits it has, e.g. --splits {','.join(present) or 'train'}")


def scan(src: Path, splits: Sequence[str], classes: list[str] | None, shuffle_seed: int | None = None
         ) -> tuple[list[Split], list[str]]:
    """Each split's samples in the folder's order (or permuted by ``shuffle_seed``); the first split scanned (train
    when converted, else the first named) decides the classes of the others, as training does, unless ``classes``
    (OUT's) are given."""
    order = sorted(splits, key=lambda split: split != "train")
    given = classes is not None
    scanned = {}
    for split in order:
        try:
            samples, found = scan_split(src, split, classes)
        except (OSError, ValueError) as error:  # scan_split's DatasetNotFoundError, DatasetFormatError
            where = " (the class list is OUT's classes.txt, of the splits already there)" if given else ""
            raise UserError(f"{error}{where}") from None
        classes = classes or found
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(samples)
        scanned[split] = Split(split, src / split, samples, [os.path.getsize(path) for path, _ in samples])
    return [scanned[split] for split in splits], list(classes)


def read_image(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {path} ({error}); fix its permissions or remove it from SRC") from None


def wds_extension(path: str) -> str:
    extension = WDS_EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if extension is None:
        raise UserError(f"{path}: webdataset shards hold .jpg, .png or .webp images (the readers' image members); "
                        f"convert the {os.path.splitext(path)[1]} images to PNG or JPEG first "
                        "(or use --format parquet)")
    return extension


# --- planning ------------------------------------------------------------------------------------------------------

def cut(sizes: Sequence[int], limit: float, total: Callable[[int], int] = lambda content: content) -> list[range]:
    """Consecutive chunks: a chunk closes when adding the next item would make ``total(content)`` exceed
    ``limit``; every chunk holds at least one item."""
    chunks, start, content = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and total(content + size) > limit:
            chunks.append(range(start, index))
            start, content = index, 0
        content += size
    if start < len(sizes):
        chunks.append(range(start, len(sizes)))
    return chunks


def tar_member_bytes(size: int) -> int:
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_file_bytes(content: int) -> int:
    return -(-(content + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def plan_wds(split: Split, shard_mb: float) -> list[Shard]:
    sizes = [tar_member_bytes(size) + tar_member_bytes(len(str(target)))
             for size, (_, target) in zip(split.sizes, split.samples)]
    return [Shard(f"{split.name}-{number:06d}.tar", samples)
            for number, samples in enumerate(cut(sizes, shard_mb * MB, tar_file_bytes))]


def plan_parquet(split: Split, shard_mb: float, row_group_mb: float) -> list[Shard]:
    files = cut(split.sizes, shard_mb * MB)
    shards = []
    for number, samples in enumerate(files):
        groups = cut(split.sizes[samples.start:samples.stop], row_group_mb * MB)
        shards.append(Shard(f"data/{split.name}-{number:05d}-of-{len(files):05d}.parquet", samples,
                            [range(samples.start + group.start, samples.start + group.stop) for group in groups]))
    return shards


# --- writing -------------------------------------------------------------------------------------------------------

def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))  # BytesIO shares the bytes, no copy


def write_tar(stream: IO[bytes], split: Split, shard: Shard) -> None:
    with tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index in shard.samples:
            path, target = split.samples[index]
            # the label first, as webdataset's writer orders a sample's members: a shard cut inside an image keeps
            # that sample's label, so the reader counts it unreadable instead of losing it
            add_member(tar, f"{index:08d}.cls", str(target).encode("ascii"))
            add_member(tar, f"{index:08d}.{wds_extension(path)}", read_image(path))


def parquet_schema(classes: Sequence[str]) -> Any:
    import pyarrow as pa

    features = {"image": {"_type": "Image"}, "label": {"names": list(classes), "_type": "ClassLabel"}}
    return pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                     metadata={"huggingface": json.dumps({"info": {"features": features}})})


def write_parquet(stream: IO[bytes], split: Split, shard: Shard, schema: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # JPEG/PNG bytes do not compress: the image bytes are stored as they are, without dictionary or statistics.
    options = {"compression": {"image.bytes": "none", "image.path": "snappy", "label": "snappy"},
               "use_dictionary": ["label"], "write_statistics": ["label"]}
    with pq.ParquetWriter(stream, schema, **options) as writer:
        for rows in shard.row_groups:
            images = [{"bytes": read_image(split.samples[index][0]),
                       "path": Path(os.path.relpath(split.samples[index][0], split.folder)).as_posix()}
                      for index in rows]
            labels = [split.samples[index][1] for index in rows]
            writer.write_table(pa.table({"image": images, "label": labels}, schema=schema), row_group_size=len(rows))


def write_shards(destination: Destination, split: Split, shards: list[Shard], writer: Callable, workers: int) -> int:
    """Writes the shards (``workers`` at a time) and returns their total size in bytes."""
    done, lock = itertools.count(1), threading.Lock()

    def one(shard: Shard) -> int:
        with destination.open(shard.name) as stream:
            writer(stream, split, shard)
            size = stream.tell()
        with lock:
            print(f"  {split.name}: {next(done)}/{len(shards)} {shard.name} ({len(shard.samples)} samples, "
                  f"{size / MB:.1f} MB)", flush=True)
        return size

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return sum(pool.map(one, shards))


# --- the existing content of OUT -----------------------------------------------------------------------------------

def shard_pattern(form: str, split: str) -> re.Pattern:
    if form == "wds":
        return re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")
    return re.compile(rf"{re.escape(split)}-\d{{5}}-of-\d{{5}}\.parquet")


def existing_shards(destination: Destination, form: str, split: str, info: dict) -> list[str]:
    """The split's files in OUT (names below OUT), found by name and, for wds, in _info.json."""
    folder = "" if form == "wds" else "data"
    pattern = shard_pattern(form, split)
    found = {posixpath.join(folder, name) if folder else name
             for name in destination.names(folder) if pattern.fullmatch(name)}
    if form == "wds":
        found |= set(info.get("splits", {}).get(split, {}).get("filenames", []))
    return sorted(found)


def existing_splits(destination: Destination, form: str, info: dict) -> set[str]:
    if form == "wds":
        names = destination.names()
        return set(info.get("splits", {})) | {name.rsplit("-", 1)[0] for name in names
                                              if re.fullmatch(r".+-\d{6}\.tar", name)}
    return {name.rsplit("-", 3)[0] for name in destination.names("data")
            if re.fullmatch(r".+-\d{5}-of-\d{5}\.parquet", name)}


def read_info(destination: Destination) -> dict:
    data = destination.read("_info.json")
    if data is None:
        return {}
    try:
        return json.loads(data)
    except ValueError as error:
        raise UserError(f"{destination.show('_info.json')} is not valid JSON ({error}); remove it or choose "
                        "another OUT") from None


def out_classes(destination: Destination, form: str, info: dict, splits: Sequence[str]) -> list[str] | None:
    """OUT's class list when OUT keeps other splits (their class indices depend on it), else None."""
    if not existing_splits(destination, form, info) - set(splits):
        return None
    data = destination.read("classes.txt")
    return None if data is None else [line for line in data.decode().split("\n") if line]


def refuse_overwrite(destination: Destination, form: str, info: dict, splits: Sequence[str]) -> dict[str, list[str]]:
    """Each split's existing files; refused unless --overwrite."""
    existing = {split: existing_shards(destination, form, split, info) for split in splits}
    for split, names in existing.items():
        if names:
            raise UserError(f"OUT {destination.url} already holds split {split!r} ({len(names)} files, e.g. "
                            f"{names[0]}; an interrupted conversion?); pass --overwrite to replace it, or choose "
                            "another OUT")
    return existing


# --- the command ---------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="dataset folder: SRC/<split>/<class>/<image> (or flat ImageNet val)")
    parser.add_argument("out", help="output folder or fsspec URL (s3://bucket/prefix, gs://..., file://...)")
    parser.add_argument("--format", required=True, choices=("wds", "parquet"),
                        help="wds: tar shards + _info.json (timm's imagenet-1k-wds); parquet: Hugging Face's layout")
    parser.add_argument("--shard-size", type=float, default=256.0, metavar="MB",
                        help="largest shard in MB (10^6 bytes), fractions allowed; a larger image gets a shard of "
                             "its own (default: 256)")
    parser.add_argument("--row-group-mb", type=float, default=64.0, metavar="MB",
                        help="parquet: largest row group in MB of image bytes (default: 64)")
    parser.add_argument("--splits", default=None,
                        help="comma-separated splits to convert (default: those of train,val that SRC has)")
    parser.add_argument("--overwrite", action="store_true", help="replace splits that OUT already holds")
    parser.add_argument("--workers", type=int, default=8, help="shards written at a time (default: 8)")
    parser.add_argument("--shuffle-seed", type=int, metavar="N",
                        help="write each split's samples in an order permuted by N instead of the folder's, so every "
                             "shard mixes the classes (for data.shuffle=window; the run then differs from the "
                             "folder's)")
    args = parser.parse_args(argv)
    if args.shard_size <= 0 or args.row_group_mb <= 0:
        parser.error("--shard-size and --row-group-mb must be positive")
    if args.splits is None:
        args.splits = [split for split in ("train", "val") if (args.src / split).is_dir()] or ["train", "val"]
    else:
        args.splits = list(dict.fromkeys(split.strip() for split in args.splits.split(",") if split.strip()))
        if not args.splits:
            parser.error("--splits is empty; name at least one split, e.g. --splits train,val")
    return args


def convert(args: argparse.Namespace) -> None:
    check_source(args.src, args.splits)
    destination = Destination(args.out)
    destination.check()
    info = read_info(destination) if args.format == "wds" else {}
    existing = (refuse_overwrite(destination, args.format, info, args.splits) if not args.overwrite else
                {split: existing_shards(destination, args.format, split, info) for split in args.splits})
    splits, classes = scan(args.src, args.splits, out_classes(destination, args.format, info, args.splits),
                           args.shuffle_seed)
    if args.format == "wds":
        for split in splits:
            for path, _ in split.samples:
                wds_extension(path)
    destination.write("classes.txt", "".join(f"{name}\n" for name in classes).encode())
    for split in splits:
        convert_split(args, destination, split, classes, info, existing[split.name])


def record_split(info: dict, name: str, num_classes: int, split: Split, shards: list[Shard]) -> None:
    """Adds (or replaces) the split in timm's _info.json content, keeping the splits already there."""
    entry = {"name": split.name, "num_samples": len(split.samples), "filenames": [shard.name for shard in shards],
             "shard_lengths": [len(shard.samples) for shard in shards]}
    info.update(name=name, num_classes=num_classes, splits={**info.get("splits", {}), split.name: entry})


def convert_split(args: argparse.Namespace, destination: Destination, split: Split, classes: list[str], info: dict,
                  old: list[str]) -> None:
    start = time.perf_counter()
    if args.format == "wds":
        shards = plan_wds(split, args.shard_size)
        size = write_shards(destination, split, shards, write_tar, args.workers)
        record_split(info, args.src.resolve().name, len(classes), split, shards)
        destination.write("_info.json", json.dumps(info, indent=1).encode())
    else:
        shards = plan_parquet(split, args.shard_size, args.row_group_mb)
        schema = parquet_schema(classes)
        size = write_shards(destination, split, shards,
                            lambda stream, split, shard: write_parquet(stream, split, shard, schema), args.workers)
    destination.remove(sorted(set(old) - {shard.name for shard in shards}))
    print(f"{split.name}: {len(split.samples)} samples, {len(shards)} shards, {size / MB:,.1f} MB ({size} bytes), "
          f"{time.perf_counter() - start:.1f} s -> {destination.url}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        convert(args)
    except UserError as error:
        raise SystemExit(f"make_shards: {error}") from None
    except OSError as error:  # the store refused a write: permissions, a full disk, a bucket deleted meanwhile
        raise SystemExit(f"make_shards: cannot write {args.out}: {error}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
