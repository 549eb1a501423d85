"""Reads by plan. The sample order is a pure function of (seed, epoch, index), so a host knows which samples its
next steps take before any worker asks: the planner turns them into byte ranges, merges neighbouring ranges of a
shard (bridging gaps up to ``gap_bytes``, up to ``request_bytes`` a request), fetches them in threads into the
host's cache, and keeps ``ahead`` units in flight. A unit is an optimizer step (``global`` shuffle), a shuffle
window (``window``: the samples of a window lie in its few shards, so its ranges merge into large requests) or an
evaluation batch. The plan lives in memory only: on resume it is derived again from the step.

Processes that do not plan (other local ranks) read the cache as well; a range in flight is waited for, a range
nobody planned is fetched by the worker that needs it.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from .shards import ShardSource

log = logging.getLogger(__name__)


def merge_ranges(ranges: Sequence[tuple[int, int, int]], gap_bytes: int, request_bytes: int
                 ) -> list[tuple[int, int, int]]:
    """(shard, start, end) requests covering ``ranges``: sorted, duplicates dropped, neighbours within
    ``gap_bytes`` joined while a request stays within ``request_bytes`` (a single larger range stays whole)."""
    merged: list[list[int]] = []
    for shard, start, end in sorted(set(ranges)):
        last = merged[-1] if merged else None
        if (last is not None and last[0] == shard and start - last[2] <= gap_bytes
                and max(end, last[2]) - last[1] <= request_bytes):
            last[2] = max(last[2], end)
        else:
            merged.append([shard, start, end])
    return [tuple(request) for request in merged]


class Fetcher:
    """Fetches requests into the cache on daemon threads (a run that stops does not wait for its read-ahead); a
    request already cached or claimed is skipped. The threads start with the first request, after the
    DataLoader has forked its workers."""

    def __init__(self, source: ShardSource, threads: int) -> None:
        self.source = source
        self.threads = threads
        self._queue: queue.Queue[tuple[int, int, int]] = queue.Queue()
        self._warned = threading.Event()
        self._started = False

    def submit(self, requests: list[tuple[int, int, int]]) -> None:
        """Claims each request now, so a reader that needs it waits for it rather than fetching it again."""
        if not self._started:
            self._started = True
            for number in range(self.threads):
                threading.Thread(target=self._serve, name=f"mambaout-read-{number}", daemon=True).start()
        cache = self.source.cache
        for shard, start, end in requests:
            url = self.source.shard_url(shard)
            if not cache.covered(url, start, end) and cache.claim(url, start, end):
                self._queue.put((shard, start, end))

    def _serve(self) -> None:
        while True:
            self._fetch(*self._queue.get())

    def _fetch(self, shard: int, start: int, end: int) -> None:
        """Fetches a claimed request into the cache; on failure the claim is released and the workers read these
        samples themselves, meeting the error where it counts (an unreadable image, or the run's stop)."""
        url = self.source.shard_url(shard)
        try:
            data = self.source.stored_form(shard, start, end, self.source.fetch(shard, start, end))
        except Exception as error:  # noqa: BLE001 - the plan only loses its head start
            self.source.cache.release(url, start, end)
            if not self._warned.is_set():
                self._warned.set()
                log.warning("read plan: %s", error)
            return
        self.source.cache.put(url, start, end, data)


class Planner:
    """Plans the reads of a sequence of units (each a list of sample indices) ``ahead`` units in advance, as far as
    the cache holds them (``budget_bytes``)."""

    def __init__(self, source: ShardSource, fetcher: Fetcher, ahead: int, gap_bytes: int,
                 request_bytes: int, workers: int) -> None:
        self.source, self.fetcher, self.ahead = source, fetcher, ahead
        # How far the DataLoader runs ahead of the batches its workers read (prefetch_factor 2 per worker): the
        # plan keeps a unit's ranges until the sampler is that far past it.
        self.lag_batches = 2 * workers + 1
        # A parquet request is one row group's image column, which the cache keeps decoded: never merged.
        self.gap_bytes = -1 if source.index.format == "parquet" else gap_bytes
        self.request_bytes = request_bytes
        # Units planned beyond what the cache holds would be fetched and evicted unread (a trim spares the ranges
        # the plan awaits, so the rest of the cache goes first).
        self.budget_bytes = source.cache.limit_bytes

    def requests(self, indices: Sequence[int]) -> list[tuple[int, int, int]]:
        index = self.source.index
        indices = np.asarray(indices, dtype=np.int64)
        indices = indices[indices >= 0]  # padding rows read nothing
        starts = index.start[indices]
        ranges = zip(index.shard[indices].tolist(), starts.tolist(), (starts + index.length[indices]).tolist())
        return merge_ranges(list(ranges), self.gap_bytes, self.request_bytes)

    def run_ahead(self, units: Iterator[Sequence[int]], first: int = 0) -> "Lookahead":
        return Lookahead(self, units, first)


class Lookahead:
    """Keeps the units up to ``current + ahead`` submitted while the units not yet read fit the planner's budget
    (the current unit always goes): a unit is fetched later rather than fetched, evicted and fetched again.
    ``units`` yields the samples of units ``first``, ``first + 1``, ..."""

    def __init__(self, planner: Planner, units: Iterator[Sequence[int]], first: int) -> None:
        self.planner, self.units, self.next_unit = planner, units, first
        # (unit, bytes, requests) submitted and not read yet
        self.held: collections.deque[tuple[int, int, list[tuple[int, int, int]]]] = collections.deque()
        self.pending: tuple[list[tuple[int, int, int]], int] | None = None  # the next unit's requests and bytes

    def advance_to(self, unit: int, reading: int | None = None) -> None:
        """Units up to ``unit + ahead`` planned; the workers may still read unit ``reading`` (default ``unit``):
        the units before it are done with, their ranges free to go."""
        reading = unit if reading is None else reading
        if self.held and self.held[0][0] < reading:  # the needed ranges change only when a unit is done with
            while self.held and self.held[0][0] < reading:
                self.held.popleft()
            self._publish_needed()
        self._submit_up_to(unit)

    def _publish_needed(self) -> None:
        source = self.planner.source
        source.cache.keep_needed([(source.shard_url(shard), start, end)
                                  for _, _, requests in self.held for shard, start, end in requests])

    def _submit_up_to(self, unit: int) -> None:
        while self.next_unit <= unit + self.planner.ahead:
            if self.pending is None:
                indices = next(self.units, None)
                if indices is None:
                    return
                requests = self.planner.requests(indices)
                self.pending = requests, sum(end - start for _, start, end in requests)
            requests, size = self.pending
            if self.next_unit > unit and sum(held for _, held, _ in self.held) + size > self.planner.budget_bytes:
                return  # planned once the units before it are read
            self.held.append((self.next_unit, size, requests))
            self._publish_needed()  # before a fetcher thread puts (and trims)
            self.planner.fetcher.submit(requests)
            self.pending = None
            self.next_unit += 1


class PlannedTrainBatches:
    """The training batch sampler with the host's reads planned ahead: yields exactly what ``sampler`` yields
    (the loop and the run are unchanged), and before each optimizer step schedules the ranges of the host's
    samples ``ahead`` units later (a unit: an optimizer step, or a shuffle window). Other attributes are the
    sampler's."""

    def __init__(self, sampler, planner: Planner, host_shard_ids: Sequence[int]) -> None:
        self.sampler, self.planner, self.host_shard_ids = sampler, planner, list(host_shard_ids)

    def __getattr__(self, name: str):
        return getattr(self.sampler, name)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list]:
        sampler = self.sampler
        bounds = self._unit_bounds()

        def unit_of_step(step: int) -> int:
            return int(np.searchsorted(bounds, step * sampler.global_batch_size, side="right") - 1)

        def unit_of(position: int) -> int:  # of the position-th batch this sampler yields
            return unit_of_step(sampler.start_step + max(position, 0) // sampler.accum_steps)

        first = unit_of(0)
        lookahead = self.planner.run_ahead(self._host_units(bounds, first), first)
        for position, batch in enumerate(sampler):
            lookahead.advance_to(unit_of(position), reading=unit_of(position - self.planner.lag_batches))
            yield batch

    def _unit_bounds(self) -> np.ndarray:
        """Unit boundaries in positions of the epoch's order: shuffle windows, or optimizer steps."""
        sampler = self.sampler
        windows = getattr(sampler.shuffle, "window_bounds", None)
        if windows is not None:
            return np.asarray(windows(sampler.seed, sampler.epoch))
        return np.arange(0, sampler.steps_per_epoch * sampler.global_batch_size + 1, sampler.global_batch_size)

    def _host_units(self, bounds: np.ndarray, first: int) -> Iterator[np.ndarray]:
        """The samples of each unit from ``first`` on that this host's shards take (the dropped tail excluded)."""
        sampler = self.sampler
        order = sampler.epoch_order().numpy()
        used = sampler.steps_per_epoch * sampler.global_batch_size
        micro = (np.arange(used) % sampler.global_batch_size) // sampler.micro_batch_size
        mine = np.isin(micro % sampler.num_shards, self.host_shard_ids)
        for low, high in zip(bounds[first:-1].tolist(), bounds[first + 1:].tolist()):
            high = min(high, used)
            if low < high:
                yield order[low:high][mine[low:high]]


class PlannedEvalBatches:
    """An evaluation batch sampler with each process's own batches planned ``ahead`` batches in advance."""

    def __init__(self, sampler, planner: Planner) -> None:
        self.sampler, self.planner = sampler, planner

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        batches = list(self.sampler)
        lookahead = self.planner.run_ahead(iter(batches))
        for position, batch in enumerate(batches):
            lookahead.advance_to(position, reading=max(0, position - self.planner.lag_batches))
            yield batch
