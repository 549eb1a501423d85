"""The host's local cache of fetched byte ranges, shared by its processes and their DataLoader workers.

A cached range is one file, ``<folder>/<shard digest>/<start>-<end>``, written under a temporary name and renamed,
so a reader never sees half of it and concurrent writers never tear one. Before fetching, a writer claims the
range with ``<start>-<end>.part`` (created exclusively, holding the writer's pid): a reader that finds its range
claimed waits for it instead of fetching it a second time; a claim whose process died (a killed run) or that is
older than ``wait_s`` is stale and taken over. When the cache holds
more than its limit, the oldest ranges that the plan no longer awaits are deleted (a reader that already opened
one keeps reading it).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

_CLAIM = ".part"


class RangeCache:
    def __init__(self, folder: str | os.PathLike, limit_bytes: int, wait_s: float = 120.0) -> None:
        self.folder = Path(folder)
        self.limit_bytes = limit_bytes
        self.wait_s = wait_s
        self.folder.mkdir(parents=True, exist_ok=True)
        self._estimate: int | None = None  # bytes held, as this process last counted them plus what it put since
        self._needed: dict[str, list[tuple[int, int]]] = {}  # per shard folder: ranges this process's plan awaits
        self._folders: dict[str, Path] = {}
        self._last_hit: dict[Path, tuple[int, int]] = {}  # per shard folder: the range that served the last read

    def _shard_folder(self, shard_url: str) -> Path:
        folder = self._folders.get(shard_url)
        if folder is None:
            folder = self._folders[shard_url] = self.folder / hashlib.sha1(shard_url.encode()).hexdigest()[:20]
        return folder

    def _ranges(self, folder: Path) -> list[tuple[int, int, bool]]:
        """(start, end, claimed) of each cached or claimed range of a shard."""
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            stem, claimed = (name[:-len(_CLAIM)], True) if name.endswith(_CLAIM) else (name, False)
            start, dash, end = stem.partition("-")
            if dash and start.isdigit() and end.isdigit():
                found.append((int(start), int(end), claimed))
        return found

    def read(self, shard_url: str, start: int, end: int, wait: bool = True) -> bytes | None:
        """Bytes ``[start, end)`` of the shard when a cached range covers them (waiting for a claimed one),
        else None."""
        folder = self._shard_folder(shard_url)
        low, high = self._last_hit.get(folder, (0, 0))
        if low <= start and end <= high:  # a window's reads of a shard come from few ranges: no listing then
            data = _read_slice(folder / f"{low}-{high}", start - low, end - start)
            if data is not None:
                return data
        deadline = time.monotonic() + self.wait_s
        while True:
            claimed = False
            for low, high, is_claim in self._ranges(folder):
                if low <= start and end <= high:
                    if is_claim:
                        claimed = claimed or self._fresh(folder / f"{low}-{high}{_CLAIM}")
                        continue
                    data = _read_slice(folder / f"{low}-{high}", start - low, end - start)
                    if data is not None:
                        self._last_hit[folder] = low, high
                        return data
            if not (wait and claimed) or time.monotonic() > deadline:
                return None
            time.sleep(0.01)

    def exact(self, shard_url: str, start: int, end: int) -> Path | None:
        """The file stored for exactly ``[start, end)`` (waiting for a claim of it), or None. For entries whose
        content is not the raw bytes (parquet row groups kept decoded, ``parquet.packed_row_group``)."""
        path = self._shard_folder(shard_url) / f"{start}-{end}"
        claim = path.with_name(path.name + _CLAIM)
        deadline = time.monotonic() + self.wait_s
        while not path.exists() and self._fresh(claim) and time.monotonic() < deadline:
            time.sleep(0.01)
        return path if path.exists() else None

    def covered(self, shard_url: str, start: int, end: int) -> bool:
        """A cached or claimed range already holds ``[start, end)``."""
        return any(low <= start and end <= high for low, high, _ in self._ranges(self._shard_folder(shard_url)))

    def claim(self, shard_url: str, start: int, end: int) -> bool:
        folder = self._shard_folder(shard_url)
        folder.mkdir(exist_ok=True)
        claim = folder / f"{start}-{end}{_CLAIM}"
        try:
            handle = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            handle = None
        if handle is not None:
            os.write(handle, str(os.getpid()).encode())
            os.close(handle)
            return True
        if self._fresh(claim):
            return False
        claim.unlink(missing_ok=True)  # its writer died: take it over
        return self.claim(shard_url, start, end)

    def release(self, shard_url: str, start: int, end: int) -> None:
        (self._shard_folder(shard_url) / f"{start}-{end}{_CLAIM}").unlink(missing_ok=True)

    def put(self, shard_url: str, start: int, end: int, data: bytes) -> None:
        """Stores a range this process claimed, then releases the claim and trims the cache to its limit."""
        folder = self._shard_folder(shard_url)
        if self._estimate is None:
            self._estimate = self.size_bytes()
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, folder / f"{start}-{end}")
        finally:
            Path(temporary).unlink(missing_ok=True)
            self.release(shard_url, start, end)
        self._estimate += len(data)
        if self._estimate > self.limit_bytes:
            self.trim(spare=str(folder / f"{start}-{end}"))

    def keep_needed(self, ranges: list[tuple[str, int, int]]) -> None:
        """The ``(shard_url, start, end)`` ranges the plan has fetched or will fetch and not read yet: a trim spares
        the cached ranges that hold them (age alone is not enough: a range reused by a later unit is old, and
        alive)."""
        needed: dict[str, list[tuple[int, int]]] = {}
        for url, start, end in ranges:
            needed.setdefault(self._shard_folder(url).name, []).append((start, end))
        self._needed = needed

    def _is_needed(self, path: str) -> bool:
        folder, _, name = path.rpartition(os.sep)
        low, _, high = name.partition("-")
        return any(start < int(high) and int(low) < end
                   for start, end in self._needed.get(os.path.basename(folder), ()))

    def trim(self, keep: float = 0.9, spare: str | None = None) -> None:
        """Deletes the oldest ranges that the plan no longer needs (``spare`` never: the one just put) until the
        cache holds at most ``keep`` of its limit (the margin spares a scan on every put)."""
        entries = [(stat.st_mtime, stat.st_size, path) for path, stat in self._entries()
                   if path != spare and not self._is_needed(path)]
        total = self.size_bytes()
        for _, size, path in sorted(entries):
            if total <= keep * self.limit_bytes:
                break
            Path(path).unlink(missing_ok=True)
            total -= size
        self._estimate = total

    def size_bytes(self) -> int:
        return sum(stat.st_size for _, stat in self._entries())

    def _entries(self) -> list[tuple[str, os.stat_result]]:
        """Each cached range's path and stat (not claims, not another writer's temporary files)."""
        found = []
        for folder in self.folder.iterdir():
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if entry.name.startswith(".") or entry.name.endswith(_CLAIM):
                    continue
                try:
                    found.append((entry.path, entry.stat()))
                except FileNotFoundError:  # evicted meanwhile
                    continue
        return found

    def _fresh(self, claim: Path) -> bool:
        """A claim whose writer (a process of this host: the cache is per host) still lives, for ``wait_s``."""
        try:
            owner, age = claim.read_text(), time.time() - claim.stat().st_mtime
        except FileNotFoundError:
            return False
        if not owner.isdigit():
            return age < 1.0  # just created, its pid not written yet
        return age < self.wait_s and _alive(int(owner))


def _read_slice(path: Path, offset: int, length: int) -> bytes | None:
    try:
        with open(path, "rb") as file:
            data = os.pread(file.fileno(), length, offset)
    except FileNotFoundError:  # evicted between the listing and the open
        return None
    return data if len(data) == length else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
