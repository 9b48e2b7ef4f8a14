"""Tests for scripts/get_laion_data.sh against a local HTTP server on 127.0.0.1.

Only 127.0.0.1 is contacted: a tiny preprocessed_11k.tar.gz is built in tmp_path
and served by a Range-capable http.server running in a bounded background thread.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import socket
import struct
import subprocess
import tarfile
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "get_laion_data.sh"
SUBSET = "preprocessed_11k"
ARCHIVE_NAME = f"{SUBSET}.tar.gz"
SERVER_LIFETIME_S = 60.0  # the server thread stops itself after this, whatever happens
RUN_TIMEOUT_S = 60

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("tar") is None
    or (shutil.which("curl") is None and shutil.which("wget") is None),
    reason="needs bash, tar and curl or wget",
)

DOWNLOADERS = [d for d in ("curl", "wget") if shutil.which(d)]


# ------------------------------------------------------------------ fixtures --
def tiny_png(rgb: tuple[int, int, int], size: int = 2) -> bytes:
    """A valid size x size RGB PNG, written with the standard library only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(rgb) * size for _ in range(size))
    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


CAPTIONS = [
    "a red square",
    'a green square, with a comma and "quotes"',
    "a blue square\nwith a caption on two lines",
]


def make_archive(n_images: int = 3, n_rows: int = 3) -> tuple[bytes, dict[str, bytes]]:
    """Return (tar.gz bytes, {relative path: content}) for a fake preprocessed_11k."""
    files: dict[str, bytes] = {}
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    for i in range(n_images):
        files[f"{SUBSET}/{i:06d}.png"] = tiny_png(colours[i % len(colours)])
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["file_name", "text"])
    for i in range(n_rows):
        writer.writerow([f"{i:06d}.png", CAPTIONS[i % len(CAPTIONS)]])
    files[f"{SUBSET}/metadata.csv"] = buf.getvalue().encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        info = tarfile.TarInfo(SUBSET)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue(), files


class Server:
    """Range-capable static server on 127.0.0.1, logging every request."""

    def __init__(self, blobs: dict[str, bytes], ranges: bool = True):
        self.blobs = blobs
        self.ranges = ranges
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                rng = self.headers.get("Range")
                data = server.blobs.get(self.path)
                entry = {"path": self.path, "range": rng, "status": None}
                server.requests.append(entry)
                if data is None:
                    entry["status"] = 404
                    self.send_error(404)
                    return
                start, end = 0, len(data) - 1
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "") if server.ranges else None
                if m:
                    start = int(m.group(1))
                    if m.group(2):
                        end = min(end, int(m.group(2)))
                    if start >= len(data):
                        entry["status"] = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    entry["status"] = 206
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    entry["status"] = 200
                    self.send_response(200)
                body = data[start:end + 1]
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 0.05
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        deadline = time.monotonic() + SERVER_LIFETIME_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.httpd.handle_request()
        self.httpd.server_close()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def archive():
    return make_archive()


@pytest.fixture
def server(archive):
    srv = Server({f"/{ARCHIVE_NAME}": archive[0]})
    try:
        yield srv
    finally:
        srv.stop()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "ftp_proxy")
           and not k.startswith("LAION_") and k != "DATA_DIR"}
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    env["LAION_CONNECT_TIMEOUT"] = "5"
    env.update(extra)
    return env


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=cwd, env=clean_env(**env),
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )


def assert_unpacked(dest: Path, files: dict[str, bytes]) -> None:
    target = dest / SUBSET
    assert target.is_dir()
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data, rel
    with open(target / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0].keys()) == ["file_name", "text"]
    assert all((target / r["file_name"]).is_file() for r in rows)
    # nothing half-done left next to it
    assert not list(dest.glob(".*unpack*"))
    assert not (dest / f"{ARCHIVE_NAME}.part").exists()


# --------------------------------------------------------------------- tests --
@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_download_unpack_and_counts(tmp_path, server, archive, downloader):
    data, files = archive
    dest = tmp_path / "out"
    res = run([SUBSET, str(dest)], tmp_path,
              LAION_DATA_BASE_URL=server.base_url + "/", LAION_DOWNLOADER=downloader)
    assert res.returncode == 0, res.stderr
    assert_unpacked(dest, files)
    assert (dest / ARCHIVE_NAME).read_bytes() == data
    assert "3 images, 3 captions" in res.stdout
    assert "warning" not in res.stderr
    assert [r["path"] for r in server.requests] == [f"/{ARCHIVE_NAME}"]


def test_default_destination_is_data(tmp_path, server, archive):
    res = run([SUBSET], tmp_path, LAION_DATA_BASE_URL=server.base_url)
    assert res.returncode == 0, res.stderr
    assert_unpacked(tmp_path / "data", archive[1])
    assert (tmp_path / "data" / SUBSET / "metadata.csv").is_file()


def test_data_dir_env(tmp_path, server, archive):
    dest = tmp_path / "elsewhere"
    res = run([SUBSET], tmp_path, DATA_DIR=str(dest),
              LAION_DATA_URL=f"{server.base_url}/{ARCHIVE_NAME}")
    assert res.returncode == 0, res.stderr
    assert_unpacked(dest, archive[1])
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_resume_partial_download(tmp_path, server, archive, downloader):
    data, files = archive
    dest = tmp_path / "data"
    dest.mkdir()
    cut = len(data) // 2
    (dest / f"{ARCHIVE_NAME}.part").write_bytes(data[:cut])
    res = run([SUBSET, str(dest)], tmp_path,
              LAION_DATA_URL=f"{server.base_url}/{ARCHIVE_NAME}", LAION_DOWNLOADER=downloader)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stdout
    assert (dest / ARCHIVE_NAME).read_bytes() == data
    assert any(r["range"] == f"bytes={cut}-" and r["status"] == 206 for r in server.requests), server.requests
    assert_unpacked(dest, files)
    assert "3 images, 3 captions" in res.stdout


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_server_without_range_support_restarts(tmp_path, archive, downloader):
    data, files = archive
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / f"{ARCHIVE_NAME}.part").write_bytes(data[:10])
    srv = Server({f"/{ARCHIVE_NAME}": data}, ranges=False)
    try:
        res = run([SUBSET, str(dest)], tmp_path,
                  LAION_DATA_BASE_URL=srv.base_url, LAION_DOWNLOADER=downloader)
    finally:
        srv.stop()
    assert res.returncode == 0, res.stderr
    assert (dest / ARCHIVE_NAME).read_bytes() == data
    assert_unpacked(dest, files)


def test_complete_part_file_is_finished(tmp_path, server, archive):
    """A .part that already holds everything (killed before the rename) is accepted."""
    data, files = archive
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / f"{ARCHIVE_NAME}.part").write_bytes(data)
    res = run([SUBSET, str(dest)], tmp_path, LAION_DATA_BASE_URL=server.base_url)
    assert res.returncode == 0, res.stderr
    assert (dest / ARCHIVE_NAME).read_bytes() == data
    assert_unpacked(dest, files)


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_offline_error(tmp_path, downloader):
    with socket.socket() as s:  # a port on 127.0.0.1 that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "data"
    url = f"http://127.0.0.1:{port}/{ARCHIVE_NAME}"
    res = run([SUBSET, str(dest)], tmp_path,
              LAION_DATA_BASE_URL=f"http://127.0.0.1:{port}", LAION_DOWNLOADER=downloader)
    assert res.returncode != 0
    err_lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert err_lines == [
        f"error: cannot reach {url} (offline?): download {ARCHIVE_NAME} elsewhere "
        f"and put it in {dest}, then rerun"
    ], res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert not (dest / SUBSET).exists()
    assert not (dest / f"{ARCHIVE_NAME}.part").exists()


def test_unknown_subset_usage_error(tmp_path):
    res = run(["preprocessed_99k"], tmp_path, LAION_DATA_BASE_URL="http://127.0.0.1:9")
    assert res.returncode == 2
    assert "unknown subset 'preprocessed_99k'" in res.stderr
    assert "usage:" in res.stderr
    assert not (tmp_path / "data").exists()
    res = run([], tmp_path)
    assert res.returncode == 2 and "usage:" in res.stderr


def test_rerun_when_already_there(tmp_path, server, archive):
    dest = tmp_path / "data"
    first = run([SUBSET, str(dest)], tmp_path, LAION_DATA_BASE_URL=server.base_url)
    assert first.returncode == 0, first.stderr
    n_requests = len(server.requests)
    mtime = (dest / SUBSET / "metadata.csv").stat().st_mtime_ns
    second = run([SUBSET, str(dest)], tmp_path, LAION_DATA_BASE_URL=server.base_url)
    assert second.returncode == 0, second.stderr
    assert "already there" in second.stdout
    assert len(server.requests) == n_requests  # no new download
    assert (dest / SUBSET / "metadata.csv").stat().st_mtime_ns == mtime
    assert_unpacked(dest, archive[1])


def test_count_mismatch_warns(tmp_path):
    data, _ = make_archive(n_images=3, n_rows=2)
    srv = Server({f"/{ARCHIVE_NAME}": data})
    try:
        res = run([SUBSET, str(tmp_path / "data")], tmp_path, LAION_DATA_BASE_URL=srv.base_url)
    finally:
        srv.stop()
    assert res.returncode == 0, res.stderr
    assert "3 images, 2 captions" in res.stdout
    assert "warning: 3 images but 2 captions" in res.stderr


def test_http_error(tmp_path, server):
    res = run([SUBSET, str(tmp_path / "data")], tmp_path,
              LAION_DATA_URL=f"{server.base_url}/missing.tar.gz")
    assert res.returncode != 0
    assert "HTTP 404" in res.stderr
    assert not (tmp_path / "data" / SUBSET).exists()


def test_corrupt_archive_leaves_nothing_half_unpacked(tmp_path, archive):
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / ARCHIVE_NAME).write_bytes(archive[0][: len(archive[0]) // 2])
    # the archive is already there, so no download (and no server) is needed
    res = run([SUBSET, str(dest)], tmp_path, LAION_DATA_BASE_URL="http://127.0.0.1:9")
    assert res.returncode != 0
    assert "unpacking" in res.stderr and "failed" in res.stderr
    assert not (dest / SUBSET).exists()
    assert not list(dest.glob(".*unpack*"))
