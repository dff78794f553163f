"""Fixtures for the shard stage: a real HTTP server on 127.0.0.1 serving a folder."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


@dataclass
class HttpServer:
    root: Path
    base: str
    requests: list[str]


class _Handler(SimpleHTTPRequestHandler):
    server_version = "test"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        if self.path.startswith("/html"):
            body = b"<!doctype html><html><body>Not an image, a login page</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()


@pytest.fixture
def http_server(tmp_path) -> Iterator[HttpServer]:
    """Serves tmp_path/www on 127.0.0.1 (plus /html*, a text/html page); stopped after the test."""
    root = tmp_path / "www"
    root.mkdir()

    def handler(*args, **kwargs):
        return _Handler(*args, directory=str(root), **kwargs)

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield HttpServer(root=root, base=f"http://127.0.0.1:{server.server_address[1]}", requests=server.seen)
    finally:
        server.shutdown()
        server.server_close()
