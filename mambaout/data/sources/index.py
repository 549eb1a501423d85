"""The index of a sharded split: where each sample's bytes are, so any sample can be read with one range request
and every host can plan its reads.

Per sample: its shard, the byte range to fetch (``start``, ``length``: a tar member's data; for parquet the image
column's chunk of the sample's row group, shared by the rows of that group), its target, its row group and row
(parquet) and its key (for messages). Per shard: its name below the root, size and version (ETag, generation or
mtime), checked at every start: a shard rewritten since indexing is re-indexed, its fingerprint changes, and a
resume refuses it by name.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INDEX_VERSION = 1
INDEX_FOLDER = "_index"


@dataclass
class SplitIndex:
    format: str
    split: str
    shards: list[str]
    shard_sizes: list[int]
    shard_versions: list[str]
    classes: list[str]
    shard: np.ndarray  # int32 per sample
    start: np.ndarray  # int64
    length: np.ndarray  # int64
    target: np.ndarray  # int64
    row_group: np.ndarray  # int32 (parquet; -1 for tars)
    row: np.ndarray  # int32 (parquet; -1 for tars)
    keys: np.ndarray  # str
    footers: list[bytes] = field(default_factory=list)  # parquet: each file's footer (its metadata)

    def __len__(self) -> int:
        return len(self.target)

    @property
    def shard_lengths(self) -> list[int]:
        return np.bincount(self.shard, minlength=len(self.shards)).tolist()

    def describe(self, index: int) -> str:
        return f"{self.shards[self.shard[index]]}:{self.keys[index]}"

    def fingerprint(self) -> dict:
        """What the manifest and checkpoints record: counts, a digest of the layout and targets, and each shard's
        size and version (so a rewritten shard is named when a resume refuses it)."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.format, self.shards, self.shard_sizes]).encode())
        for array in (self.shard, self.start, self.length, self.target, self.row_group, self.row):
            digest.update(np.ascontiguousarray(array.astype(np.int64)).tobytes())
        return {"format": self.format, "num_images": len(self), "num_classes": len(self.classes),
                "sha256": digest.hexdigest(),
                "shards": {name: f"{size}:{version}" for name, size, version in
                           zip(self.shards, self.shard_sizes, self.shard_versions)}}

    def save(self, path: str | os.PathLike) -> None:
        """Written to a temporary file and renamed: concurrent builders (hosts, processes) never tear it."""
        write_atomically(path, self.to_bytes())

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        meta = {"version": INDEX_VERSION, "format": self.format, "split": self.split, "shards": self.shards,
                "shard_sizes": self.shard_sizes, "shard_versions": self.shard_versions, "classes": self.classes}
        footer_lengths = np.array([len(footer) for footer in self.footers], dtype=np.int64)
        np.savez(buffer, meta=np.array(json.dumps(meta)), shard=self.shard, start=self.start, length=self.length,
                 target=self.target, row_group=self.row_group, row=self.row, keys=self.keys,
                 footer_lengths=footer_lengths, footers=np.frombuffer(b"".join(self.footers), dtype=np.uint8))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "SplitIndex":
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            meta = json.loads(str(arrays["meta"]))
            if meta.get("version") != INDEX_VERSION:
                raise ValueError(f"index version {meta.get('version')}, expected {INDEX_VERSION}")
            ends = np.cumsum(arrays["footer_lengths"]).tolist()
            blob = arrays["footers"].tobytes()
            footers = [blob[end - length:end] for end, length in zip(ends, arrays["footer_lengths"].tolist())]
            return cls(format=meta["format"], split=meta["split"], shards=meta["shards"],
                       shard_sizes=meta["shard_sizes"], shard_versions=meta["shard_versions"],
                       classes=meta["classes"], shard=arrays["shard"], start=arrays["start"],
                       length=arrays["length"], target=arrays["target"], row_group=arrays["row_group"],
                       row=arrays["row"], keys=arrays["keys"], footers=footers)


def index_name(split: str, format: str) -> str:
    """Where ``scripts/index_shards.py`` puts a split's index, below the dataset root."""
    return f"{INDEX_FOLDER}/{split}.{format}.npz"


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def stale_shards(index: SplitIndex, current: dict[str, tuple[int, str]]) -> list[str]:
    """The shards whose size or version differ from what the index recorded."""
    return [name for name, size, version in zip(index.shards, index.shard_sizes, index.shard_versions)
            if current.get(name) != (size, version)]


def changed_shards(old: dict, new: dict) -> list[str]:
    """Names of the shards whose recorded size/version differ between two fingerprints (resume messages)."""
    old_shards, new_shards = old.get("shards") or {}, new.get("shards") or {}
    return sorted(name for name in old_shards.keys() | new_shards.keys()
                  if old_shards.get(name) != new_shards.get(name))
