"""A sharded split (``wds`` tars or ``parquet`` files) read sample by sample: the sample's byte range from the
index, served by the host's cache when the read plan fetched it, else by one range request of its own."""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from .cache import RangeCache
from .index import SplitIndex, index_name, stale_shards
from .store import DataSourceError, Store, is_url
from .wds import build_wds_index, split_shards

log = logging.getLogger(__name__)


def _parquet():
    """The parquet reader, imported when used: pyarrow is the ``shards`` extra's, not every run's."""
    try:
        from . import parquet
    except ModuleNotFoundError as error:
        raise DataSourceError(f"data.format=parquet needs {error.name}, which is not installed: "
                              "pip install -e '.[shards]'") from None
    return parquet


def _build(format: str, store: Store, split: str, versions: dict[str, tuple[int, str]]) -> SplitIndex:
    builder = build_wds_index if format == "wds" else _parquet().build_parquet_index
    return builder(store, split, versions)


class ShardSource:
    """The samples of one split of a sharded dataset, by index: bytes, target, a name for messages."""

    def __init__(self, store: Store, index: SplitIndex, cache: RangeCache | None) -> None:
        self.store = store
        self.index = index
        self.cache = cache
        self.classes = list(index.classes)
        self.targets = index.target.tolist()
        self._shard_urls = [store.url(name) for name in index.shards]
        self._row_groups: OrderedDict[tuple[int, int], list] = OrderedDict()
        self._metadata: dict[int, object] = {}

    @property
    def root(self) -> str:
        return self.store.url()

    def __len__(self) -> int:
        return len(self.index)

    def describe(self, index: int) -> str:
        return self.store.url(self.index.describe(index))

    def name(self, index: int) -> str:
        """``shard:key`` of the sample."""
        return self.index.describe(index)

    def fingerprint(self) -> dict:
        return self.index.fingerprint()

    @property
    def shard_lengths(self) -> list[int]:
        return self.index.shard_lengths

    @property
    def read_retries(self) -> int:
        return self.store.retry_count.value

    def shard_url(self, shard: int) -> str:
        return self._shard_urls[shard]

    def byte_range(self, index: int) -> tuple[int, int, int]:
        """(shard, start, end) of what reading sample ``index`` fetches."""
        start = int(self.index.start[index])
        return int(self.index.shard[index]), start, start + int(self.index.length[index])

    def read(self, index: int) -> torch.Tensor:
        """The sample's encoded image as uint8 bytes; raises when it cannot be read (a truncated shard, a row
        without bytes), or ``ShardUnreachableError`` when the store stays unreachable."""
        if self.index.format == "parquet":
            data = self._parquet_image(index)
        else:
            data = self._cached_or_fetched(*self.byte_range(index))
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)

    def _cached_or_fetched(self, shard: int, start: int, end: int) -> bytes:
        if self.cache is not None:
            data = self.cache.read(self._shard_urls[shard], start, end)
            if data is not None:
                return data
        return self.fetch(shard, start, end)

    def fetch(self, shard: int, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a shard from the store (one range request, retried)."""
        return self.store.read_range(self.index.shards[shard], start, end)

    def stored_form(self, shard: int, start: int, end: int, data: bytes) -> bytes:
        """What the host cache keeps of a fetched range: the bytes of a tar; the images of a parquet row group,
        decoded once by the planner and packed so that workers read a row without decoding."""
        if self.index.format != "parquet":
            return data
        group = int(self.index.row_group[np.flatnonzero((self.index.shard == shard) & (self.index.start == start))[0]])
        return _parquet().packed_row_group(lambda a, b: data[a - start:b - start], self.index.shard_sizes[shard],
                                           self._file_metadata(shard), group)

    def _parquet_image(self, index: int) -> bytes:
        shard, group, row = int(self.index.shard[index]), int(self.index.row_group[index]), int(self.index.row[index])
        data = None
        packed = self.cache.exact(self._shard_urls[shard], *self.byte_range(index)[1:]) if self.cache else None
        if packed is not None:
            data = _parquet().packed_row(packed, row)
        if data is None:  # not planned, or evicted: this worker decodes the row group, and keeps the last two
            images = self._row_groups.get((shard, group))
            if images is None:
                images = self._decode_row_group(shard, group, lambda start, end: self.fetch(shard, start, end))
                self._row_groups[(shard, group)] = images
                while len(self._row_groups) > 2:
                    self._row_groups.popitem(last=False)
            data = images[row]
        if not data:
            raise ValueError("the row holds no image bytes")
        return data

    def _decode_row_group(self, shard: int, group: int, fetch) -> list[bytes | None]:
        return _parquet().row_group_images(fetch, self.index.shard_sizes[shard], self._file_metadata(shard), group)

    def _file_metadata(self, shard: int):
        if shard not in self._metadata:
            self._metadata[shard] = _parquet().metadata_from_footer(self.index.footers[shard])
        return self._metadata[shard]


def open_shards(format: str, root: str, split: str, *, cache_dir: str | None, cache_limit_gb: float,
                retries: int) -> ShardSource:
    """The split's source: its index (the root's ``_index/`` from scripts/index_shards.py, else this host's cached
    copy, else built now and cached), checked against the shards as they are now."""
    store = Store(root, retries=retries)
    store.check_root()
    folder = Path(cache_dir or default_cache_dir())
    index = load_index(store, format, split, folder)
    cache = RangeCache(folder / "ranges", int(cache_limit_gb * 2**30)) if is_url(root) else None
    return ShardSource(store, index, cache)


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mambaout", "data")


def shard_names(store: Store, format: str, split: str) -> list[str]:
    return split_shards(store, split)[0] if format == "wds" else _parquet().split_files(store, split)


def build_index(store: Store, format: str, split: str) -> SplitIndex:
    names = shard_names(store, format, split)
    return _build(format, store, split, store.versions(names))


def load_index(store: Store, format: str, split: str, cache_folder: Path) -> SplitIndex:
    names = shard_names(store, format, split)
    current = store.versions(names)
    shared = _read_index(store, index_name(split, format))
    if shared is not None and not stale_shards(shared, current) and shared.shards == names:
        return shared
    local = cache_folder / "index" / hashlib.sha1(store.url().encode()).hexdigest()[:20] / f"{split}.{format}.npz"
    local.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{local}.lock", "w") as lock:  # one builder per host; the others wait and read its result
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _read_local(local)
        if cached is not None and not stale_shards(cached, current) and cached.shards == names:
            return cached
        changed = stale_shards(shared or cached, current) if (shared or cached) else []
        if changed:
            log.warning("%s: %d shard(s) changed since indexing (e.g. %s); indexing split %r again", store.url(),
                        len(changed), changed[0], split)
        else:
            log.info("indexing %s split %r (once; scripts/index_shards.py writes a shared index for every host)",
                     store.url(), split)
        index = _build(format, store, split, current)
        index.save(local)
        return index


def _read_index(store: Store, name: str) -> SplitIndex | None:
    try:
        return _parsed(store.read_bytes(name), store.url(name))
    except FileNotFoundError:
        return None


def _read_local(path: Path) -> SplitIndex | None:
    try:
        return _parsed(path.read_bytes(), str(path))
    except FileNotFoundError:
        return None


def _parsed(data: bytes, where: str) -> SplitIndex | None:
    """The index in ``data``, or None (with a warning) when it is not one this version reads: it is rebuilt."""
    try:
        return SplitIndex.from_bytes(data)
    except (ValueError, KeyError, OSError) as error:
        log.warning("%s is not a readable index (%s); rebuilding it", where, error)
        return None
