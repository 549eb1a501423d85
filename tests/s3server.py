"""A real S3-compatible server on loopback, with faults, for the tests and the benchmarks of S3 reads.

``S3Server`` runs moto's server in a subprocess, so the code under test goes through its whole client stack
(s3fs, aiobotocore, aiohttp, sockets): an in-process mock cannot stall, drop a connection or go away the way a
network does. ``FaultProxy`` sits between the client and that server and adds exactly those: latency, failed
requests (S3's 500/503 or a reset connection), and outages. ``s3_environment`` points s3fs/botocore at either.

moto keeps its buckets in memory and ``moto.server`` has no persistence (5.x): ``S3Server.stop()`` loses every
object, and ``start()`` brings back an empty server on the same port. An outage that the data survives is the
proxy's: ``FaultProxy.pause()`` closes its port (connections are refused) and ``resume()`` opens it again.

Retries hide failures from the caller: botocore retries 5xx, throttling and connection errors (4 retries by
default), and s3fs wraps each call in its own loop of ``S3FileSystem.retries`` (5) attempts, around botocore's,
and ``cat_file`` nests a second such loop around that one. For the caller's own retry logic to see each failure::

    fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={"retries": {"total_max_attempts": 1}})
    fs.retries = 1  # an attribute, not a constructor argument (unknown arguments go to aiobotocore's session)

or, in a subprocess's environment, ``AWS_MAX_ATTEMPTS=1`` for botocore (s3fs's loop has no variable). Below
both, aiohttp sends an idempotent request (GET, HEAD, PUT, DELETE) once more when its connection is reset, which
no option turns off: a reset read is two requests at the proxy. A 5xx reaches the caller as s3fs's ``OSError``,
a reset or refused connection as botocore's ``EndpointConnectionError``/``ConnectionClosedError`` (no OSError).
"""
from __future__ import annotations

import http.client
import os
import random
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

HOST = "127.0.0.1"
CHUNK = 256 * 1024  # bytes relayed per read: tens-of-MB bodies stream through without being held whole
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

# Per-connection headers: they describe one hop, and the proxy frames each of its two hops itself. Expect too:
# the client's 100-continue was answered by http.server before the request reached the proxy.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "transfer-encoding", "upgrade", "expect"})

S3_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}
RESET = "reset"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def s3_environment(endpoint: str) -> dict[str, str]:
    """The variables that point botocore (hence s3fs) at ``endpoint`` with dummy credentials and nothing else:
    no credentials, config or profile of the machine's user, no instance-metadata lookup, no HTTP proxy.

    botocore (>= 1.31, with aiobotocore) reads ``AWS_ENDPOINT_URL`` when a client is created, so apply these before
    the first ``S3FileSystem`` of the process, on a fresh instance (``skip_instance_cache=True``: fsspec's cache
    keys instances by their arguments, not the environment). ``AWS_PROFILE`` must be unset, as the config file
    that would name the profile is not read."""
    loopback = f"{HOST},localhost"
    return {
        **CREDENTIALS,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "NO_PROXY": loopback,
        "no_proxy": loopback,
    }


def _filesystem(endpoint: str | None):
    """A fresh s3fs instance with its default retries (setup, not the code under test); ``endpoint=None``: the
    environment's."""
    import s3fs

    credentials = {} if endpoint is None else {"key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                               "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, **credentials)


def make_bucket(endpoint: str, name: str) -> None:
    _filesystem(endpoint).mkdir(name)


def upload_folder(local_dir: str | os.PathLike, url: str, endpoint: str | None = None) -> list[str]:
    """Every file under ``local_dir`` to ``url``/<its relative path> (``url``: ``s3://bucket[/prefix]``); returns
    the objects' URLs. Paths are mapped one by one: fsspec's recursive ``put`` nests the folder or not depending
    on whether the target prefix exists already."""
    root = Path(local_dir)
    files = sorted(path for path in root.rglob("*") if path.is_file())
    targets = [f"{url.rstrip('/')}/{path.relative_to(root).as_posix()}" for path in files]
    _filesystem(endpoint).put([str(path) for path in files], targets)
    return targets


def _answers_http(port: int) -> bool:
    """http.client, not urllib: urllib would go through an HTTP proxy named in the environment."""
    connection = http.client.HTTPConnection(HOST, port, timeout=1)
    try:
        connection.request("GET", "/")
        connection.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        connection.close()


class S3Server:
    """moto's S3 server in a subprocess on 127.0.0.1. ``stop()`` then ``start()`` is a restart on the same port,
    with every bucket lost."""

    def __init__(self, port: int | None = None, start_timeout_s: float = 20.0):
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen | None = None
        self._log = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> S3Server:
        if self._process is not None:
            raise RuntimeError(f"the S3 server on {self.endpoint} is running already")
        # A file, not a pipe: the server logs every request, and a pipe nobody drains would block it when full.
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._await_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not _answers_http(self.port):
            exited = self._process.poll() is not None
            if exited or time.monotonic() > deadline:
                problem = (f"exited with status {self._process.returncode}" if exited
                           else f"did not answer within {self.start_timeout_s:g} s")
                raise RuntimeError(
                    f"moto's S3 server on {self.endpoint} {problem}; its output ends with:\n{self._log_tail()}")
            time.sleep(0.1)

    def _log_tail(self, size: int = 4000) -> str:
        self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, self._log.tell() - size))
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        """Terminates the server (killed if it has not exited within 5 s); its buckets and objects are gone."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
        self._log.close()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def reads_object(method: str, path: str) -> bool:
    """GET or HEAD of an object (path-style ``/bucket/key``), not of a bucket or a listing: the reads of data."""
    return method in ("GET", "HEAD") and "/" in path.strip("/")


class FaultProxy:
    """An HTTP/1.1 reverse proxy on 127.0.0.1 in front of ``upstream`` that relays every request (bodies and
    responses streamed, ranges and keep-alive as the client sends them) and injects faults:

    - ``latency_ms``: slept before each request is decided and relayed;
    - ``failure_rate``: the fraction of requests for which ``fail_if(method, path)`` holds (``path`` as sent:
      percent-encoded, without the query; by default ``reads_object``) that fail: with S3's 500 InternalError or
      503 SlowDown (``mode="5xx"``), a reset connection (``"reset"``), or either (``"mixed"``). One
      ``random.Random(seed)`` draws for every such request, under a lock, so a sequence of requests fails the same
      number of times in every run;
    - ``down`` (``pause()``/``resume()``): the port is closed and open connections dropped, so every request is
      refused, as by a stopped server, while the upstream keeps its data.

    These attributes may change at any time. Counters: ``requests`` (every request received, relayed or failed),
    ``failures`` (the injected ones) and ``bytes_sent`` (response body bytes sent to clients). While the proxy is
    down, connections are refused before any request arrives, uncounted.
    A request that the upstream fails to answer resets the client's connection, uncounted as a failure.
    """

    def __init__(self, upstream: str, *, latency_ms: float = 0.0, failure_rate: float = 0.0, mode: str = "5xx",
                 seed: int = 0, fail_if: Callable[[str, str], bool] = reads_object, port: int | None = None,
                 upstream_timeout_s: float = 60.0):
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must lie in [0, 1], not {failure_rate}")
        if mode not in ("5xx", RESET, "mixed"):
            raise ValueError(f"mode must be '5xx', 'reset' or 'mixed', not {mode!r}")
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.upstream_timeout_s = upstream_timeout_s
        self.latency_ms, self.failure_rate, self.mode, self.fail_if = latency_ms, failure_rate, mode, fail_if
        self.port = port or free_port()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._down = False
        self._server: _ProxyServer | None = None
        self._connections: set[socket.socket] = set()
        self.reset_counters()

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def reset_counters(self) -> None:
        with self._lock:
            self.requests = self.failures = self.bytes_sent = 0

    # --- listening ---------------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._listen()
        return self

    def stop(self) -> None:
        self._close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def down(self) -> bool:
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        if value:
            self.pause()
        else:
            self.resume()

    def pause(self) -> None:
        with self._lock:
            self._down = True
        self._close()

    def resume(self) -> None:
        if self._server is None:
            self._listen()
        with self._lock:
            self._down = False

    def _listen(self, timeout_s: float = 5.0) -> None:
        """Binds the same port every time. A port just closed can be taken meanwhile as the local port of some
        outgoing connection, until that connection ends: hence a few seconds of tries."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._server = _ProxyServer(self)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         name=f"fault-proxy-{self.port}", daemon=True).start()

    def _close(self) -> None:
        """Stops listening and drops the open connections (their handlers see end of stream and return)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed meanwhile
                pass

    # --- the handlers' side ------------------------------------------------------------------------------------

    def _opened(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def _closed(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _admit(self, method: str, path: str) -> str | int | None:
        """What becomes of a request: None (relayed), an HTTP status to answer or ``RESET``."""
        with self._lock:
            self.requests += 1
        if not self._down:
            time.sleep(self.latency_ms / 1000)
        with self._lock:
            fault = RESET if self._down else self._draw(method, path)
            if fault is not None:
                self.failures += 1
        return fault

    def _draw(self, method: str, path: str) -> str | int | None:
        if not self.fail_if(method, path) or self._random.random() >= self.failure_rate:
            return None
        kind = self._random.choice(("5xx", RESET)) if self.mode == "mixed" else self.mode
        return RESET if kind == RESET else self._random.choice(tuple(S3_ERRORS))

    def _sent(self, size: int) -> None:
        """Called before the bytes are written: a client that has them finds them counted."""
        with self._lock:
            self.bytes_sent += size


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # socketserver's 5 would drop connections in bursts, and clients wait 1 s to retry

    def __init__(self, proxy: FaultProxy):
        self.proxy = proxy
        super().__init__((HOST, proxy.port), _RelayHandler)

    def server_bind(self) -> None:
        """TCPServer's: HTTPServer's would look the address up in DNS, seconds where no resolver answers."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        """Quiet about connections that broke (pause() drops them on purpose); loud about anything else."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients pool their connections, as with S3
    disable_nagle_algorithm = True  # headers and body go in separate writes: Nagle would hold the body ~40 ms
    server: _ProxyServer

    def setup(self) -> None:
        super().setup()
        self.server.proxy._opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy._closed(self.connection)

    def log_message(self, format: str, *args) -> None:
        """Silent: hundreds of requests a second."""

    def relay(self) -> None:
        fault = self.server.proxy._admit(self.command, urlsplit(self.path).path)
        if fault == RESET:
            self._reset()
        elif fault is not None:
            self._answer_error(fault)
        else:
            self._forward()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = relay

    # --- faults ------------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        """Closes the connection with a TCP reset (SO_LINGER 0). The socket closes only with its last file
        object: rfile's, closed here too (wfile holds none)."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.rfile.close()
        self.connection.close()

    def _answer_error(self, status: int) -> None:
        """An S3 error document. The request body is read first: the connection stays usable, and a close with
        unread data would be a reset rather than this answer."""
        for _ in self._request_body():
            pass
        code, message = S3_ERRORS[status]
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message>"
                "<RequestId>fault-proxy</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.server.proxy._sent(len(body))
            self.wfile.write(body)

    # --- relaying ----------------------------------------------------------------------------------------------

    def _forward(self) -> None:
        proxy = self.server.proxy
        upstream = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.upstream_timeout_s)
        try:
            response = self._send_upstream(upstream)
        except OSError:  # the upstream is down or failed: the client sees a dropped connection, as it would
            upstream.close()
            self._reset()
            return
        try:
            self._relay_response(response)
        except OSError:  # either side broke mid-body; the client cannot be told otherwise
            self.close_connection = True
        finally:
            upstream.close()

    def _send_upstream(self, upstream: http.client.HTTPConnection) -> http.client.HTTPResponse:
        """One request per upstream connection (``Connection: close``): nothing stale to reuse, and loopback
        connections are cheap."""
        chunked = self._chunked_request()
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in HOP_BY_HOP:
                upstream.putheader(name, value)
        if chunked:
            upstream.putheader("Transfer-Encoding", "chunked")
        upstream.putheader("Connection", "close")
        upstream.endheaders()
        for chunk in self._request_body():
            upstream.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        if chunked:
            upstream.send(b"0\r\n\r\n")
        return upstream.getresponse()

    def _relay_response(self, response: http.client.HTTPResponse) -> None:
        """Status and headers as they came; the body with its length, or re-chunked where it had none (the client
        connection lives on, so its end must be marked)."""
        has_body = self.command != "HEAD" and response.status >= 200 and response.status not in (204, 304)
        chunked = has_body and response.getheader("Content-Length") is None
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if not has_body:
            return
        while chunk := response.read(CHUNK):
            self.server.proxy._sent(len(chunk))
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _chunked_request(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _request_body(self) -> Iterator[bytes]:
        """The request body in pieces, as the client framed it (Content-Length or chunked); read once."""
        if self._chunked_request():
            yield from _read_chunked(self.rfile)
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining:
            chunk = self.rfile.read(min(remaining, CHUNK))
            if not chunk:
                raise ConnectionError("the client closed the connection mid-body")
            remaining -= len(chunk)
            yield chunk


def _read_chunked(stream) -> Iterator[bytes]:
    """Decodes a chunked body from ``stream`` (its trailers read and dropped)."""
    while size := int(stream.readline(65537).split(b";")[0], 16):
        yield stream.read(size)
        stream.readline()
    while stream.readline(65537) not in (b"\r\n", b"\n", b""):
        pass
