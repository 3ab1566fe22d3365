"""One launch owns a run at a time: a lease object in the run folder, ``{run}/.lease.json``.

The lease holds the launch id, host, pid, start time and a heartbeat that a daemon thread on
the driver refreshes every ``heartbeat_s`` while the job lives (Ray's in-run retries happen
under the same driver, so they keep it). A second launch finds a fresh lease and is refused;
a lease whose heartbeat is older than ``stale_s`` was left by a killed job and is taken over.
So is, at once, a fresh lease whose holder ran on this host (same host name and pid
namespace) and whose pid is gone: a job killed with SIGKILL, relaunched here.
The job deletes its lease at the end, only if it is still its own. A holder whose refreshes
have failed for longer than ``stale_s`` (cut off from storage) stops its launch, as one whose
lease was taken over does: by then another launch may own the run. Its workers check the
lease themselves before every change they make to the run (storage/fence.py).

Every change is a compare-and-swap against the version that was read, so two launches can
never both believe they own the run:

- GCS: create with ``if_generation_match=0``; refresh, take over and delete with
  ``if_generation_match=<generation read>``. The server decides; one writer wins. (The test
  emulator, storage/emulator.py, enforces it on uploads and deletes; a release also reads the
  lease back first, so it deletes only a lease that looked like its own.)
- Local disk: create by hard-linking a fully written temp file to the lease name (atomic, never
  replaces, and a reader never sees a half-written lease). Replace and delete happen under an
  exclusive ``flock`` on ``{run}/.lease.lock``, after checking that the lease is still the
  version read; the only change made without the lock is that create, which needs the name to
  be free, and it becomes free only by a delete made under the lock. So between a locked
  check and the locked change nothing can move: of two takers of one stale lease, the second
  to get the lock finds a different version and loses. The kernel drops a flock when its
  process dies, so a killed job never leaves the lock held (the empty lock file stays; removing
  it could let two processes lock two different files). Each written lease has a fresh
  ``write_id``, so equal bytes mean the same version.

Staleness compares the writer's heartbeat with the reader's clock: hosts' clocks must agree to
well within ``stale_s`` (NTP does; the default is two minutes). The clock is injected so tests
never sleep.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

from storage.location import Location, join
from storage.marker import link_create_only

LEASE = ".lease.json"
LOCK = ".lease.lock"
FORMAT = 1


class LeaseError(Exception):
    """The run's lease cannot be taken. The message is for people (one line)."""


class LeaseHeld(LeaseError):
    def __init__(self, message: str, holder: Holder):
        super().__init__(message)
        self.holder = holder


class _Conflict(Exception):
    """The lease is no longer the version read (someone else changed or removed it)."""


@dataclass(frozen=True)
class Holder:
    launch_id: str
    host: str
    pid: int
    started_at: float  # seconds since the epoch, the holder's clock
    heartbeat: float
    write_id: str
    pid_ns: str = ""  # the holder's pid namespace ("pid:[4026531836]"): pids mean one thing within it

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        try:
            d = json.loads(raw)
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                return None
            return cls(str(d["launch_id"]), str(d["host"]), int(d["pid"]),
                       float(d["started_at"]), float(d["heartbeat"]), str(d["write_id"]),
                       str(d.get("pid_ns", "")))
        except (ValueError, TypeError, KeyError):
            return None

    def to_bytes(self) -> bytes:
        return json.dumps({"format": FORMAT, "launch_id": self.launch_id, "host": self.host,
                           "pid": self.pid, "started_at": self.started_at,
                           "started": _iso(self.started_at), "heartbeat": self.heartbeat,
                           "write_id": self.write_id, "pid_ns": self.pid_ns}, indent=2).encode()

    def describe(self, now: float) -> str:
        return (f"host {self.host}, pid {self.pid}, launch {self.launch_id[:12]}, since "
                f"{_iso(self.started_at)}, last heartbeat {max(0.0, now - self.heartbeat):.0f}s ago")


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, another user's
        return False
    return False


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class _LocalStore:
    """The lease file on local disk (see the module docstring for why this is safe)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LEASE)

    def read(self) -> tuple[bytes, object] | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        return raw, raw  # the version is the bytes: every write has a unique write_id

    def _write_temp(self, data: bytes) -> str:
        tmp = os.path.join(self.folder, f"{LEASE}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, data: bytes) -> object:
        os.makedirs(self.folder, exist_ok=True)
        tmp = self._write_temp(data)
        try:
            link_create_only(tmp, self.path)  # FileExistsError if a lease is there
        finally:
            os.unlink(tmp)
        return data

    @contextmanager
    def _locked(self):
        fd = os.open(os.path.join(self.folder, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # per open file: threads of one process exclude too
            yield
        finally:
            os.close(fd)  # drops the lock

    def replace(self, data: bytes, version: object) -> object:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                raise _Conflict()
            tmp = self._write_temp(data)
            try:
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        return data

    def delete(self, version: object) -> None:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                raise _Conflict()
            os.unlink(self.path)


@contextmanager
def _gcs_errors():
    """Storage failures as OSError, like local disk's, so callers handle one kind; 404 and 412
    pass through, each method turns them into its own answer. (A retried conditional request
    whose first try landed answers 412: the callers read the lease back and see.)"""
    from google.api_core.exceptions import GoogleAPIError, NotFound, PreconditionFailed

    try:
        yield
    except (NotFound, PreconditionFailed):
        raise
    except GoogleAPIError as e:
        raise OSError(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


class _GcsStore:
    """The lease object on GCS: every change is generation-matched, so the server decides."""

    TIMEOUT = 10  # seconds per request
    RETRY_S = 30  # all tries of one call: a job's exit must not wait minutes on a lost bucket

    def __init__(self, path: str):
        self.bucket, _, self.key = join(path, LEASE).partition("/")

    def _retry(self):
        from google.cloud.storage.retry import DEFAULT_RETRY

        # Safe to repeat: every request here is generation-matched (or a read).
        return DEFAULT_RETRY.with_timeout(self.RETRY_S)

    def _blob(self):
        from storage import gcs

        return gcs.client().bucket(self.bucket).blob(self.key)

    def read(self) -> tuple[bytes, object] | None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        from storage import gcs

        for _ in range(5):
            with _gcs_errors():
                blob = gcs.client().bucket(self.bucket).get_blob(
                    self.key, timeout=self.TIMEOUT, retry=self._retry())
                if blob is None:
                    return None
                try:  # the bytes of the generation just seen, or again if it changed meanwhile
                    return blob.download_as_bytes(if_generation_match=blob.generation,
                                                  timeout=self.TIMEOUT, retry=self._retry()), blob.generation
                except (NotFound, PreconditionFailed):
                    continue
        raise LeaseError(f"gs://{self.bucket}/{self.key} kept changing while being read; try again")

    def _upload(self, data: bytes, generation: int) -> object:
        from google.api_core.exceptions import PreconditionFailed

        blob = self._blob()
        try:
            with _gcs_errors():
                blob.upload_from_string(data, content_type="application/json",
                                        if_generation_match=generation, timeout=self.TIMEOUT,
                                        retry=self._retry())
        except PreconditionFailed:
            if generation == 0:
                raise FileExistsError(f"gs://{self.bucket}/{self.key}") from None
            raise _Conflict() from None
        return blob.generation

    def create(self, data: bytes) -> object:
        return self._upload(data, 0)

    def replace(self, data: bytes, version: object) -> object:
        return self._upload(data, int(version))

    def delete(self, version: object) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        try:
            with _gcs_errors():
                self._blob().delete(if_generation_match=int(version), timeout=self.TIMEOUT,
                                    retry=self._retry())
        except (NotFound, PreconditionFailed):
            raise _Conflict() from None


def _store(run: Location):
    if run.is_gcs:
        return _GcsStore(run.path)
    if run.is_local:
        return _LocalStore(run.path)
    raise LeaseError(f"{run.uri}: no lease for a {run.fs.type_name} filesystem (local or gs:// only)")


class Lease:
    """This launch's claim on one run. ``acquire()``, then ``start_heartbeat()``; ``release()``
    at the end. Not reentrant across processes by design: one launch, one driver."""

    def __init__(self, run: Location, launch_id: str, stale_s: float = 120.0,
                 heartbeat_s: float | None = None, clock: Callable[[], float] = time.time,
                 host: str | None = None, pid: int | None = None, log: Callable[[str], None] = print,
                 store=None):
        self.run = run
        self.launch_id = launch_id
        self.stale_s = stale_s
        # A few beats per stale window: one slow or failed refresh never makes the lease stale.
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(20.0, stale_s / 4)
        self.clock = clock
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.pid_ns = _pid_ns()
        self.log = log
        self.store = store if store is not None else _store(run)
        self.started_at = clock()
        self.lost: str | None = None  # why we no longer hold it, once that happens
        self._version: object = None
        self._mine: Holder | None = None
        self._mutex = threading.Lock()  # the heartbeat thread and release() never overlap
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._version is not None

    def _fresh_record(self) -> Holder:
        return Holder(self.launch_id, self.host, self.pid, self.started_at, self.clock(),
                      uuid.uuid4().hex, self.pid_ns)

    def _dead_here(self, holder: Holder) -> bool:
        """Whether the holder was a process of this host (and pid namespace) that is gone: a
        job killed with SIGKILL, whose lease need not go stale before a relaunch here."""
        return (bool(self.pid_ns) and holder.host == self.host and holder.pid_ns == self.pid_ns
                and _gone(holder.pid))

    def _held_message(self, holder: Holder) -> str:
        return (f"run {self.run.uri} is in use by another launch ({holder.describe(self.clock())}); "
                f"wait for it to finish or stop it, or start a new run with --run-name NEW. A lease "
                f"left by a killed job is taken over once its heartbeat is older than "
                f"checkpoint.lease_stale_s ({self.stale_s:g}s)")

    def acquire(self) -> Holder | None:
        """Take the run. Returns the stale holder taken over (None if the run was free).
        Raises LeaseHeld when another launch's lease is fresh; writes nothing then."""
        for _ in range(5):
            current = self.store.read()
            if current is None:
                record = self._fresh_record()
                try:
                    self._version = self.store.create(record.to_bytes())
                except FileExistsError:
                    continue  # another launch created it first: look at it
                self._mine = record
                return None
            raw, version = current
            holder = Holder.parse(raw)
            if holder is None:
                raise LeaseError(
                    f"run {self.run.uri}: the lease {join(self.run.uri, LEASE)} is unreadable; if "
                    "no other launch is using this run, delete that file and start again")
            if holder.launch_id == self.launch_id:  # our own create whose answer was lost
                self._version, self._mine = version, holder
                return None
            age = self.clock() - holder.heartbeat
            dead = self._dead_here(holder)
            if age <= self.stale_s and not dead:
                raise LeaseHeld(self._held_message(holder), holder)
            record = self._fresh_record()
            try:
                self._version = self.store.replace(record.to_bytes(), version)
            except _Conflict:
                continue  # another taker won, or the holder came back: look again
            self._mine = record
            if age <= self.stale_s:
                self.log(f"⚠️  Took over run {self.run.uri} from a launch whose process is gone "
                         f"({holder.describe(self.clock())}; this host): it was killed")
            else:
                self.log(f"⚠️  Took over run {self.run.uri} from a launch whose lease went stale "
                         f"({holder.describe(self.clock())}; stale after {self.stale_s:g}s): it "
                         "was killed or lost its storage")
            return holder
        current = self.store.read()
        holder = Holder.parse(current[0]) if current else None
        if holder is not None and holder.launch_id != self.launch_id:
            raise LeaseHeld(self._held_message(holder), holder)
        raise LeaseError(f"run {self.run.uri}: the lease kept changing while being taken; try again")

    def refresh(self) -> bool:
        """Write a new heartbeat if the lease is still ours. False (and self.lost) if not."""
        with self._mutex:
            if self._version is None:
                return False
            record = self._fresh_record()
            try:
                self._version = self.store.replace(record.to_bytes(), self._version)
                self._mine = record
                return True
            except _Conflict:
                pass
            current = self.store.read()  # a retried write whose first answer was lost is ours
            holder = Holder.parse(current[0]) if current else None
            if holder is not None and holder.write_id == record.write_id:
                self._version, self._mine = current[1], record
                return True
            self._version = None
            self.lost = (f"lost the lease on run {self.run.uri}: "
                         + (f"another launch took it over ({holder.describe(self.clock())})"
                            if holder else "it was removed") + " after this launch's heartbeat went stale")
            return False

    def release(self) -> bool:
        """Stop the heartbeat and delete the lease if it is still ours. Never raises for storage
        errors (the job's own outcome matters more); returns whether it was deleted."""
        self.stop_heartbeat()
        with self._mutex:
            if self._version is None:
                return False
            try:
                for _ in range(3):
                    # Look first (the version to delete is the one seen, and it must be ours),
                    # then delete that version only.
                    current = self.store.read()
                    holder = Holder.parse(current[0]) if current else None
                    if holder is None or holder.launch_id != self.launch_id:
                        return False  # not ours any more: leave it to its owner
                    try:
                        self.store.delete(current[1])
                        return True
                    except _Conflict:
                        continue
                return False
            except Exception as e:  # noqa: BLE001 - logged; a stale lease is taken over later
                self.log(f"⚠️  Could not release the lease on {self.run.uri}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}")
                return False
            finally:
                self._version = None

    def start_heartbeat(self, on_lost: Callable[[str], None] | None = None) -> None:
        """Refresh from a daemon thread every heartbeat_s. A failed refresh is logged and tried
        again; a lost lease calls on_lost(reason) once and ends the thread."""

        def beat() -> None:
            last_ok = self.clock()
            while not self._stop.wait(self.heartbeat_s):
                try:
                    ok = self.refresh()
                except Exception as e:  # noqa: BLE001 - storage hiccup: the next beat retries
                    failing = self.clock() - last_ok
                    if failing <= self.stale_s:
                        self.log(f"⚠️  Lease heartbeat on {self.run.uri} failed "
                                 f"({type(e).__name__}); retrying in {self.heartbeat_s:g}s")
                        continue
                    # Past stale_s another launch may take the run: stop before it does (the
                    # workers' fence already refuses to commit on a lease this old).
                    with self._mutex:
                        self._version = None
                        self.lost = (f"could not refresh the lease on run {self.run.uri} for "
                                     f"{failing:.0f}s (checkpoint.lease_stale_s = {self.stale_s:g}s; "
                                     f"last error {type(e).__name__}), so another launch may take the run over")
                    ok = False
                if ok:
                    last_ok = self.clock()
                if not ok:
                    if on_lost is not None and self.lost:
                        on_lost(self.lost)
                    return

        self._stop.clear()
        self._thread = threading.Thread(target=beat, name="run-lease-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.heartbeat_s + 15)
        self._thread = None

