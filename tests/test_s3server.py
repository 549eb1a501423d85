"""tests/s3server.py: what the S3 tests and benchmarks build on does what it says, through s3fs as they use it."""
from __future__ import annotations

import time

import pytest

pytest.importorskip("moto.server")
fsspec = pytest.importorskip("fsspec")
pytest.importorskip("s3fs")

from s3server import FaultProxy, S3Server, make_bucket, s3_environment, upload_folder  # noqa: E402

BUCKET = "data"
PAYLOAD = bytes(range(256)) * 64  # 16 KiB, every byte value at a known offset


@pytest.fixture(scope="module")
def server():
    with S3Server() as s3:
        make_bucket(s3.endpoint, BUCKET)
        yield s3


def point_at(monkeypatch, endpoint: str) -> None:
    """This process's environment, for the test, points s3fs at ``endpoint``."""
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name, value in s3_environment(endpoint).items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def proxy(server, monkeypatch):
    """A proxy in front of the module's server, where s3fs goes."""
    with FaultProxy(server.endpoint) as fault_proxy:
        point_at(monkeypatch, fault_proxy.endpoint)
        yield fault_proxy


@pytest.fixture(scope="module")
def stored(server, tmp_path_factory) -> str:
    """A small folder uploaded once, straight to the server; the key of its payload."""
    folder = tmp_path_factory.mktemp("folder")
    (folder / "shard").mkdir()
    (folder / "shard" / "0.bin").write_bytes(PAYLOAD)
    upload_folder(folder, f"s3://{BUCKET}/stored", endpoint=server.endpoint)
    return f"{BUCKET}/stored/shard/0.bin"


def reader():
    """A fresh s3fs instance that takes its endpoint from the environment and retries nothing: each failure
    reaches the caller."""
    no_retries = {"retries": {"total_max_attempts": 1}, "connect_timeout": 1, "read_timeout": 2}
    fs = fsspec.filesystem("s3", skip_instance_cache=True, config_kwargs=no_retries)
    fs.retries = 1
    return fs


def test_a_folder_uploaded_through_the_proxy_reads_back_by_range(proxy, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "payload.bin").write_bytes(PAYLOAD)
    (tmp_path / "labels.txt").write_text("circle\nsquare\n")

    urls = upload_folder(tmp_path, f"s3://{BUCKET}/uploaded")

    assert urls == [f"s3://{BUCKET}/uploaded/labels.txt", f"s3://{BUCKET}/uploaded/sub/payload.bin"]
    assert proxy.requests >= 2
    proxy.reset_counters()
    fs = reader()
    # start/end by keyword: cat_file's third positional parameter is version_id
    assert fs.cat_file(f"{BUCKET}/uploaded/sub/payload.bin", start=1000, end=5000) == PAYLOAD[1000:5000]
    assert fs.cat_file(f"{BUCKET}/uploaded/labels.txt") == b"circle\nsquare\n"
    assert (proxy.bytes_sent, proxy.failures) == (4000 + 14, 0)
    assert fs.s3.meta.endpoint_url == proxy.endpoint


def test_latency_delays_every_request(proxy, stored):
    fs = reader()
    fs.ls(BUCKET)  # the client's set-up, outside the measurement
    proxy.latency_ms = 150
    proxy.reset_counters()

    started = time.monotonic()
    assert fs.cat_file(stored, start=0, end=10) == PAYLOAD[:10]

    assert time.monotonic() - started >= 0.15
    assert (proxy.requests, proxy.bytes_sent) == (1, 10)


@pytest.mark.parametrize("mode", ["5xx", "reset", "mixed"])
def test_failure_rate_one_fails_every_object_read_and_nothing_else(proxy, stored, mode):
    proxy.failure_rate, proxy.mode = 1.0, mode
    fs = reader()

    with pytest.raises(Exception) as failure:
        fs.cat_file(stored, start=0, end=10)

    # 5xx: s3fs's OSError; a reset connection: botocore's ConnectionClosedError or EndpointConnectionError
    assert isinstance(failure.value, OSError) or type(failure.value).__module__ == "botocore.exceptions"
    # aiohttp sends a GET once more after a reset: 1 or 2 requests, each failed
    assert 1 <= proxy.failures == proxy.requests <= 2
    assert fs.ls(f"{BUCKET}/stored") == [f"{BUCKET}/stored/shard"]  # a listing, not an object read


def test_failures_repeat_with_the_seed(server, stored, monkeypatch):
    """Sequential reads through two proxies seeded alike fail at the same reads."""
    outcomes = []
    for _ in range(2):
        with FaultProxy(server.endpoint, failure_rate=0.4, seed=7) as fault_proxy:
            point_at(monkeypatch, fault_proxy.endpoint)
            fs = reader()
            outcomes.append([_fails(lambda: fs.cat_file(stored, start=0, end=1)) for _ in range(12)])
    assert outcomes[0] == outcomes[1]
    assert 0 < sum(outcomes[0]) < 12


def _fails(read) -> bool:
    try:
        read()
        return False
    except OSError:
        return True


def test_down_refuses_at_once_and_resume_finds_the_data(proxy, stored):
    fs = reader()
    assert fs.cat_file(stored, start=0, end=10) == PAYLOAD[:10]

    proxy.down = True
    started = time.monotonic()
    with pytest.raises(Exception, match="Could not connect"):
        fs.cat_file(stored, start=0, end=10)
    assert time.monotonic() - started < 1.0

    proxy.resume()
    assert not proxy.down
    assert fs.cat_file(stored, start=10, end=20) == PAYLOAD[10:20]


def test_a_restarted_server_answers_on_its_port_without_its_buckets(monkeypatch):
    with S3Server() as s3:
        point_at(monkeypatch, s3.endpoint)
        make_bucket(s3.endpoint, "lost")
        assert reader().ls("") == ["lost"]

        s3.stop()
        s3.start()

        assert reader().ls("") == []  # same endpoint, from the environment; moto kept nothing
