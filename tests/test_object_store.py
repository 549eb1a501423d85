"""Shards in object storage: a real S3 API on loopback (moto's server, started here) read through s3fs, with a
fault proxy in front (tests/s3server.py). The run from S3 is the folder's run; a job killed mid-epoch while reading
resumes bit-identically; storage that goes away stops the run with one clear message and the rerun resumes;
5% of requests failing changes nothing but the retry count."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

pytest.importorskip("webdataset")  # the dev extra's: the XLA environment collects these tests without them
pytest.importorskip("pyarrow")
pytest.importorskip("s3fs")

from conftest import tiny_overrides
from helpers import Job, assert_identical, load_script, read_csv, run_job, train_command, wait_until
from mambaout.checkpoint import load_training_checkpoint
from mambaout.cli import STORAGE_UNREACHABLE_EXIT_CODE
from mambaout.config import load_config
from mambaout.data import build_dataset
from mambaout.data.sources import DataSourceError
from mambaout.trainer import train
from s3server import FaultProxy, S3Server, make_bucket, reads_object, s3_environment, upload_folder
from shards import write_parquet, write_wds
from test_resume import END, RUN, assert_same_run, checkpoints, resumed_at



@pytest.fixture(scope="module")
def s3(image_root, tmp_path_factory):
    """moto's S3 server behind a fault proxy, holding the test folder as tars (s3://data/wds) and parquet
    (s3://data/parquet); this process (and the jobs it starts) talks to the proxy."""
    local = tmp_path_factory.mktemp("s3-shards")
    with S3Server() as server, FaultProxy(server.endpoint) as proxy, pytest.MonkeyPatch.context() as patch:
        make_bucket(server.endpoint, "data")
        upload_folder(write_wds(image_root, local / "wds"), "s3://data/wds", server.endpoint)
        upload_folder(write_parquet(image_root, local / "parquet"), "s3://data/parquet", server.endpoint)
        environment = s3_environment(proxy.endpoint)
        patch.delenv("AWS_PROFILE", raising=False)
        for name, value in environment.items():
            patch.setenv(name, value)
        yield proxy


def overrides(root, out: Path, cache: Path, **extra) -> list[str]:
    return tiny_overrides(root, out, **{"data.cache_dir": cache, **extra})


def run(root, out: Path, fmt: str, **extra):
    return train(load_config(None, overrides(root, out, out.parent / f"{out.name}-cache",
                                             **{"data.format": fmt, "train.max_steps": 6, **extra})))


def test_s3_shards_give_the_folder_run_in_few_requests(s3, image_root, tmp_path):
    window = {"data.shuffle": "window", "data.shuffle_window": 4}
    run(image_root, tmp_path / "folder", "folder")
    for fmt in ("wds", "parquet"):
        run(f"s3://data/{fmt}", tmp_path / fmt, fmt)
        assert_identical(load_training_checkpoint(tmp_path / "folder" / "last.pth")["model"],
                         load_training_checkpoint(tmp_path / fmt / "last.pth")["model"], fmt)
    assert load_script("index_shards").main(["s3://data/wds", "--format", "wds"]) == 0  # the shared index
    s3.reset_counters()
    run("s3://data/wds", tmp_path / "window", "wds", **window)
    # 48 training images (6 steps of 8) in shards of 5, and 21 evaluated: a window's shards come in one request
    # each, the validation batch's neighbours in one; plus the run's few listings and heads.
    assert s3.requests <= 0.5 * (48 + 21), s3.requests


def interrupted(command, tmp_path: Path, step: int, interrupt) -> tuple[Job, Path]:
    """Runs ``command(folder)`` to its end in ``tmp_path/reference``, then in ``tmp_path/run`` until step ``step``'s
    checkpoint exists, where ``interrupt(job)`` stops it."""
    status, output = run_job(command(tmp_path / "reference"), tmp_path / "reference.log")
    assert status == 0, output[-4000:]
    out = tmp_path / "run"
    job = Job(command(out), tmp_path / "interrupted.log")
    try:
        wait_until((out / "checkpoints" / f"step_{step:08d}.pth").exists, f"step {step}'s checkpoint", (job,))
        interrupt(job)
    finally:
        job.close()
    return job, out


def assert_resumes_as_the_reference(command, tmp_path: Path, out: Path) -> None:
    """The same command resumes at the newest checkpoint and ends as the uninterrupted run, bit for bit."""
    newest = max(checkpoints(out))
    status, output = run_job(command(out), tmp_path / "resumed.log")
    assert status == 0, output[-4000:]
    assert resumed_at(output, out) == newest
    assert_same_run(tmp_path / "reference", out)


def test_a_job_killed_while_reading_from_s3_resumes_bit_identically(s3, tmp_path):
    def command(out: Path) -> list[str]:
        return train_command(1, overrides("s3://data/wds", out, tmp_path / "cache", **RUN, **{"data.format": "wds"}))

    job, out = interrupted(command, tmp_path, 4, lambda job: job.kill())
    assert job.proc.returncode == -signal.SIGKILL
    assert_resumes_as_the_reference(command, tmp_path, out)


def test_storage_gone_stops_the_run_with_one_message_and_the_rerun_resumes(s3, tmp_path):
    settings = {**RUN, "data.format": "wds", "data.read_retries": 3, "data.num_workers": 0}

    def command(out: Path) -> list[str]:
        return train_command(1, overrides("s3://data/wds", out, tmp_path / f"{out.name}-cache", **settings))

    def storage_gone(job: Job) -> None:
        s3.pause()
        try:
            job.wait()
        finally:
            s3.resume()

    job, out = interrupted(command, tmp_path, 2, storage_gone)
    message = [line for line in job.output.splitlines() if line.startswith("train.py: error:")]
    assert job.proc.returncode == STORAGE_UNREACHABLE_EXIT_CODE and len(message) == 1, job.output[-4000:]
    assert "s3://data/wds/" in message[0] and "could not be read after 3 tries" in message[0], message
    assert "Traceback" not in job.output
    assert 2 <= max(checkpoints(out)) < END and (out / "last.pth").exists()  # every checkpoint whole
    assert_resumes_as_the_reference(command, tmp_path, out)


def test_five_percent_of_requests_failing_changes_nothing_but_the_retry_count(s3, image_root, tmp_path):
    """5% of the reads of shard data answered with S3's 500/503 (resets are resent by aiohttp itself, and a failed
    HEAD is answered by s3fs from a listing: neither reaches the reader); one request per image, so ~90 reads."""
    unplanned = {"data.read_ahead_steps": 0}
    run("s3://data/wds", tmp_path / "clean", "wds", **unplanned)
    s3.failure_rate, s3.mode, s3.fail_if = 0.05, "5xx", lambda method, path: method == "GET" and path.endswith(".tar")
    s3.reset_counters()
    try:
        run("s3://data/wds", tmp_path / "flaky", "wds", **unplanned)
    finally:
        s3.failure_rate, s3.fail_if = 0.0, reads_object
    assert_identical(load_training_checkpoint(tmp_path / "clean" / "last.pth")["model"],
                     load_training_checkpoint(tmp_path / "flaky" / "last.pth")["model"])
    retries = [int(row["read_retries"]) for row in read_csv(tmp_path / "flaky" / "steps.csv")]
    assert 0 < retries[-1] <= s3.failures and retries == sorted(retries)  # failed reads retried, counted
    assert {row["read_retries"] for row in read_csv(tmp_path / "clean" / "steps.csv")} == {"0"}


def test_a_bucket_that_does_not_exist_is_one_clear_error(s3, tmp_path):
    with pytest.raises(DataSourceError, match=r"data.root=s3://no-such-bucket/wds does not exist"):
        build_dataset("s3://no-such-bucket/wds", "train", lambda image: image, train=True, format="wds",
                      cache_dir=str(tmp_path))
