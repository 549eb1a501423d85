#!/usr/bin/env python3
"""Indexes a sharded dataset once, for every host that will train on it.

    python scripts/index_shards.py s3://bucket/imagenet-wds --format wds
    python scripts/index_shards.py gs://bucket/imagenet-parquet --format parquet --splits train,validation

For each split: where every sample's bytes are ((shard, byte offset, length) of each tar member; (file, row group,
row) and the image column's byte range for parquet), its class, and each shard's size and version (ETag,
generation or mtime). The index is written to ROOT/_index/<split>.<format>.npz, where training finds it; a shard
changed since then is noticed at the next start and indexed again. Without this step each host indexes on first
use and caches the result in data.cache_dir, reading the whole of every tar once (parquet: only the footers and
labels).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mambaout.data.sources import DataSourceError  # noqa: E402
from mambaout.data.sources.index import index_name  # noqa: E402
from mambaout.data.sources.shards import build_index  # noqa: E402
from mambaout.data.sources.store import Store  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the dataset: a local path or an fsspec URL (s3://, gs://, https://, file://)")
    parser.add_argument("--format", required=True, choices=("wds", "parquet"), help="the shards' layout")
    parser.add_argument("--splits", default="train,val", help="comma-separated splits (default train,val; 'val' "
                        "also finds a split named 'validation')")
    args = parser.parse_args(argv)
    try:
        store = Store(args.root)
        store.check_root()
        for split in args.splits.split(","):
            start = time.perf_counter()
            index = build_index(store, args.format, split)
            store.write_bytes(index_name(split, args.format), index.to_bytes())
            print(f"{split}: {len(index)} samples in {len(index.shards)} shards, {len(index.classes)} classes, "
                  f"{time.perf_counter() - start:.1f} s -> {store.url(index_name(split, args.format))}")
    except DataSourceError as error:
        print(f"index_shards.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
