"""Downloading URL sources against a real HTTP server on loopback: content checks, exact retries, the size
cap, timeouts, redirects, file URLs, and ordered bounded concurrency in fetch_many."""

from __future__ import annotations

import io
import itertools
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from data_prep.errors import DataPrepError
from data_prep.http_fetch import FAILURE_REASONS, MAX_REDIRECTS, FetchFailure, FetchOptions, fetch, fetch_many


def _encode(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


PNG = _encode("PNG")
JPEG = _encode("JPEG")
BIG = 64 * 2**20  # bodies the server offers for the size-cap tests; far more than loopback socket buffers hold
CAP = 2**20  # the cap used against them
SLOW_SECONDS = 2.0
def local_options(**kwargs) -> FetchOptions:
    """Options for fetching from the test server, which is on 127.0.0.1: a private host."""
    return FetchOptions(allow_private_hosts=True, **kwargs)


FAST = local_options(timeout=2.0, backoff=0.0)  # no sleeping between retries, so retry tests stay fast


# ---------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------


@dataclass
class Streamed:
    """What the server managed to send of a large body before the client went away."""

    sent: int
    aborted: bool


@dataclass
class ServerState:
    base: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: Counter = field(default_factory=Counter)
    """Requests seen per path."""
    user_agents: list = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    """Set at teardown to wake handlers that are still sleeping."""
    streamed: dict = field(default_factory=dict)
    """Path -> Streamed, filled when a large-body handler finishes."""
    stream_done: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return self.base + path

    def wait_streamed(self, path: str) -> Streamed:
        assert self.stream_done.wait(5), f"handler for {path} did not finish"
        return self.streamed[path]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is exercised
    timeout = 5  # idle keep-alive connections end on their own

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    @property
    def state(self) -> ServerState:
        return self.server.state

    def do_GET(self):  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        path = self.path.split("?", 1)[0]
        with self.state.lock:
            self.state.requests[path] += 1
            n = self.state.requests[path]
            self.state.user_agents.append(self.headers.get("User-Agent"))
            self.state.active += 1
            self.state.max_active = max(self.state.max_active, self.state.active)
        try:
            self._route(path, n)
        finally:
            with self.state.lock:
                self.state.active -= 1

    def _route(self, path: str, n: int) -> None:
        if path == "/png":
            self._send(200, PNG, "image/png")
        elif path == "/jpeg-untyped":
            self._send(200, JPEG, None)
        elif path == "/octet":
            self._send(200, PNG, "application/octet-stream")
        elif path == "/json-untyped":  # what a metadata service or an API answers, without a type
            self._send(200, b'{"AccessKeyId": "ASIA..."}', None)
        elif path == "/text-octet":
            self._send(200, b"not an image at all", "application/octet-stream")
        elif path == "/html":
            self._send(200, b"<html><body>Not found, but 200</body></html>", "text/html; charset=utf-8")
        elif path == "/json":
            self._send(200, b'{"error": "gone"}', "application/json")
        elif path == "/missing":
            self._send(404, b"nope", "text/plain")
        elif path == "/flaky":
            self._send(503, b"busy", "text/plain") if n == 1 else self._send(200, PNG, "image/png")
        elif path == "/down":
            self._send(503, b"busy", "text/plain")
        elif path == "/throttled":
            self._send(429, b"slow down", "text/plain")
        elif path == "/chunked-png":
            self._stream(path, PNG, chunked=True)
        elif path == "/big-declared":
            self._stream(path, None, chunked=False)
        elif path == "/big-chunked":
            self._stream(path, None, chunked=True)
        elif path == "/slow":
            self.state.release.wait(SLOW_SECONDS)
            self._send(200, PNG, "image/png")
        elif path == "/redirect":
            self._redirect("/png")
        elif path == "/redirect-relative":
            self._redirect("png")
        elif path == "/redirect-loop":
            self._redirect("/redirect-loop")
        elif path.startswith("/redirect-to/"):  # /redirect-to/<absolute URL>
            self._redirect(path[len("/redirect-to/"):])
        elif path == "/redirect-to-file":
            self._redirect("file:///etc/hostname")
        elif path == "/redirect-big-body":
            self.send_response(302)
            self.send_header("Location", "/png")
            self._stream(path, None, chunked=False, status_sent=True)
        elif path.startswith("/item/"):
            time.sleep(0.03)  # long enough that requests overlap
            self._send(200, path.encode(), "image/webp")
        else:
            self._send(404, b"no route", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str | None) -> None:
        try:
            self.send_response(status)
            if content_type is not None:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (the timeout test)
            self.close_connection = True

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream(self, path: str, body: bytes | None, *, chunked: bool, status_sent: bool = False) -> None:
        """Send `body`, or BIG zero bytes if None, in 64 KiB pieces, recording how much got out."""
        if not status_sent:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
        total = BIG if body is None else len(body)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(total))
        self.end_headers()
        piece = b"\0" * 65536
        sent, aborted = 0, False
        try:
            while sent < total:
                data = piece[: total - sent] if body is None else body[sent : sent + len(piece)]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                sent += len(data)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:  # broken pipe / reset: the client closed the connection
            aborted = True
            self.close_connection = True
        with self.state.lock:
            self.state.streamed[path] = Streamed(sent, aborted)
        self.state.stream_done.set()


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # fetch_many opens several connections at once
    daemon_threads = True


@pytest.fixture
def server() -> Iterator[ServerState]:
    state = ServerState()
    httpd = _Server(("127.0.0.1", 0), Handler)
    httpd.state = state
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _failure(result: bytes | FetchFailure, reason: str) -> FetchFailure:
    assert isinstance(result, FetchFailure), f"expected a {reason} failure, got {len(result)} bytes"
    assert result.reason == reason, result
    assert result.reason in FAILURE_REASONS
    return result


# ---------------------------------------------------------------------------------------------------
# Content
# ---------------------------------------------------------------------------------------------------


def test_png_is_returned_and_the_user_agent_sent(server):
    assert fetch(server.url("/png"), local_options(user_agent="test-agent/1")) == PNG
    assert server.user_agents == ["test-agent/1"]


@pytest.mark.parametrize("path", ["/jpeg-untyped", "/octet"])
def test_missing_or_octet_stream_content_type_is_accepted(server, path):
    assert fetch(server.url(path), FAST) in (PNG, JPEG)


@pytest.mark.parametrize("path", ["/html", "/json"])
def test_non_image_content_type_is_refused(server, path):
    failure = _failure(fetch(server.url(path), FAST), "not_image_content")
    assert "text/html" in failure.detail or "application/json" in failure.detail
    assert server.requests[path] == 1


# ---------------------------------------------------------------------------------------------------
# Status codes and retries
# ---------------------------------------------------------------------------------------------------


def test_404_is_final_without_retry(server):
    failure = _failure(fetch(server.url("/missing"), FAST), "http_error")
    assert "404" in failure.detail
    assert server.requests["/missing"] == 1


def test_503_then_success_retries_once(server):
    assert fetch(server.url("/flaky"), FAST) == PNG
    assert server.requests["/flaky"] == 2


@pytest.mark.parametrize("retries", [0, 2])
def test_503_forever_gives_up_after_exactly_1_plus_retries_requests(server, retries):
    failure = _failure(fetch(server.url("/down"), local_options(retries=retries, backoff=0.0)), "http_error")
    assert "503" in failure.detail
    assert server.requests["/down"] == 1 + retries


def test_429_is_retried(server):
    _failure(fetch(server.url("/throttled"), local_options(retries=1, backoff=0.0)), "http_error")
    assert server.requests["/throttled"] == 2


def test_backoff_waits_between_retries(server):
    # Retry n waits 50-100% of backoff * 2**(n-1): with 0.1 s and 2 retries, 0.15-0.3 s in all.
    start = time.monotonic()
    _failure(fetch(server.url("/down"), local_options(retries=2, backoff=0.1)), "http_error")
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 1.0
    assert server.requests["/down"] == 3


# ---------------------------------------------------------------------------------------------------
# Size cap
# ---------------------------------------------------------------------------------------------------


def test_declared_length_over_cap_is_refused_without_downloading(server):
    failure = _failure(fetch(server.url("/big-declared"), local_options(max_bytes=CAP)), "too_large")
    assert str(BIG) in failure.detail
    streamed = server.wait_streamed("/big-declared")
    # The client hung up after the headers: the server hit a closed connection long before the end.
    assert streamed.aborted
    assert streamed.sent < BIG // 4
    assert server.requests["/big-declared"] == 1  # too_large is final


def test_chunked_body_over_cap_stops_reading(server):
    _failure(fetch(server.url("/big-chunked"), local_options(max_bytes=CAP)), "too_large")
    streamed = server.wait_streamed("/big-chunked")
    assert streamed.aborted
    assert streamed.sent < BIG // 4


def test_cap_boundary_without_content_length(server):
    url = server.url("/chunked-png")
    assert fetch(url, local_options(max_bytes=len(PNG))) == PNG
    _failure(fetch(url, local_options(max_bytes=len(PNG) - 1)), "too_large")


def test_cap_boundary_with_content_length(server):
    url = server.url("/png")
    assert fetch(url, local_options(max_bytes=len(PNG))) == PNG
    _failure(fetch(url, local_options(max_bytes=len(PNG) - 1)), "too_large")


# ---------------------------------------------------------------------------------------------------
# Connection problems
# ---------------------------------------------------------------------------------------------------


def test_slow_server_times_out_and_is_retried(server):
    start = time.monotonic()
    failure = _failure(fetch(server.url("/slow"), local_options(timeout=0.3, retries=1, backoff=0.0)), "fetch_failed")
    elapsed = time.monotonic() - start
    assert "timed out" in failure.detail.lower()
    assert "2 attempts" in failure.detail
    assert elapsed < SLOW_SECONDS  # two 0.3 s attempts, not the server's 2 s
    assert server.requests["/slow"] == 2


def test_unreachable_port_is_fetch_failed():
    url = f"http://127.0.0.1:{_free_port()}/x.png"  # bound and released: nothing listens there
    failure = _failure(fetch(url, local_options(retries=1, backoff=0.0)), "fetch_failed")
    assert "2 attempts" in failure.detail


@pytest.mark.parametrize(
    "url, words",
    [
        ("ftp://example.com/a.png", "unsupported URL scheme 'ftp'"),
        ("data:image/png;base64,AAAA", "unsupported URL scheme 'data'"),
        ("no-scheme.png", "unsupported URL scheme ''"),
        ("http://[::1/a.png", "malformed URL"),
        ("http:///a.png", "fetch_failed"),
    ],
)
def test_bad_urls_are_failures_not_exceptions(url, words):
    failure = _failure(fetch(url, FAST), "fetch_failed")
    assert words in f"{failure.reason} {failure.detail}"


# ---------------------------------------------------------------------------------------------------
# Redirects
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/redirect", "/redirect-relative"])
def test_redirect_is_followed(server, path):
    assert fetch(server.url(path), FAST) == PNG
    assert server.requests["/png"] == 1


def test_redirect_loop_is_cut_off(server):
    failure = _failure(fetch(server.url("/redirect-loop"), FAST), "fetch_failed")
    assert "redirects" in failure.detail
    assert server.requests["/redirect-loop"] == 1 + MAX_REDIRECTS  # no retry: a loop stays a loop


def test_redirect_to_a_file_url_is_refused(server):
    failure = _failure(fetch(server.url("/redirect-to-file"), FAST), "fetch_failed")
    assert "file:///etc/hostname" in failure.detail


def test_redirect_body_is_not_read(server):
    # requests itself would read this whole body into memory before following the redirect.
    assert fetch(server.url("/redirect-big-body"), local_options(max_bytes=CAP)) == PNG
    streamed = server.wait_streamed("/redirect-big-body")
    assert streamed.aborted
    assert streamed.sent < BIG // 4


# ---------------------------------------------------------------------------------------------------
# file:// URLs
# ---------------------------------------------------------------------------------------------------


def test_file_urls(tmp_path):
    (tmp_path / "a b.png").write_bytes(PNG)
    assert fetch((tmp_path / "a b.png").as_uri(), FAST) == PNG  # as_uri percent-encodes the space
    assert fetch(f"file://localhost{tmp_path}/a%20b.png", FAST) == PNG
    _failure(fetch((tmp_path / "missing.png").as_uri(), FAST), "fetch_failed")
    _failure(fetch(tmp_path.as_uri(), FAST), "fetch_failed")  # a directory
    _failure(fetch((tmp_path / "a b.png").as_uri(), local_options(max_bytes=len(PNG) - 1)), "too_large")
    failure = _failure(fetch(f"file://otherhost{tmp_path}/a%20b.png", FAST), "fetch_failed")
    assert "otherhost" in failure.detail


# ---------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"retries": True}, "retries"),
        ({"backoff": -0.1}, "backoff"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"threads": 0}, "threads"),
        ({"user_agent": ""}, "user_agent"),
        ({"user_agent": "a\r\nX-Injected: 1"}, "user_agent"),
    ],
)
def test_bad_options_name_the_field(kwargs, name):
    with pytest.raises(DataPrepError, match=f"`{name}` must be"):
        FetchOptions(**kwargs)


def test_zero_backoff_and_retries_are_allowed():
    assert FetchOptions(retries=0, backoff=0).retries == 0


# ---------------------------------------------------------------------------------------------------
# fetch_many
# ---------------------------------------------------------------------------------------------------


def test_fetch_many_keeps_order_and_bounds_concurrency(server):
    urls = [server.url(f"/item/{i}") for i in range(50)]
    out = list(fetch_many(urls, local_options(threads=4, timeout=5.0)))
    assert [u for u, _ in out] == urls
    assert [body for _, body in out] == [f"/item/{i}".encode() for i in range(50)]
    assert 1 < server.max_active <= 4


def test_fetch_many_reports_failures_in_place(server):
    urls = [server.url("/png"), server.url("/missing"), "ftp://x/y.png", server.url("/html"), server.url("/png")]
    out = list(fetch_many(urls, local_options(threads=3, backoff=0.0)))
    assert [u for u, _ in out] == urls
    results = [r for _, r in out]
    assert results[0] == PNG and results[4] == PNG
    assert [r.reason for r in results[1:4]] == ["http_error", "fetch_failed", "not_image_content"]


def test_fetch_many_buffers_a_bounded_window_of_a_lazy_input(server):
    threads = 4
    urls = (server.url(f"/item/{i}") for i in itertools.count())  # endless: must be consumed lazily
    results = fetch_many(urls, local_options(threads=threads))
    first_url, first = next(results)
    assert first == b"/item/0"
    time.sleep(0.3)  # a slow consumer: workers finish what they hold, then must stop
    started = sum(server.requests.values())
    assert threads <= started <= 2 * threads + 1
    start = time.monotonic()
    results.close()  # stopping early cancels the rest promptly
    assert time.monotonic() - start < 2.0
    time.sleep(0.1)
    assert sum(server.requests.values()) == started


def test_fetch_many_of_nothing():
    assert list(fetch_many([], FAST)) == []


def test_many_tasks_in_one_process_keep_open_descriptors_flat(tmp_path):
    """A task used to start its own 16-thread pool whose threads each opened a keep-alive session
    that was never closed: a worker handling many tasks of a big URL table ran out of descriptors.
    200 tasks of 4 URLs each against an HTTP/1.1 server now leave as many open as 20 did."""
    import os
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from data_prep.http_fetch import close_read_pool
    from data_prep.image_ops import ProcessOptions
    from data_prep.shard_task import Task, TaskContext, _load
    from data_prep.sources import ItemRef

    www = tmp_path / "www"
    www.mkdir()
    for i in range(4):
        (www / f"{i}.png").write_bytes(PNG)

    class KeepAlive(SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # connections stay open between requests, as real hosts keep them

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: KeepAlive(*a, directory=str(www), **k))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    ctx = TaskContext(part_uri=str(tmp_path / "part"), process=ProcessOptions(resolution=32),
                      fetch=local_options(retries=0), samples_per_shard=10, max_shard_bytes=None, read_threads=16)

    def run(n: int) -> None:
        for t in range(n):
            items = tuple(ItemRef(source_id=f"{t}-{i}", image=f"{base}/{i}.png", caption=f"c{i}") for i in range(4))
            loaded = list(_load(Task(index=t, items=items), ctx))
            assert all(item.data == PNG for item in loaded)

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    try:
        run(20)
        after_20 = open_fds()
        run(180)
        assert open_fds() <= after_20 + 2
    finally:
        close_read_pool()
        server.shutdown()
        server.server_close()



# ---------------------------------------------------------------------------------------------------
# Untrusted URLs: private hosts and downgrades
# ---------------------------------------------------------------------------------------------------


def test_private_hosts_are_refused_unless_allowed(server):
    for url in (server.url("/png"), "http://169.254.169.254/latest/meta-data/", "http://[::1]/x",
                "http://10.0.0.1/x", "http://[fd00::1]/x", "http://0.0.0.0/x", "http://[::ffff:127.0.0.1]/x"):
        failure = _failure(fetch(url, FetchOptions(timeout=1.0)), "private_host")
        assert "--allow-private-hosts" in failure.detail
    assert server.requests.get("/png", 0) == 0  # refused before connecting
    assert fetch(server.url("/png"), local_options()) == PNG


def test_every_redirect_hop_is_checked(server, monkeypatch):
    """A host allowed at the first hop may redirect to one that is not."""
    from data_prep import http_fetch

    real = http_fetch._private_host
    monkeypatch.setattr(http_fetch, "_private_host",
                        lambda url: real(url) if "localhost" in url else None)  # only "localhost" is private here
    port = server.base.rsplit(":", 1)[1]
    failure = fetch(server.url(f"/redirect-to/http://localhost:{port}/png"), FetchOptions(timeout=2.0))
    _failure(failure, "private_host")
    assert server.requests.get("/png", 0) == 0


def test_an_https_url_redirected_to_http_is_refused(tmp_path, server, monkeypatch):
    import ssl
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    httpd = _Server(("127.0.0.1", 0), Handler)
    httpd.state = server
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    secure = f"https://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert fetch(f"{secure}/png", local_options()) == PNG  # the server works over TLS
        failure = _failure(fetch(f"{secure}/redirect-to/{server.url('/png')}", local_options()), "insecure_redirect")
        assert "plain http" in failure.detail
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("path", ["/json-untyped", "/text-octet"])
def test_a_body_without_a_specific_type_must_be_an_image(server, path):
    _failure(fetch(server.url(path), local_options()), "not_image_content")
