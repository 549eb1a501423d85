"""timm's webdataset layout (``imagenet-1k-wds``): tar shards listed by ``_info.json`` (or ``info.json``/``.yaml``)
under ``splits.<split>.filenames`` with ``shard_lengths``; each sample is the members ``<key>.jpg`` (or
``jpeg``/``png``/``webp``) and ``<key>.cls`` (the class index as text).

Indexing streams each tar once (the headers are spread through it) and records every image member's data range,
its key and the ``cls`` value. Sample ``i`` of a split is the ``i``-th sample in the order the shard list gives.
"""
from __future__ import annotations

import logging
import tarfile

import numpy as np

from .index import SplitIndex
from .store import DataSourceError, Store

log = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
SPLIT_ALIASES = {"val": "validation", "validation": "val"}


def split_shards(store: Store, split: str) -> tuple[list[str], list[int] | None, dict]:
    """The split's shard names and lengths from the info file, and the info itself."""
    found = store.read_info()
    if found is None:
        raise DataSourceError(
            f"{store.url()}: no _info.json, info.json or info.yaml; a wds dataset needs one listing each split's "
            "shards ({'splits': {'train': {'filenames': [...], 'shard_lengths': [...]}}}, as timm's "
            "imagenet-1k-wds has); scripts/make_shards.py writes it")
    info_name, info = found
    splits = (info or {}).get("splits") or {}
    name = split if split in splits else SPLIT_ALIASES.get(split)
    if name not in splits:
        raise DataSourceError(f"{store.url(info_name)} has no split {split!r} (splits: {sorted(splits)}); set "
                              f"data.train_split / data.val_split to one of them")
    entry = splits[name]
    filenames = list(entry.get("filenames") or [])
    if not filenames:
        raise DataSourceError(f"{store.url(info_name)}: split {name!r} lists no shards (splits.{name}.filenames)")
    lengths = entry.get("shard_lengths")
    return filenames, (list(lengths) if lengths else None), info


def _key_and_member(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def index_tar(store: Store, shard: str) -> list[tuple[str, int, int, int]]:
    """(key, data offset, data length, target) of each sample of one tar shard, in member order."""
    samples: dict[str, list] = {}
    try:
        with store.open(shard) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = _key_and_member(member.name)
                entry = samples.setdefault(key, [key, -1, 0, None])
                if extension in IMAGE_MEMBERS and entry[1] < 0:
                    entry[1], entry[2] = member.offset_data, member.size
                elif extension == "cls":
                    entry[3] = _class_index(tar.extractfile(member).read(), shard, member.name)
    except (tarfile.ReadError, EOFError) as error:  # truncated: what came before it is indexed
        log.warning("%s is truncated or corrupt (%s); indexed the %d samples before the damage",
                    store.url(shard), error, len(samples))
    complete = []
    for key, offset, length, target in samples.values():
        if offset < 0:
            continue  # e.g. a sample cut off by truncation, or a member without an image
        if target is None:
            raise DataSourceError(f"{store.url(shard)}: sample {key!r} has an image but no {key}.cls member; a wds "
                                  "sample needs its class index in a .cls member")
        complete.append((key, offset, length, target))
    return complete


def _class_index(data: bytes, shard: str, member: str) -> int:
    try:
        return int(data.decode().strip())
    except ValueError:
        raise DataSourceError(f"{shard}:{member}: a .cls member must hold the class index as text, "
                              f"got {data[:20]!r}") from None


def build_wds_index(store: Store, split: str, versions: dict[str, tuple[int, str]]) -> SplitIndex:
    shards, lengths, info = split_shards(store, split)
    keys, starts, sizes, targets, shard_ids = [], [], [], [], []
    for shard_id, shard in enumerate(shards):
        samples = index_tar(store, shard)
        if lengths is not None and lengths[shard_id] != len(samples):
            log.warning("%s: the info file gives %d samples, the tar holds %d", store.url(shard), lengths[shard_id],
                        len(samples))
        for key, offset, length, target in samples:
            keys.append(key), starts.append(offset), sizes.append(length), targets.append(target)
        shard_ids += [shard_id] * len(samples)
    if not targets:
        raise DataSourceError(f"{store.url()}: the {len(shards)} shards of split {split!r} hold no samples")
    classes = class_names(store, info, max(targets) + 1)
    count = len(targets)
    return SplitIndex(
        format="wds", split=split, shards=shards, shard_sizes=[versions[name][0] for name in shards],
        shard_versions=[versions[name][1] for name in shards], classes=classes,
        shard=np.array(shard_ids, dtype=np.int32), start=np.array(starts, dtype=np.int64),
        length=np.array(sizes, dtype=np.int64), target=np.array(targets, dtype=np.int64),
        row_group=np.full(count, -1, dtype=np.int32), row=np.full(count, -1, dtype=np.int32),
        keys=np.array(keys, dtype=str))


def class_names(store: Store, info: dict | None, found_classes: int) -> list[str]:
    """Class names from the info file (``classes``/``class_names``), else ``classes.txt`` beside it, else the
    ImageNet-1k synsets for 1000 classes (timm's imagenet-1k-wds), else the indices as text."""
    from .folder import imagenet_synsets

    info = info or {}
    names = info.get("classes") or info.get("class_names")
    if not names:
        try:
            names = store.read_bytes("classes.txt").decode().split("\n")
            names = [name.strip() for name in names if name.strip()]
        except FileNotFoundError:
            names = None
    count = int(info.get("num_classes") or (len(names) if names else found_classes))
    if names:
        if len(names) < found_classes:
            raise DataSourceError(f"{store.url()}: {len(names)} class names but class index {found_classes - 1} "
                                  "occurs in the shards; fix classes.txt / the info file's classes")
        return list(names)
    if count == 1000:
        return list(imagenet_synsets())
    return [str(target) for target in range(max(count, found_classes))]
