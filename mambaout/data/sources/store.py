"""Where a dataset's bytes live: a local folder or any fsspec URL (``s3://``, ``gs://``, ``https://``, ``file://``).

``Store`` is the one place that talks to a filesystem: it opens the root (credentials come from the usual
environment of each filesystem, never from the config, so nothing secret is logged), lists and stats shards,
and reads byte ranges. Transient faults (timeouts, 5xx answers, reset connections) are retried with exponential
backoff and counted; a read that still fails after ``retries`` tries raises :class:`ShardUnreachableError`,
naming the URL, the tries and the last error. Errors that retrying cannot fix (a missing object or bucket, a
refused permission) are raised at once.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import posixpath
import random
import time
from typing import Any

import fsspec
import fsspec.core
import fsspec.implementations.local
import yaml

KNOWN_SCHEMES = ("a local path", "file://", "s3://", "gs://", "https://")

_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_VERSION_KEYS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified", "created")


_INHERITED: list[Any] = []  # filesystems a forked process inherited (see Store.fs)


class DataSourceError(RuntimeError):
    """The dataset cannot be read as configured: the message names the file or URL and the fix."""


class ShardUnreachableError(DataSourceError):
    """A shard still could not be read after every retry: the run stops (its last checkpoint is intact)."""


def is_url(root: str) -> bool:
    return "://" in root


class RetryCounter:
    """Retries of transient faults, counted across the processes of a host: DataLoader workers are forked from
    the main process and inherit the shared value."""

    def __init__(self) -> None:
        self._value = multiprocessing.Value("q", 0)

    def add(self, count: int = 1) -> None:
        with self._value.get_lock():
            self._value.value += count

    @property
    def value(self) -> int:
        return self._value.value


class Store:
    """A dataset root, read through fsspec: paths below it are names relative to the root (``train-000.tar``)."""

    def __init__(self, root: str, *, retries: int = 8, backoff_s: float = 0.25) -> None:
        self.root = root.rstrip("/") if is_url(root) else root
        self.retries = max(1, retries)
        self.backoff_s = backoff_s
        self.retry_count = RetryCounter()
        self._fs, self._fs_pid = None, None
        self.base = self._open()[1].rstrip("/")

    def _open(self):
        scheme = self.root.split("://", 1)[0] if is_url(self.root) else "file"
        try:
            fs, base = fsspec.core.url_to_fs(self.root, skip_instance_cache=True, **_single_try_options(scheme))
        except (ValueError, ImportError) as error:
            raise DataSourceError(
                f"data.root={self.root}: cannot open this URL ({error}); expected {', '.join(KNOWN_SCHEMES)}. "
                "s3:// needs the s3fs package and gs:// gcsfs (pip install -e '.[shards]')") from None
        if hasattr(fs, "retries"):
            fs.retries = 1  # s3fs/gcsfs retry loops: this class retries, counts and reports instead
        self._fs, self._fs_pid = fs, os.getpid()
        return fs, base

    @property
    def fs(self):
        """The filesystem, opened again in each process: fsspec's async filesystems (s3fs, gcsfs) are not
        fork-safe, and DataLoader workers are forked."""
        if self._fs_pid != os.getpid():
            # The parent's copy is kept, never collected: closing its session would run on the parent's event
            # loop, which does not exist here.
            _INHERITED.append(self._fs)
            self._open()
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_fs_pid": None}  # spawned workers reopen it

    def url(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root

    def _path(self, name: str) -> str:
        return posixpath.join(self.base, name) if name else self.base

    def exists(self, name: str) -> bool:
        return self._retrying(name, lambda: self.fs.exists(self._path(name)))

    def read_bytes(self, name: str) -> bytes:
        return self._retrying(name, lambda: self.fs.cat_file(self._path(name)))

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``name`` in one range request (retried)."""
        data = self._retrying(name, lambda: self.fs.cat_file(self._path(name), start=start, end=end))
        if len(data) != end - start:  # a shard shorter than its index says: truncated since
            raise EOFError(f"{self.url(name)}: asked for bytes {start}-{end}, got {len(data)}")
        return data

    def write_bytes(self, name: str, data: bytes) -> None:
        """Writes one object whole (object stores publish it at once; a local file goes through a rename)."""
        if isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            from .index import write_atomically

            write_atomically(self._path(name), data)
        else:
            self._retrying(name, lambda: self.fs.pipe_file(self._path(name), data))

    def open(self, name: str, block_size: int = 64 << 20):
        """A sequential reader of the whole object (indexing)."""
        return self.fs.open(self._path(name), "rb", block_size=block_size)

    def read_info(self, names: tuple[str, ...] = ("_info.json", "info.json", "info.yaml", "_info.yaml")
                  ) -> tuple[str, dict[str, Any]] | None:
        """The first of the dataset-info files that exists, parsed: (name, content)."""
        for name in names:
            try:
                text = self.read_bytes(name)
            except FileNotFoundError:
                continue
            loaded = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
            return name, loaded
        return None

    def versions(self, names: list[str]) -> dict[str, tuple[int, str]]:
        """(size, version) of each object: the ETag on S3, the generation/md5 on GCS, the mtime of a local file.
        Objects in one folder are listed with one request."""
        folders: dict[str, list[str]] = {}
        for name in names:
            folders.setdefault(posixpath.dirname(name), []).append(name)
        found: dict[str, tuple[int, str]] = {}
        for folder, members in folders.items():
            listing = self._retrying(folder or "/", lambda: self.fs.ls(self._path(folder), detail=True))
            by_name = {posixpath.basename(entry["name"].rstrip("/")): entry for entry in listing}
            for name in members:
                entry = by_name.get(posixpath.basename(name))
                if entry is not None:
                    found[name] = (int(entry["size"]), _version(entry))
        missing = [name for name in names if name not in found]
        if missing:
            raise DataSourceError(f"{self.url()}: {len(missing)} shard(s) listed in the dataset are missing, e.g. "
                                  f"{self.url(missing[0])}; restore them or rebuild the dataset's shard list")
        return found

    def check_root(self) -> None:
        """One clear error for a root that does not exist (a missing folder, prefix or bucket)."""
        try:
            present = self._retrying("", lambda: self.fs.exists(self.base) or bool(self.fs.ls(self.base)))
        except FileNotFoundError:
            present = False
        except PermissionError as error:
            raise DataSourceError(f"data.root={self.root}: access denied ({error}); check the credentials in "
                                  "the environment (AWS_* for S3, GOOGLE_APPLICATION_CREDENTIALS for GCS)") from None
        if not present:
            raise DataSourceError(f"data.root={self.root} does not exist (no such folder, prefix or bucket); "
                                  "point data.root at the folder that holds the shards")

    def _retrying(self, name: str, operation):
        delay = self.backoff_s
        for attempt in range(1, self.retries + 1):
            try:
                return operation()
            except _PERMANENT:
                raise
            except Exception as error:  # noqa: BLE001 - each filesystem raises its own transient errors
                if attempt == self.retries:
                    raise ShardUnreachableError(
                        f"{self.url(name)} could not be read after {attempt} tries (last error: "
                        f"{type(error).__name__}: {error}); the run stopped at its last checkpoint, rerun the "
                        "same command once the storage answers again") from None
                self.retry_count.add()
                time.sleep(delay * (1 + random.random()))  # noqa: S311 - jitter spreads hosts' retries apart
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")


def _single_try_options(scheme: str) -> dict[str, Any]:
    """Storage options that leave retrying to ``Store``: botocore's own retries off (s3fs)."""
    if scheme in ("s3", "s3a"):
        return {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
    return {}


def _version(entry: dict[str, Any]) -> str:
    for key in _VERSION_KEYS:
        if entry.get(key) is not None:
            return f"{key}={entry[key]}"
    return ""
