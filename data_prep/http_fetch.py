"""Concurrent image download for URL sources: timeouts, exact retries, a size cap, results in input order.

A shard worker hands `fetch_many` the URLs of its items in order and gets back, in the same order, each
URL with its bytes or a FetchFailure. Per-URL problems never raise: they become failures whose `reason`
the shard stage counts as a skip. Only bad options (DataPrepError) and bugs raise.
"""

from __future__ import annotations

import atexit
import functools
import ipaddress
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit
from urllib.request import url2pathname

if TYPE_CHECKING:
    import requests

from data_prep.checks import require, require_bool, require_int, require_number
from data_prep.errors import DataPrepError

FAILURE_REASONS = ("fetch_failed", "http_error", "not_image_content", "too_large", "private_host", "insecure_redirect")
"""Every value FetchFailure.reason takes."""

MAX_REDIRECTS = 10
"""Redirect hops followed per attempt; image hosts need one to three, a loop is cut off here."""

_CHUNK_BYTES = 64 * 1024
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_NON_IMAGE_OK_TYPES = ("application/octet-stream", "binary/octet-stream")


@functools.cache
def _final_errors() -> tuple[type[BaseException], ...]:
    # requests (with urllib3) is imported on first use: a third of the shard CLI's start-up otherwise,
    # paid by every run, though only sources with http(s) URLs need it.
    import http.client

    import requests
    import urllib3

    return (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError, ValueError)

# Backoff jitter exists to de-synchronise workers, so it must differ between forked worker processes;
# a seeded or module-level random.Random would be copied by fork and every worker would sleep in step.
_jitter = random.SystemRandom()


@dataclass(frozen=True)
class FetchOptions:
    """How URLs are downloaded; one instance is shared by all threads of a worker."""

    timeout: float = 10.0
    """Seconds to wait for a connection, and for each read of the response, per attempt. It bounds every
    wait for data, not the whole transfer: a server trickling bytes is stopped by `max_bytes` only."""
    retries: int = 2
    """Extra attempts after the first, only for retryable failures: connection errors, timeouts, HTTP 429
    and 5xx. Other 4xx statuses, wrong content types and oversized bodies are final at once."""
    backoff: float = 0.5
    """Base seconds between attempts: retry n waits about backoff * 2**(n-1), jittered to 50-100%."""
    max_bytes: int = 64 * 2**20
    """Size cap of one body in bytes: refused up front by Content-Length, else reading stops once over."""
    threads: int = 16
    """Concurrent downloads per worker process in `fetch_many`; up to 2x this many results are buffered."""
    user_agent: str = "ldmflow/0.1 (+image-text dataset builder)"
    """User-Agent header sent with every request; hosts block anonymous or default library agents."""
    allow_private_hosts: bool = False
    """Fetch from hosts that resolve to loopback, private (RFC 1918, IPv6 ULA), link-local (the cloud
    metadata service at 169.254.169.254) or other non-global addresses. Off: a URL table from anyone
    cannot turn the fetcher on the network it runs in; each such URL (or redirect) is a
    `private_host` skip. On for a table of your own internal hosts, and for tests on 127.0.0.1."""

    def __post_init__(self) -> None:
        require_number(self.timeout, "fetch option `timeout`", inclusive=False, note=" (seconds)")
        require_int(self.retries, "fetch option `retries`", 0)
        require_number(self.backoff, "fetch option `backoff`", note=" (seconds)")
        require_int(self.max_bytes, "fetch option `max_bytes`", 1)
        require_int(self.threads, "fetch option `threads`", 1)
        ua = self.user_agent
        ok = isinstance(ua, str) and bool(ua.strip()) and "\r" not in ua and "\n" not in ua
        require(ok, "fetch option `user_agent`", "a non-empty single-line string", ua)
        require_bool(self.allow_private_hosts, "fetch option `allow_private_hosts`")


@dataclass(frozen=True)
class FetchFailure:
    """Why a URL gave no bytes; the shard stage counts these as skips by `reason`."""

    reason: str
    """One of FAILURE_REASONS: "fetch_failed" (bad or unsupported URL, DNS, refused or reset connection,
    timeout, too many redirects; after retries where retryable), "http_error" (final non-2xx status),
    "not_image_content" (a Content-Type other than image/*, or none or application/octet-stream with a
    body that is no known image format), "too_large" (over FetchOptions.max_bytes), "private_host" (a
    host, or a redirect's, that resolves to a non-global address; see allow_private_hosts),
    "insecure_redirect" (https redirected to http)."""
    detail: str
    """Human-readable detail for the log, e.g. "HTTP 404 Not Found"."""


# ---------------------------------------------------------------------------------------------------
# One URL
# ---------------------------------------------------------------------------------------------------


def fetch(url: str, options: FetchOptions, session: requests.Session | None = None) -> bytes | FetchFailure:
    """The body of `url` (http, https or file), or a FetchFailure; never raises for a problem with the URL.

    http(s): up to 1 + options.retries attempts, each following up to MAX_REDIRECTS redirects (to http(s)
    only). file: the local file (file:///path or file://localhost/path), read once.
    `session` must not be used by another thread at the same time; without one, a session kept per
    calling thread is used, so repeated calls from one thread reuse connections.
    """
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as e:  # e.g. an unbalanced "[" in the host
        return FetchFailure("fetch_failed", f"malformed URL {url!r}: {e}")
    if scheme == "file":
        return _read_file(url, options.max_bytes)
    if scheme not in ("http", "https"):
        return FetchFailure("fetch_failed", f"unsupported URL scheme {scheme!r} in {url!r}; use http, https or file")
    if session is None:
        session = _DEFAULT_SESSIONS.get()

    attempts = options.retries + 1
    for attempt in range(1, attempts + 1):
        result, retryable = _attempt_http(url, options, session)
        if not retryable:
            return result
        if attempt < attempts:
            time.sleep(_backoff_seconds(options.backoff, attempt))
    assert isinstance(result, FetchFailure)
    return FetchFailure(result.reason, f"{result.detail} (gave up after {attempts} attempts)")


def _backoff_seconds(base: float, retry: int) -> float:
    # "Equal jitter": never less than half the exponential delay, so retries cannot bunch up at ~0 s.
    delay = base * 2 ** (retry - 1)
    return delay * (0.5 + 0.5 * _jitter.random())


def _attempt_http(url: str, options: FetchOptions, session: requests.Session) -> tuple[bytes | FetchFailure, bool]:
    """One attempt, following redirects: (result, whether the failure is worth retrying)."""
    import requests

    try:
        for _ in range(MAX_REDIRECTS + 1):
            refused = None if options.allow_private_hosts else _private_host(url)
            if refused is not None:  # checked at every hop: a public URL may redirect inwards
                return refused, False
            with _send_once(session, url, options) as resp:
                if resp.status_code in _REDIRECT_STATUSES and "location" in resp.headers:
                    was, url = url, urljoin(resp.url, session.get_redirect_target(resp))
                    scheme = urlsplit(url).scheme.lower()
                    if scheme not in ("http", "https"):
                        return FetchFailure("fetch_failed", f"redirected to unsupported URL {url!r}"), False
                    if scheme == "http" and urlsplit(was).scheme.lower() == "https":
                        return FetchFailure("insecure_redirect", f"{was!r} redirected to plain http {url!r}"), False
                    continue
                return _read_response(resp, options.max_bytes)
        return FetchFailure("fetch_failed", f"more than {MAX_REDIRECTS} redirects, last to {url!r}"), False
    except requests.exceptions.SSLError as e:  # a bad certificate stays bad on the next attempt
        return FetchFailure("fetch_failed", _describe(e)), False
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
        # ConnectionError covers DNS failures, refused and reset connections and connect timeouts;
        # Timeout covers read timeouts; ChunkedEncodingError is a connection broken mid-body.
        return FetchFailure("fetch_failed", _describe(e)), True
    except _final_errors() as e:
        # Invalid URLs and headers, undecodable gzip, protocol oddities urllib3 lets through: final.
        return FetchFailure("fetch_failed", _describe(e)), False


def _send_once(session: requests.Session, url: str, options: FetchOptions) -> requests.Response:
    """GET `url` with the body left unread, redirects not followed and nothing read behind our back.

    Redirects are followed by the caller, not by requests, and this goes to the session's adapter rather
    than through Session.send: Session.send reads the whole body of a redirect response into memory
    (`resp.content` in Session.resolve_redirects), even with allow_redirects=False, where it does so to
    fill Response.next. A redirect with a huge body would bypass max_bytes. Closing an unread response
    drops its connection instead.
    """
    import requests
    from requests.cookies import extract_cookies_to_jar

    request = session.prepare_request(requests.Request("GET", url, headers={"User-Agent": options.user_agent}))
    # Proxies from the environment, CA bundle and client certificate, as Session.send would use.
    settings = session.merge_environment_settings(request.url, {}, True, None, None)
    resp = session.get_adapter(request.url).send(
        request,
        stream=True,
        timeout=(options.timeout, options.timeout),
        verify=settings["verify"],
        cert=settings["cert"],
        proxies=settings["proxies"],
    )
    extract_cookies_to_jar(session.cookies, request, resp.raw)
    return resp


def _private_host(url: str) -> FetchFailure | None:
    """A private_host failure when the URL's host resolves to any address that is not global (loopback,
    RFC 1918, link-local, IPv6 ULA, shared, reserved, multicast, unspecified; IPv4-mapped IPv6 as the
    IPv4 it maps). A name that does not resolve is left to the request, which fails as fetch_failed.
    (A host whose DNS answer changes between this look-up and the connection is not caught here.)"""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme.lower() == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not ip.is_global or ip.is_multicast:
            return FetchFailure("private_host", f"{host} resolves to the non-public address {ip}; pass "
                                                "--allow-private-hosts to fetch from internal hosts")
    return None


def _read_response(resp: requests.Response, max_bytes: int) -> tuple[bytes | FetchFailure, bool]:
    status = resp.status_code
    if not 200 <= status < 300:
        retryable = status == 429 or status >= 500
        return FetchFailure("http_error", f"HTTP {status} {resp.reason or ''}".rstrip()), retryable
    content_type = resp.headers.get("content-type")
    if not _is_image_content_type(content_type):
        return FetchFailure("not_image_content", f"Content-Type {content_type!r} is not an image"), False
    declared = _content_length(resp)
    if declared is not None and declared > max_bytes:
        # Refused before reading: leaving the `with` closes the unread response, dropping the connection.
        return FetchFailure("too_large", f"Content-Length {declared} bytes is over the cap of {max_bytes}"), False
    chunks: list[bytes] = []
    size = 0
    # iter_content yields decoded bytes, so a gzip bomb is capped by its decompressed size.
    for chunk in resp.iter_content(chunk_size=_CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
            return FetchFailure("too_large", f"body is over the cap of {max_bytes} bytes (stopped reading)"), False
        chunks.append(chunk)
    body = b"".join(chunks)
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if (not media_type or media_type in _NON_IMAGE_OK_TYPES) and not _looks_like_image(body):
        # No type, or a generic one: only an image's own bytes vouch for it (a metadata service's JSON
        # or an HTML page without a Content-Type is not one).
        return FetchFailure("not_image_content", f"Content-Type {content_type!r} and a body that is no known "
                                                 "image format"), False
    return body, False


_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _looks_like_image(data: bytes) -> bool:
    """Whether `data` starts as an image format the decoder accepts (JPEG, PNG, GIF, BMP, TIFF, WebP,
    AVIF): what a body sent without a specific Content-Type must be to count as an image."""
    if data.startswith(_IMAGE_MAGIC):
        return True
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis")


def _is_image_content_type(value: str | None) -> bool:
    media_type = (value or "").split(";", 1)[0].strip().lower()
    # Missing is allowed (many static hosts send none), and so is binary/octet-stream, what S3 serves
    # for objects uploaded without a type (common for image buckets): the body must then look like an
    # image (_looks_like_image).
    return not media_type or media_type.startswith("image/") or media_type in _NON_IMAGE_OK_TYPES


def _content_length(resp: requests.Response) -> int | None:
    try:
        value = int(resp.headers.get("content-length", ""))
    except ValueError:  # absent or garbage: the streaming cap still applies
        return None
    return value if value >= 0 else None


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _read_file(url: str, max_bytes: int) -> bytes | FetchFailure:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        return FetchFailure(
            "fetch_failed", f"file URL {url!r} names host {parts.netloc!r}; only local files (file:///path) work"
        )
    path = url2pathname(parts.path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                return FetchFailure("too_large", f"file is {size} bytes, over the cap of {max_bytes}")
            # Read one byte past the cap: files that report size 0 (/proc, devices) or grow are capped too.
            data = f.read(max_bytes + 1)
    except OSError as e:
        return FetchFailure("fetch_failed", f"cannot read {path}: {e.strerror or e}")
    if len(data) > max_bytes:
        return FetchFailure("too_large", f"file is over the cap of {max_bytes} bytes")
    return data


# ---------------------------------------------------------------------------------------------------
# Sessions: one per thread
# ---------------------------------------------------------------------------------------------------


class _ThreadSessions:
    """A requests.Session per thread (sessions are not safe to share across threads), closable together."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[requests.Session] = []

    def get(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            import requests
            from requests.adapters import HTTPAdapter

            session = requests.Session()
            # max_retries=0: retries are counted in `fetch` alone, so their number is exact. More pools
            # than the default 10 because one thread's URLs span many hosts; one connection per host
            # suffices as a thread makes one request at a time.
            adapter = HTTPAdapter(pool_connections=32, pool_maxsize=1, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
            with self._lock:
                self._all.append(session)
        return session

    def close_all(self) -> None:
        with self._lock:
            sessions, self._all = self._all, []
        for session in sessions:
            session.close()

    def forget(self) -> None:
        """Drop (without closing: their sockets are the parent's) the sessions a fork copied."""
        with self._lock:
            self._all = []
        self._local = threading.local()


_DEFAULT_SESSIONS = _ThreadSessions()
"""Sessions of `fetch` calls made without one: one per thread, so as many as the threads that fetch
(read_pool's, in the shard stage), all closed by close_read_pool."""


class _ReadPool:
    """The process's one pool of reader threads, reused by every task the process runs: a pool per
    task, each of whose threads opened its own session and kept its connections, ran a long-lived
    worker out of file descriptors after enough tasks (every later URL then failed to connect)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._threads = 0
        self._pid = os.getpid()

    def get(self, threads: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's threads do not exist here
                self._pool, self._threads, self._pid = None, 0, os.getpid()
                _DEFAULT_SESSIONS.forget()
            if self._pool is None or threads > self._threads:
                self._close_locked()
                self._pool = ThreadPoolExecutor(threads, thread_name_prefix="ldmflow-read")
                self._threads = threads
            return self._pool

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                self._close_locked()

    def _close_locked(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._threads = None, 0
        _DEFAULT_SESSIONS.close_all()  # the sessions of the threads just ended


_READ_POOL = _ReadPool()
atexit.register(_READ_POOL.close)


def read_pool(threads: int) -> ThreadPoolExecutor:
    """This process's pool of at least `threads` reader threads (for latency-bound reads: URLs, S3),
    shared by all its tasks; `fetch` called on its threads reuses one session per thread."""
    return _READ_POOL.get(threads)


def close_read_pool() -> None:
    """End the reader threads and close their sessions (the shard stage calls it when a run ends)."""
    _READ_POOL.close()


# ---------------------------------------------------------------------------------------------------
# Many URLs
# ---------------------------------------------------------------------------------------------------


def fetch_many(urls: Iterable[str], options: FetchOptions) -> Iterator[tuple[str, bytes | FetchFailure]]:
    """(url, bytes or FetchFailure) for every URL, in input order, downloading `options.threads` at a time.

    A sliding window: at most 2 * threads URLs are submitted and not yet yielded, so a slow consumer
    holds at most that many bodies in memory (up to 2 * threads * max_bytes) and `urls` may be a lazy
    iterator of any length. One slow URL holds back the results behind it but not the downloads, until
    the window is full. Closing the iterator early cancels queued URLs and waits for those in flight.
    """
    if not isinstance(options, FetchOptions):
        raise DataPrepError(f"fetch_many needs FetchOptions, got {type(options).__name__}; build FetchOptions(...)")
    return _fetch_window(iter(urls), options)


def _fetch_window(urls: Iterator[str], options: FetchOptions) -> Iterator[tuple[str, bytes | FetchFailure]]:
    sessions = _ThreadSessions()
    window = 2 * options.threads
    pending: deque[tuple[str, Future[bytes | FetchFailure]]] = deque()
    pool = ThreadPoolExecutor(max_workers=options.threads, thread_name_prefix="ldmflow-fetch")

    def work(url: str) -> bytes | FetchFailure:
        return fetch(url, options, session=sessions.get())

    try:
        for url in urls:
            pending.append((url, pool.submit(work, url)))
            if len(pending) >= window:
                done_url, future = pending.popleft()
                yield done_url, future.result()
        while pending:
            done_url, future = pending.popleft()
            yield done_url, future.result()
    finally:
        # Also reached when the consumer stops early (GeneratorExit) or a bug raises in a worker.
        pool.shutdown(wait=True, cancel_futures=True)
        sessions.close_all()
