"""Shards on a disk or behind a URL (file://): the same images as a folder, as webdataset tars or as parquet, give
the same run; the window shuffle is a keyed function of the shards; indexes notice rewritten shards; truncated
shards cost only their unreadable images; reads through the host's cache change nothing. (S3 and its faults:
tests/test_object_store.py.)"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("webdataset")  # the dev extra's: the XLA environment collects these tests without them
pytest.importorskip("pyarrow")

from conftest import tiny_overrides
from helpers import assert_identical, load_script, read_csv, run_job, train_command
from mambaout.checkpoint import load_training_checkpoint
from mambaout.config import load_config
from mambaout.data import build_dataset
from mambaout.data.sampling import GlobalShuffle, MicroBatchSampler, WindowShuffle
from mambaout.data.sources import DataSourceError, open_source
from mambaout.data.sources.cache import RangeCache
from mambaout.data.sources.readahead import merge_ranges
from mambaout.trainer import ResumeError, train
from shards import write_parquet, write_wds

SIX_STEPS = {"train.max_steps": 6}


@pytest.fixture(scope="module")
def shard_roots(image_root, tmp_path_factory) -> dict[str, Path]:
    """The test folder as tars (5 samples a shard) and as parquet (files of 16 rows, row groups of 5)."""
    base = tmp_path_factory.mktemp("shards")
    return {"folder": image_root, "wds": write_wds(image_root, base / "wds"),
            "parquet": write_parquet(image_root, base / "parquet")}


def run(root, out: Path, fmt: str, **extra):
    cache = out.parent / f"{out.name}-cache"
    return train(load_config(None, tiny_overrides(root, out, **{"data.format": fmt, "data.cache_dir": cache,
                                                               **SIX_STEPS, **extra})))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_training_checkpoint(out / "last.pth")["model"]


@pytest.mark.parametrize("pipeline", ["timm", "tensor"])
def test_the_same_images_as_folder_tars_or_parquet_give_the_same_run(shard_roots, tmp_path, pipeline):
    outcomes = {fmt: run(root, tmp_path / fmt, fmt, **{"data.pipeline": pipeline})
                for fmt, root in shard_roots.items()}
    for fmt in ("wds", "parquet"):
        assert_identical(weights(tmp_path / "folder"), weights(tmp_path / fmt), fmt)
        assert outcomes[fmt].final_eval == outcomes["folder"].final_eval
    manifest = json.loads((tmp_path / "wds" / "manifest.json").read_text())
    assert manifest["dataset"]["train"]["format"] == "wds"
    assert set(manifest["dataset"]["train"]["shards"]) == {f"train-{i:06d}.tar" for i in range(10)}


def test_a_url_root_is_read_through_the_cache_by_plan_the_same_with_0_or_2_workers(shard_roots, tmp_path):
    url = f"file://{shard_roots['wds']}"
    for workers in (0, 2):
        run(url, tmp_path / f"w{workers}", "wds", **{"data.num_workers": workers, "data.pipeline": "tensor"})
    assert_identical(weights(tmp_path / "w0"), weights(tmp_path / "w2"))
    assert_identical(weights(tmp_path / "w0"), weights_of_folder_run(shard_roots, tmp_path))
    ranges = list((tmp_path / "w2-cache" / "ranges").rglob("*-*"))
    assert ranges and not [path for path in ranges if path.name.endswith(".part")]  # fetched ahead, no claim left


def test_the_plan_fetches_each_window_once_within_a_cache_of_two_windows(shard_roots, tmp_path, monkeypatch):
    """Window shuffle over tars at a file:// URL, a cache of ~2.2 windows: every byte comes from the plan's threads,
    each range once (the planner holds back a window the cache cannot hold yet, and a trim never evicts a range
    the plan still awaits); the loop's reads all hit the cache."""
    import threading

    from mambaout.data.sources.shards import ShardSource

    fetched, real = [], ShardSource.fetch

    def fetch(self, shard: int, start: int, end: int) -> bytes:
        fetched.append((threading.current_thread().name, self.index.split, shard, start))
        return real(self, shard, start, end)

    monkeypatch.setattr(ShardSource, "fetch", fetch)
    window_bytes = 3 * max((shard_roots["wds"] / f"train-{i:06d}.tar").stat().st_size for i in range(10))
    run(f"file://{shard_roots['wds']}", tmp_path / "run", "wds", **{
        "data.shuffle": "window", "data.shuffle_window": 3, "data.cache_limit_gb": 2.2 * window_bytes / 2**30,
        "train.max_steps": 12, "sched.epochs": 2})
    train_reads = [(thread, shard, start) for thread, split, shard, start in fetched if split == "train"]
    assert train_reads and all(thread.startswith("mambaout-read") for thread, _, _ in train_reads), train_reads
    assert len(train_reads) <= 2 * 10  # each of the 10 tars once an epoch at most, in one request


def weights_of_folder_run(shard_roots, tmp_path) -> dict[str, torch.Tensor]:
    run(shard_roots["folder"], tmp_path / "folder", "folder", **{"data.pipeline": "tensor"})
    return weights(tmp_path / "folder")


def test_validate_reads_shards_as_it_reads_the_folder(shard_roots, tmp_path):
    import validate

    run(shard_roots["folder"], tmp_path / "run", "folder")
    results = {}
    for fmt, root in shard_roots.items():
        file = tmp_path / f"{fmt}.json"
        assert validate.main(["--model", "mambaout_femto", "--checkpoint", str(tmp_path / "run" / "last.pth"),
                              "--data", str(root), "--format", fmt, "--img-size", "32", "--device", "cpu",
                              "--workers", "0", "--results", str(file), "--predictions",
                              str(tmp_path / f"{fmt}.csv")]) == 0
        results[fmt] = json.loads(file.read_text())
    for fmt in ("wds", "parquet"):
        assert (results[fmt]["top1"], results[fmt]["top5"], results[fmt]["count"]) == (
            results["folder"]["top1"], results["folder"]["top5"], results["folder"]["count"])
    rows = (tmp_path / "wds.csv").read_text().splitlines()
    assert rows[1].startswith("val-000000.tar:00000000,")  # each prediction names its shard and key


# --- the window shuffle ------------------------------------------------------------------------------------------

def test_window_shuffle_permutes_shards_then_samples_within_windows():
    lengths = [5, 3, 4, 6, 2]
    shuffle = WindowShuffle(lengths, window=2)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    shard_of = np.repeat(np.arange(len(lengths)), lengths)
    for epoch in range(3):
        order = shuffle.order(seed=7, epoch=epoch)
        assert sorted(order.tolist()) == list(range(sum(lengths)))
        bounds = shuffle.window_bounds(7, epoch)
        windows = [set(shard_of[order[a:b]].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]
        assert [len(w) for w in windows] == [2, 2, 1] and set().union(*windows) == set(range(5))
        for a, b in zip(bounds[:-1], bounds[1:]):  # a window holds its shards' samples, all of them
            held = order[a:b].tolist()
            shards = set(shard_of[held])
            assert sorted(held) == sorted(i for s in shards for i in range(starts[s], starts[s] + lengths[s]))
        assert torch.equal(order, shuffle.order(seed=7, epoch=epoch))  # keyed: the same again
    assert not torch.equal(shuffle.order(7, 0), shuffle.order(7, 1))
    assert torch.equal(GlobalShuffle(20).order(3, 1), MicroBatchSampler(20, 4, 2, 1, [0], 3, epoch=1).epoch_order())


def test_window_shuffle_gives_every_split_of_the_batch_the_same_global_batches():
    shuffle = WindowShuffle([7, 9, 8, 6], window=3)
    order = shuffle.order(seed=1, epoch=2).tolist()
    for shards in (1, 2, 4):
        samplers = [MicroBatchSampler(30, 8, 2, shards, [r], seed=1, epoch=2, shuffle=shuffle) for r in range(shards)]
        per_shard = [list(sampler) for sampler in samplers]
        accum = samplers[0].accum_steps
        for step in range(30 // 8):
            micro = {a * shards + r: per_shard[r][step * accum + a] for r in range(shards) for a in range(accum)}
            batch = [index for m in sorted(micro) for index, _ in micro[m]]
            assert batch == order[step * 8:(step + 1) * 8]


def test_window_shuffle_on_1_2_and_4_processes_is_one_run(shard_roots, tmp_path):
    """1 process in-process; 2 and 4 under torchrun reading a file:// URL through the host's cache (one process plans
    the host's reads, the others read the cache): the same weights within 1e-5, the same losses."""
    window = {"data.shuffle": "window", "data.shuffle_window": 3, "optim.global_batch_size": 16,
              "train.max_steps": 4, "data.pipeline": "tensor", "model.drop_path_rate": 0.1}
    url = f"file://{shard_roots['wds']}"
    run(url, tmp_path / "p1", "wds", **window)
    for nproc in (2, 4):
        out = tmp_path / f"p{nproc}"
        overrides = tiny_overrides(url, out, **{"data.format": "wds", "data.cache_dir": tmp_path / "cache",
                                                **window, "train.micro_batch_size": 4})
        status, output = run_job(train_command(nproc, overrides), tmp_path / f"p{nproc}.log")
        assert status == 0, output[-4000:]
        reference, other = weights(tmp_path / "p1"), weights(out)
        assert max((reference[k] - other[k]).abs().max().item() for k in reference) < 1e-5
        losses = [[float(row["loss"]) for row in read_csv(folder / "steps.csv")] for folder in (tmp_path / "p1", out)]
        assert np.allclose(*losses, atol=1e-5)


# --- indexes, changed and truncated shards -----------------------------------------------------------------------

def test_a_shard_rewritten_after_indexing_is_refused_on_resume_by_name(shard_roots, tmp_path):
    root = tmp_path / "wds"
    write_wds(shard_roots["folder"], root)
    run(root, tmp_path / "run", "wds", **{"train.max_steps": 3})
    shard = root / "train-000004.tar"
    shard.write_bytes(shard.read_bytes()[::-1][::-1] + b"\0" * 512)  # the same samples, another file
    with pytest.raises(ResumeError, match=r"1 shard\(s\) changed since the checkpoint .*train-000004.tar"):
        run(root, tmp_path / "run", "wds")


def test_a_truncated_shard_costs_its_unreadable_images_and_the_run_goes_on(shard_roots, tmp_path):
    root = tmp_path / "wds"
    write_wds(shard_roots["folder"], root)
    shard = root / "train-000002.tar"
    members = open_source("wds", str(root), "train", cache_dir=str(tmp_path / "probe")).index
    third = [int(s) for s, shard_id in zip(members.start, members.shard) if shard_id == 2][2]
    shard.write_bytes(shard.read_bytes()[:third + 40])  # cut inside the third sample's image
    outcome = run(root, tmp_path / "run", "wds", **{"train.max_steps": 12, "sched.epochs": 2})
    # Indexed again at start: the samples after the cut are gone, the cut one stays (its label came first).
    assert outcome.step == 10  # 46 samples: 5 steps an epoch, both epochs run
    bad = [int(row["bad_images"]) for row in read_csv(tmp_path / "run" / "metrics.csv")]
    assert bad[-1] >= 1  # the cut image, seen every epoch, replaced each time


def test_an_index_from_index_shards_is_used_and_checked(shard_roots, tmp_path):
    index_shards = load_script("index_shards")

    root = tmp_path / "parquet"
    write_parquet(shard_roots["folder"], root)
    assert index_shards.main([str(root), "--format", "parquet"]) == 0
    assert (root / "_index" / "train.parquet.npz").exists()
    source = open_source("parquet", str(root), "train", cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache" / "index").exists() or not list((tmp_path / "cache" / "index").rglob("*.npz"))
    assert len(source) == 48 and source.index.row_group.max() == 3  # files of 16 rows, groups of 5
    os.utime(root / "data" / "train-00001-of-00003.parquet", ns=(0, 0))  # a new version of one file
    again = open_source("parquet", str(root), "train", cache_dir=str(tmp_path / "cache"))
    assert list((tmp_path / "cache" / "index").rglob("*.npz"))  # indexed again, on this host
    assert again.fingerprint()["sha256"] == source.fingerprint()["sha256"]  # the same layout and labels ...
    assert again.fingerprint() != source.fingerprint()  # ... in a file of another version


# --- clear errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, expected", [
    ("no info", r"no _info.json, info.json or info.yaml"),
    ("no split", r"has no split 'test' \(splits: \['train', 'val'\]\)"),
    ("no shards", r"split 'train' lists no shards"),
    ("scheme", r"cannot open this URL .*Protocol not known: nosuch.*expected a local path"),
    ("missing root", r"does not exist \(no such folder, prefix or bucket\)"),
    ("parquet split", r"no parquet files of split 'test'"),
    ("window folder", r"data.shuffle=window permutes shards, and data.format=folder has none"),
])
def test_bad_sources_fail_with_one_clear_message(shard_roots, tmp_path, case, expected):
    root = tmp_path / "wds"
    write_wds(shard_roots["folder"], root, splits=("train", "val"))
    info = json.loads((root / "_info.json").read_text())
    fmt, split, data_root = "wds", "train", str(root)
    if case == "no info":
        (root / "_info.json").unlink()
    elif case == "no split":
        split = "test"
    elif case == "no shards":
        info["splits"]["train"]["filenames"] = []
        (root / "_info.json").write_text(json.dumps(info))
    elif case == "scheme":
        data_root = "nosuch://bucket/data"
    elif case == "missing root":
        data_root = str(tmp_path / "nowhere")
    elif case == "parquet split":
        fmt, data_root, split = "parquet", str(shard_roots["parquet"]), "test"
    if case == "window folder":
        with pytest.raises(DataSourceError, match=expected):
            run(shard_roots["folder"], tmp_path / "run", "folder", **{"data.shuffle": "window"})
        return
    with pytest.raises(DataSourceError, match=expected):
        build_dataset(data_root, split, lambda image: image, train=True, format=fmt,
                      cache_dir=str(tmp_path / "cache"))


# --- the parts: merged requests, the host cache ------------------------------------------------------------------

def test_neighbouring_ranges_merge_into_requests_up_to_the_limit():
    ranges = [(0, 0, 10), (0, 10, 20), (0, 25, 30), (0, 100, 110), (1, 0, 10), (0, 10, 20)]
    assert merge_ranges(ranges, gap_bytes=5, request_bytes=1000) == [(0, 0, 30), (0, 100, 110), (1, 0, 10)]
    assert merge_ranges(ranges, gap_bytes=0, request_bytes=1000) == [(0, 0, 20), (0, 25, 30), (0, 100, 110),
                                                                     (1, 0, 10)]
    assert merge_ranges(ranges, gap_bytes=100, request_bytes=25) == [(0, 0, 20), (0, 25, 30), (0, 100, 110),
                                                                     (1, 0, 10)]


def test_the_cache_serves_covered_ranges_waits_for_claims_and_evicts_the_oldest(tmp_path):
    cache = RangeCache(tmp_path, limit_bytes=250, wait_s=0.3)
    assert cache.read("s3://b/a.tar", 0, 10) is None
    assert cache.claim("s3://b/a.tar", 0, 100) and not cache.claim("s3://b/a.tar", 0, 100)  # one writer
    assert cache.read("s3://b/a.tar", 5, 10) is None  # waited for the claim, up to wait_s, then gave up
    cache.put("s3://b/a.tar", 0, 100, bytes(range(100)))
    assert cache.read("s3://b/a.tar", 5, 10) == bytes(range(5, 10))
    assert cache.read("s3://b/a.tar", 95, 105) is None  # not covered
    for start in (100, 200):
        assert cache.claim("s3://b/a.tar", start, start + 100)
        cache.put("s3://b/a.tar", start, start + 100, bytes(100))
        os.utime(next(p for p in tmp_path.rglob(f"{start}-{start + 100}")), (2e9 + start, 2e9 + start))
    cache.trim()
    assert cache.size_bytes() <= 250 and cache.read("s3://b/a.tar", 0, 10) is None  # the oldest went first


def test_a_claim_of_a_dead_process_is_taken_over(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from mambaout.data.sources.cache import RangeCache; "
            "RangeCache(sys.argv[1], 1 << 20).claim('s3://b/x', 0, 8)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)  # claims, then exits without writing
    cache = RangeCache(tmp_path, 1 << 20, wait_s=60)
    assert cache.read("s3://b/x", 0, 8) is None  # no 60 s wait: its writer is gone
    assert cache.claim("s3://b/x", 0, 8)
