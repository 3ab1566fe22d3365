"""Start the service's commands as child processes, the way a shell on a node would: the one
launcher the tests and the benchmarks use for `python -m ray_job.train` and the checkpoint
tools, so every caller gets the same environment (the repo on PYTHONPATH, this venv's `python`
and `ray` first on PATH, token auth when joining a cluster, the GCS emulator when given)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env(ray_address: str | None = None, emulator: str | None = None, *, clean: bool = False,
        **extra: str) -> dict:
    """The child's environment: this one without RAY_* (or only PATH if clean), plus the rest.

    clean: nothing inherited (no credentials, no emulator): what a fresh shell on a node has.
    """
    base = {} if clean else {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    path = os.environ.get("PATH", "") if not clean else "/usr/bin:/bin"
    base.update({"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "token",
                 "PATH": f"{BIN}{os.pathsep}{path}"})  # `python` in a job's entrypoint: this venv's
    if ray_address:
        base["RAY_ADDRESS"] = ray_address
    if emulator:
        base["STORAGE_EMULATOR_HOST"] = emulator
    base.update({k: str(v) for k, v in extra.items()})
    return base


@dataclass
class Run:
    rc: int
    out: str  # stdout and stderr together: the driver and the forwarded worker logs
    err: str
    started: float  # time.time() at launch
    took: float  # seconds


def command(args: list, module: str = "ray_job.train") -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def run(args: list, *, module: str = "ray_job.train", ray_address: str | None = None,
        emulator: str | None = None, environ: dict | None = None, cwd: Path | str = REPO,
        timeout: float = 600) -> Run:
    """Run a command to its end; environ replaces env(ray_address, emulator) when given."""
    started, clock = time.time(), time.monotonic()
    p = subprocess.run(command(args, module), cwd=cwd, env=environ or env(ray_address, emulator),
                       capture_output=True, text=True, timeout=timeout)
    return Run(p.returncode, p.stdout + p.stderr, p.stderr, started, time.monotonic() - clock)


def start(args: list, *, module: str = "ray_job.train", ray_address: str | None = None,
          emulator: str | None = None, environ: dict | None = None, cwd: Path | str = REPO,
          **popen) -> subprocess.Popen:
    """Start a command and return at once (stdout and stderr merged unless told otherwise)."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.STDOUT)
    return subprocess.Popen(command(args, module), cwd=cwd, env=environ or env(ray_address, emulator),
                            text=True, **popen)
