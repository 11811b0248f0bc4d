"""Downloads against a local HTTP server on 127.0.0.1: mirrors, checksums, truncation, resume."""

import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest

from ddpmkit.data.download import cache_dir, download, sha256_file
from ddpmkit.errors import DdpmkitError
from ddpmkit.fileio import atomic_write

BODY = bytes(range(256)) * 40  # 10 KiB
DIGEST = hashlib.sha256(BODY).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.routes[path] = (body, behaviour)``; behaviours: ok, truncate, ignore-range."""

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        if self.path not in self.server.routes:
            self.send_error(404)
            return
        body, behaviour = self.server.routes[self.path]
        wanted = self.headers.get("Range")
        start = int(wanted.removeprefix("bytes=").rstrip("-")) if wanted and behaviour != "ignore-range" else 0
        if start >= len(body) > 0:
            self.send_error(416)
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))  # a lie when truncating
        self.end_headers()
        rest = body[start:]
        self.wfile.write(rest[: len(rest) // 2] if behaviour == "truncate" else rest)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.routes, httpd.requests = {}, []
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def dead_url():
    """A URL on a local port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/file.bin"


def fetch(urls, dest, digest=DIGEST):
    return download(urls, dest, digest, timeout=5, progress=False)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_good_file_downloads_and_verifies(server, tmp_path):
    server.routes["/f"] = (BODY, "ok")
    dest = tmp_path / "sub" / "file.bin"
    assert fetch([server.url("/f")], dest) == dest
    assert dest.read_bytes() == BODY
    assert leftovers(dest.parent) == ["file.bin"]


def test_existing_verified_file_is_not_downloaded_again(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(BODY)
    fetch([server.url("/f")], dest)
    assert server.requests == []


def test_finished_partial_file_is_renamed_without_a_download(server, tmp_path):
    (tmp_path / "file.bin.part").write_bytes(BODY)
    fetch([server.url("/f")], tmp_path / "file.bin")
    assert server.requests == [] and leftovers(tmp_path) == ["file.bin"]


def test_wrong_checksum_leaves_no_file(server, tmp_path):
    server.routes["/f"] = (BODY, "ok")
    with pytest.raises(DdpmkitError, match="checksum mismatch") as caught:
        fetch([server.url("/f")], tmp_path / "file.bin", "0" * 64)
    assert server.url("/f") in str(caught.value)
    assert leftovers(tmp_path) == []


def test_truncated_body_is_an_error_and_no_final_file(server, tmp_path):
    server.routes["/f"] = (BODY, "truncate")
    with pytest.raises(DdpmkitError, match=f"truncated: got {len(BODY) // 2} of {len(BODY)} bytes"):
        fetch([server.url("/f")], tmp_path / "file.bin")
    assert leftovers(tmp_path) == ["file.bin.part"]  # kept so the next attempt resumes


def test_server_down_names_the_mirror(dead_url, tmp_path):
    with pytest.raises(DdpmkitError, match="refused") as caught:
        fetch([dead_url], tmp_path / "file.bin")
    assert dead_url in str(caught.value) and str(tmp_path / "file.bin") in str(caught.value)
    assert leftovers(tmp_path) == []


def test_every_failed_mirror_is_listed(server, dead_url, tmp_path):
    with pytest.raises(DdpmkitError) as caught:
        fetch([dead_url, server.url("/missing")], tmp_path / "file.bin")
    message = str(caught.value)
    assert dead_url in message and server.url("/missing") in message and "HTTP 404" in message


def test_first_mirror_fails_second_succeeds(server, dead_url, tmp_path):
    server.routes["/bad"] = (b"x" * len(BODY), "ok")
    server.routes["/good"] = (BODY, "ok")
    dest = tmp_path / "file.bin"
    fetch([dead_url, server.url("/missing"), server.url("/bad"), server.url("/good")], dest)
    assert dest.read_bytes() == BODY and leftovers(tmp_path) == ["file.bin"]


def test_partial_file_is_resumed_with_range(server, tmp_path):
    server.routes["/f"] = (BODY, "ok")
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(BODY[:1000])
    fetch([server.url("/f")], dest)
    assert dest.read_bytes() == BODY
    assert server.requests == [("/f", "bytes=1000-")]


def test_truncated_mirror_is_resumed_from_the_next(server, tmp_path):
    server.routes["/cut"] = (BODY, "truncate")
    server.routes["/good"] = (BODY, "ok")
    fetch([server.url("/cut"), server.url("/good")], tmp_path / "file.bin")
    assert (tmp_path / "file.bin").read_bytes() == BODY
    assert server.requests == [("/cut", None), ("/good", f"bytes={len(BODY) // 2}-")]


def test_server_ignoring_range_gives_a_fresh_download(server, tmp_path):
    server.routes["/f"] = (BODY, "ignore-range")
    (tmp_path / "file.bin.part").write_bytes(BODY[:1000])
    fetch([server.url("/f")], tmp_path / "file.bin")
    assert (tmp_path / "file.bin").read_bytes() == BODY


def test_partial_file_longer_than_the_file_starts_over(server, tmp_path):
    server.routes["/f"] = (BODY, "ok")
    (tmp_path / "file.bin.part").write_bytes(BODY + b"extra")
    fetch([server.url("/f")], tmp_path / "file.bin")
    assert (tmp_path / "file.bin").read_bytes() == BODY


def test_corrupt_partial_file_is_discarded_after_a_mismatch(server, tmp_path):
    server.routes["/f"] = (BODY, "ok")
    (tmp_path / "file.bin.part").write_bytes(b"\xff" * 1000)
    fetch([server.url("/f")], tmp_path / "file.bin")
    assert (tmp_path / "file.bin").read_bytes() == BODY
    assert server.requests == [("/f", "bytes=1000-"), ("/f", None)]


def test_only_http_urls_are_used(tmp_path):
    source = tmp_path / "source"
    source.write_bytes(BODY)
    with pytest.raises(DdpmkitError, match="only http and https"):
        fetch([source.as_uri()], tmp_path / "file.bin")


def test_sha256_file_and_atomic_write(tmp_path):
    path = tmp_path / "a" / "b.bin"
    atomic_write(path, BODY)
    assert sha256_file(path) == DIGEST and leftovers(path.parent) == ["b.bin"]


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "ddpmkit"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_dir() == Path.home() / ".cache" / "ddpmkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "ddpmkit"
