"""The Hugging Face parquet layout (``data/train-00000-of-00294.parquet``, ...): columns ``image`` = struct
{``bytes``, ``path``} (or plain binary) and ``label``.

A split's files are those named ``<split>-*.parquet`` (or ``<split>_*``, or inside a ``<split>/`` folder) anywhere
below the root, in name order. Indexing reads each file's footer and ``label`` column only. The smallest read of
an image is its row group's ``image`` column chunk: that range is what every row of the group asks for, so the
read plan fetches it once for all of them.
"""
from __future__ import annotations

import io
import os
import posixpath
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .index import SplitIndex
from .store import DataSourceError, Store
from .wds import SPLIT_ALIASES, class_names

IMAGE_COLUMN, LABEL_COLUMN = "image", "label"


def split_files(store: Store, split: str) -> list[str]:
    names = sorted(posixpath.relpath(path, store.base) for path in store.fs.find(store.base)
                   if path.endswith(".parquet"))
    for candidate in (split, SPLIT_ALIASES.get(split)):
        if candidate is None:
            continue
        chosen = [name for name in names if _in_split(name, candidate)]
        if chosen:
            return chosen
    raise DataSourceError(
        f"{store.url()}: no parquet files of split {split!r} (expected names like data/{split}-00000-of-00001.parquet "
        f"or a {split}/ folder; found {len(names)} parquet files{': ' + ', '.join(names[:5]) if names else ''})")


def _in_split(name: str, split: str) -> bool:
    base = posixpath.basename(name)
    return base.startswith((f"{split}-", f"{split}_")) or f"/{split}/" in f"/{name}"


def read_footer(store: Store, name: str, size: int) -> bytes:
    """The file's footer (its metadata) with its length and magic: what ``metadata_from_footer`` parses."""
    tail = store.read_range(name, size - 8, size)
    if tail[4:] != b"PAR1":
        raise DataSourceError(f"{store.url(name)} is not a parquet file (no PAR1 magic at its end)")
    length = struct.unpack("<I", tail[:4])[0]
    return store.read_range(name, size - 8 - length, size)


def metadata_from_footer(footer: bytes) -> pq.FileMetaData:
    return pq.read_metadata(pa.BufferReader(b"PAR1" + footer))


def _image_columns(metadata: pq.FileMetaData, url: str) -> list[int]:
    paths = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
    image = [i for i, path in enumerate(paths) if path == IMAGE_COLUMN or path.startswith(IMAGE_COLUMN + ".")]
    if not image or LABEL_COLUMN not in paths:
        raise DataSourceError(f"{url}: expected the columns 'image' (struct of bytes and path, or binary) and "
                              f"'label' (Hugging Face's image-classification layout); found {paths}")
    return image


def _chunk_range(row_group: pq.RowGroupMetaData, columns: list[int]) -> tuple[int, int]:
    """The byte range of the image column's chunks in one row group (stored one after the other)."""
    starts, ends = [], []
    for i in columns:
        column = row_group.column(i)
        start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
        starts.append(start)
        ends.append(start + column.total_compressed_size)
    return min(starts), max(ends)


def build_parquet_index(store: Store, split: str, versions: dict[str, tuple[int, str]]) -> SplitIndex:
    files = split_files(store, split)
    versions = versions or store.versions(files)
    arrays = {name: [] for name in ("shard", "start", "length", "target", "row_group", "row")}
    footers = []
    for file_id, name in enumerate(files):
        footer = read_footer(store, name, versions[name][0])
        footers.append(footer)
        metadata = metadata_from_footer(footer)
        image_columns = _image_columns(metadata, store.url(name))
        labels = _labels(store, name, versions[name][0], metadata)
        row_offset = 0
        for group in range(metadata.num_row_groups):
            start, end = _chunk_range(metadata.row_group(group), image_columns)
            rows = metadata.row_group(group).num_rows
            for key, value in (("shard", file_id), ("start", start), ("length", end - start), ("row_group", group)):
                arrays[key].append(np.full(rows, value, dtype=np.int64))
            arrays["row"].append(np.arange(rows))
            arrays["target"].append(labels[row_offset:row_offset + rows])
            row_offset += rows
    merged = {key: np.concatenate(parts) for key, parts in arrays.items()}
    if not len(merged["target"]):
        raise DataSourceError(f"{store.url()}: the parquet files of split {split!r} hold no rows")
    if (merged["target"] < 0).any():
        raise DataSourceError(f"{store.url()}: split {split!r} has rows without a label (label < 0 or null)")
    info = (store.read_info() or (None, None))[1]
    return SplitIndex(
        format="parquet", split=split, shards=files, shard_sizes=[versions[name][0] for name in files],
        shard_versions=[versions[name][1] for name in files],
        classes=class_names(store, info, int(merged["target"].max()) + 1),
        shard=merged["shard"].astype(np.int32), start=merged["start"], length=merged["length"],
        target=merged["target"], row_group=merged["row_group"].astype(np.int32), row=merged["row"].astype(np.int32),
        keys=np.array([f"{g}/{r}" for g, r in zip(merged["row_group"], merged["row"])], dtype=str), footers=footers)


def _labels(store: Store, name: str, size: int, metadata: pq.FileMetaData) -> np.ndarray:
    file = pq.ParquetFile(RangeFile(lambda start, end: store.read_range(name, start, end), size), metadata=metadata)
    labels = file.read(columns=[LABEL_COLUMN]).column(LABEL_COLUMN)
    return labels.fill_null(-1).to_numpy().astype(np.int64)


def row_group_images(fetch, size: int, metadata: pq.FileMetaData, group: int) -> list[bytes | None]:
    """The encoded images of one row group, reading only its image column (``fetch(start, end)`` gives bytes)."""
    return _image_array(fetch, size, metadata, group).to_pylist()


def packed_row_group(fetch, size: int, metadata: pq.FileMetaData, group: int) -> bytes:
    """A row group's images as the host cache keeps them, so a worker reads one row with two ``pread`` calls and
    decodes nothing: the row count n, n + 1 offsets (int64; row r is bytes offsets[r]:offsets[r + 1], a null row
    empty), the bytes. Made from arrow's own offsets and data buffers, without a Python object per image."""
    images = _image_array(fetch, size, metadata, group)
    offset_type = np.int64 if pa.types.is_large_binary(images.type) else np.int32
    offsets = np.frombuffer(images.buffers()[1], dtype=offset_type)[images.offset:images.offset + len(images) + 1]
    first, last = int(offsets[0]), int(offsets[-1])
    header = np.concatenate([[len(images)], offsets.astype(np.int64) - first]).astype("<i8").tobytes()
    return header + images.buffers()[2].to_pybytes()[first:last]


def _image_array(fetch, size: int, metadata: pq.FileMetaData, group: int) -> pa.Array:
    file = pq.ParquetFile(RangeFile(fetch, size), metadata=metadata)
    column = file.read_row_group(group, columns=[IMAGE_COLUMN]).column(IMAGE_COLUMN).combine_chunks()
    return column.field("bytes") if pa.types.is_struct(column.type) else column


def packed_row(path: str | os.PathLike, row: int) -> bytes | None:
    """Row ``row`` of a ``packed_row_group`` file (None if it was evicted meanwhile)."""
    try:
        with open(path, "rb") as file:
            count = struct.unpack("<q", os.pread(file.fileno(), 8, 0))[0]
            start, end = struct.unpack("<qq", os.pread(file.fileno(), 16, 8 + 8 * row))
            return os.pread(file.fileno(), end - start, 8 * (count + 2) + start)
    except FileNotFoundError:
        return None


class RangeFile(io.RawIOBase):
    """A read-only file of ``size`` bytes whose reads are ranges fetched by ``fetch(start, end)``: pyarrow reads a
    row group's column chunk through it, from the local cache or the store."""

    def __init__(self, fetch, size: int) -> None:
        super().__init__()
        self._fetch, self._size, self._position = fetch, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = base + offset
        return self._position

    def read(self, count: int = -1) -> bytes:
        end = self._size if count is None or count < 0 else min(self._size, self._position + count)
        if end <= self._position:
            return b""
        data = self._fetch(self._position, end)
        self._position = end
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)
