"""An HTTP proxy on 127.0.0.1 that forwards to the GCS API server and injects faults on a
bounded share of requests: HTTP 503s, connections dropped without an answer, slow answers.

Deterministic: request n (counted from 1) gets the fault schedule[n % len(schedule)], until
max_faults faults have been injected; after that everything passes through.

A storage that stops answering: after hang(match, seconds), every write (POST, PUT, PATCH,
DELETE) of an object whose name holds `match` gets no answer until that time has passed, then
goes through (an upload that finishes late); reads and other objects pass meanwhile.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
       "proxy-authorization", "proxy-authenticate", "content-length"}


class FaultProxy:
    def __init__(self, upstream: str, schedule=("ok", "ok", "503", "ok", "drop", "ok", "slow"),
                 max_faults: int = 60, slow_s: float = 0.5):
        self.upstream = urlparse(upstream)
        self.schedule, self.max_faults, self.slow_s = schedule, max_faults, slow_s
        self.counts = {"requests": 0, "503": 0, "drop": 0, "slow": 0, "held": 0}
        self._lock = threading.Lock()
        self._hang: tuple[str, float] | None = None  # (name part, until: time.monotonic())
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                proxy._hold(self.command, self.path, body)
                fault = proxy._next_fault()
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "503":
                    payload = b'{"error": {"code": 503, "message": "injected fault"}}'
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault == "slow":
                    time.sleep(proxy.slow_s)
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                headers["Host"] = proxy.upstream.netloc
                conn.request(self.command, self.path, body=body if body or self.command in
                             ("POST", "PUT", "PATCH") else None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def hang(self, match: str, seconds: float) -> None:
        """Writes of objects whose name holds match get no answer for seconds from now."""
        with self._lock:
            self._hang = (match, time.monotonic() + seconds)

    def _hold(self, method: str, path: str, body: bytes) -> None:
        with self._lock:
            hang = self._hang
        if hang is None or method not in ("POST", "PUT", "PATCH", "DELETE"):
            return
        match, until = hang
        if match not in _object_name(path, body) or time.monotonic() >= until:
            return
        with self._lock:
            self.counts["held"] += 1
        time.sleep(max(0.0, until - time.monotonic()))

    def _next_fault(self) -> str:
        with self._lock:
            self.counts["requests"] += 1
            fault = self.schedule[self.counts["requests"] % len(self.schedule)]
            injected = self.counts["503"] + self.counts["drop"] + self.counts["slow"]
            if fault == "ok" or injected >= self.max_faults:
                return "ok"
            self.counts[fault] += 1
            return fault

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _object_name(path: str, body: bytes) -> str:
    """The object a request writes: the name= of a media or resumable upload, the JSON
    metadata's name of a multipart one, or the /o/NAME of a delete or patch."""
    url = urlparse(path)
    named = parse_qs(url.query).get("name")
    if named:
        return named[0]
    found = re.search(rb'\{[^{}]*"name"\s*:\s*("(?:[^"\\]|\\.)*")', body[:4096])
    if found:
        return json.loads(found.group(1))
    return unquote(url.path.split("/o/", 1)[1]) if "/o/" in url.path else ""
