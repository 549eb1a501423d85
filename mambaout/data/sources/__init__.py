"""Where a dataset's bytes come from, apart from how pixels are made (the pipelines): class folders on a disk
(``folder``), webdataset tars (``wds``) and parquet files (``parquet``), on a disk or in object storage (any fsspec
URL), indexed, cached on the host and read by plan (``readahead``).

A source gives, per sample index: its encoded bytes (``read``), target and a name for messages (``describe``);
and for the whole split its classes and fingerprint. Sample ``i`` is the same image whatever the format it was
converted to (``scripts/make_shards.py`` keeps the folder's order), so the same images give the same run.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .folder import DatasetFormatError, DatasetNotFoundError, FolderSource, scan_split
from .index import changed_shards
from .shards import ShardSource, open_shards
from .store import DataSourceError, ShardUnreachableError, is_url

SHARD_FORMATS = ("wds", "parquet")


class Source(Protocol):
    classes: list[str]
    targets: list[int]

    def __len__(self) -> int: ...

    def read(self, index: int) -> torch.Tensor: ...

    def describe(self, index: int) -> str: ...

    def fingerprint(self) -> dict[str, Any]: ...


def open_source(format: str, root: str, split: str, *, classes: Sequence[str] | None = None,
                cache_dir: str | None = None, cache_limit_gb: float = 50.0, retries: int = 8) -> Source:
    """The ``split`` of the dataset at ``root`` (a local path, or a URL for the shard formats)."""
    if format == "folder":
        if is_url(root):
            raise DataSourceError(
                f"data.root={root} is a URL, and data.format=folder reads a local folder; convert the folder to "
                "shards (python scripts/make_shards.py SRC URL --format wds) and set data.format=wds")
        samples, found = scan_split(root, split, classes)
        return FolderSource(samples, found, f"{root}/{split}" if split else root)
    if format not in SHARD_FORMATS:
        raise DataSourceError(f"data.format={format!r} is not a dataset format; expected folder, "
                              f"{', '.join(SHARD_FORMATS)} or synthetic")
    source = open_shards(format, root, split, cache_dir=cache_dir, cache_limit_gb=cache_limit_gb, retries=retries)
    if classes is not None:
        source.classes = _named_classes(source, list(classes))
    return source


def _named_classes(source: ShardSource, classes: list[str]) -> list[str]:
    """The given class list (e.g. a checkpoint's) where it fits the shards: the same names, or names for shards
    whose classes are only numbered."""
    if source.classes == classes:
        return classes
    numbered = source.classes == [str(target) for target in range(len(source.classes))]
    if numbered and max(source.targets) < len(classes):
        return classes
    raise DatasetFormatError(
        f"{source.root}: the shards' {len(source.classes)} classes ({source.classes[:3]}...) are not the "
        f"{len(classes)} classes given ({classes[:3]}...), e.g. a checkpoint's; evaluate with the class list they "
        "were trained on, or fix the dataset's classes.txt")


def source_options(data) -> dict[str, Any]:
    """``open_source``'s cache and retry settings from the config's ``data`` section."""
    return {"cache_dir": data.cache_dir, "cache_limit_gb": data.cache_limit_gb, "retries": data.read_retries}


def plan_reads(dataset, batch_sampler, data, *, host_shard_ids: Sequence[int] | None = None, plans: bool = True):
    """The batch sampler to give the DataLoader: ``batch_sampler`` itself, or for shards at a URL the same batches
    with the reads planned ahead (training: the host's samples, ``host_shard_ids``; evaluation: this process's).
    ``data``: the config's ``data`` section (read-ahead, threads, request and gap sizes)."""
    from .readahead import Fetcher, PlannedEvalBatches, PlannedTrainBatches, Planner

    source = getattr(dataset, "source", None)
    if not (plans and isinstance(source, ShardSource) and source.cache is not None and data.read_ahead_steps):
        return batch_sampler
    planner = Planner(source, Fetcher(source, data.read_threads), data.read_ahead_steps,
                      gap_bytes=int(data.read_gap_mb * 2**20), request_bytes=int(data.read_request_mb * 2**20),
                      workers=data.num_workers)
    if host_shard_ids is None:
        return PlannedEvalBatches(batch_sampler, planner)
    return PlannedTrainBatches(batch_sampler, planner, host_shard_ids)


def shuffle_for(data, dataset):
    """The training order the config asks for: None (``global``, the sampler's default) or a ``WindowShuffle``
    over the dataset's shards."""
    from ..sampling import WindowShuffle

    if data.shuffle == "global":
        return None
    source = getattr(dataset, "source", None)
    if not isinstance(source, ShardSource):
        raise DataSourceError(f"data.shuffle=window permutes shards, and data.format={data.format} has none; use "
                              "data.shuffle=global, or convert the folder to shards with scripts/make_shards.py")
    return WindowShuffle(source.shard_lengths, data.shuffle_window)


def describe_data_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What changed in the training data between a checkpoint's fingerprint and today's (resume refusals)."""
    shards = changed_shards(old, new)
    if shards:
        shown = ", ".join(shards[:5]) + (f" and {len(shards) - 5} more" if len(shards) > 5 else "")
        return (f"training data: {len(shards)} shard(s) changed since the checkpoint (size or version): {shown}; "
                "restore them, or start a new run")
    return f"training data: {old} -> {new}"


__all__ = ["DataSourceError", "DatasetFormatError", "DatasetNotFoundError", "FolderSource", "ShardSource",
           "ShardUnreachableError", "Source", "describe_data_change", "open_source", "plan_reads", "scan_split",
           "shuffle_for", "source_options"]
