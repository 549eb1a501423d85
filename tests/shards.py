"""Shards of a test image folder written by the ecosystem's own writers (webdataset's TarWriter, pyarrow), so the
readers are tested on files this project did not write. Sample ``i`` of a split is image ``i`` of the folder."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset

from mambaout.data import scan_split


def split_samples(folder: Path, split: str, classes=None) -> tuple[list[tuple[str, int]], list[str]]:
    return scan_split(folder, split, classes)


def write_wds(folder: Path, out: Path, per_shard: int = 5, splits=("train", "val")) -> Path:
    """timm's layout: ``<split>-NNNNNN.tar`` with ``<key>.png`` + ``<key>.cls``, ``_info.json``, ``classes.txt``."""
    out.mkdir(parents=True, exist_ok=True)
    info, classes = {"name": "test", "splits": {}}, None
    for split in splits:
        samples, classes = split_samples(folder, split, classes)
        names, lengths = [], []
        for start in range(0, len(samples), per_shard):
            name = f"{split}-{len(names):06d}.tar"
            with webdataset.TarWriter(str(out / name)) as writer:
                for index, (path, target) in enumerate(samples[start:start + per_shard], start):
                    writer.write({"__key__": f"{index:08d}", "png": Path(path).read_bytes(), "cls": target})
            names.append(name)
            lengths.append(len(samples[start:start + per_shard]))
        info["splits"][split] = {"name": split, "num_samples": len(samples), "filenames": names,
                                 "shard_lengths": lengths}
    (out / "_info.json").write_text(json.dumps(info))
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    return out


def write_parquet(folder: Path, out: Path, per_file: int = 16, per_row_group: int = 5,
                  splits=("train", "val")) -> Path:
    """Hugging Face's layout: ``data/<split>-NNNNN-of-NNNNN.parquet`` with ``image`` {bytes, path} and ``label``."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    classes = None
    for split in splits:
        samples, classes = split_samples(folder, split, classes)
        starts = range(0, len(samples), per_file)
        for number, start in enumerate(starts):
            rows = samples[start:start + per_file]
            table = pa.table({
                "image": [{"bytes": Path(path).read_bytes(), "path": Path(path).name} for path, _ in rows],
                "label": pa.array([target for _, target in rows], pa.int64())})
            pq.write_table(table, out / "data" / f"{split}-{number:05d}-of-{len(starts):05d}.parquet",
                           row_group_size=per_row_group)
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    return out
