"""A --resume checkpoint's pickled files, checked on the driver before Ray starts: one that would
run code when loaded (a bucket someone else can write, its manifest signed again over the
poisoned files, so every size and hash checks out) is refused here, exit 2 and one line, and
nothing of it runs; the workers' loaders refuse it as well (trainers/checkpointer.py).

    strategy  unpickled on load                     checked here
    ddp       optimizer.pt, scheduler_state.pt,     every *.pt: torch.load(weights_only=True,
              rng_state_rank{r}.pt                  map_location="meta"), the pickle through
                                                    torch's allow-list, no tensor data read
    fsdp      .metadata, DCP's non-tensor items     trainers/sharded.py's vet: the allow-listed
                                                    unpickler, weights_only for each bytes item

What this costs: a *.pt file is read by range, the same way local or gs://: its zip index,
its pickle and one record header (about 6 KB in 20 reads for a 32 MB optimizer state; a
file under SMALL bytes in one read), the files in parallel. The tensors are never read, so a
large optimizer state costs no more than a small one, and a file saved from GPU tensors is
checked on a CPU-only driver.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

from ray_job.errors import UserError
from storage.location import Location, join

SMALL = 1 << 20  # bytes: a smaller *.pt is read in one request
FIX = "nothing of it was run. Resume from a checkpoint this service wrote"


def checkpoint(arg: str, loc: Location, metadata: dict) -> None:
    """Refuse (UserError) a checkpoint whose pickled files are not plain data."""
    if metadata.get("strategy") == "fsdp":
        _sharded(arg, loc, metadata)
    else:
        _whole(arg, loc, metadata)


def _whole(arg: str, loc: Location, metadata: dict) -> None:
    files = metadata["files"]
    torch_files = sorted(rel for rel in files if rel.endswith(".pt"))
    with ThreadPoolExecutor(16) as pool:
        problems = list(pool.map(lambda rel: _torch_problem(loc, rel, files[rel]["size"]), torch_files))
    for rel, problem in zip(torch_files, problems):
        if isinstance(problem, _Unread):
            raise UserError(f"--resume {arg}: {rel} of {loc.uri} could not be read to be checked "
                            f"({problem.reason}); check the storage and try again")
        if problem is not None:
            raise UserError(f"--resume {arg}: checkpoint {loc.uri} is refused ({rel} does not load as "
                            f"plain data: {problem}); {FIX}")


class _Unread:
    def __init__(self, e: BaseException):
        self.reason = _reason(e)


def _torch_problem(loc: Location, rel: str, size: int) -> str | _Unread | None:
    """Why torch.load(weights_only=True) refuses this file (None: it loads; _Unread: the storage
    failed), its tensors never read."""
    import torch

    try:
        with loc.fs.open_input_file(join(loc.path, rel)) as f:
            raw = _Ranged(f, size)
            source = io.BytesIO(f.read()) if size <= SMALL else io.BufferedReader(raw, 64 << 10)
            try:
                torch.load(source, weights_only=True, map_location="meta")
            except Exception as e:  # hashes were verified: whatever fails here was signed that way
                return _Unread(raw.error) if raw.error is not None else _reason(e)
    except Exception as e:  # opening or reading a small file: the storage, not the file
        return _Unread(e)
    return None


class _Ranged(io.RawIOBase):
    """A storage file read by range, never past its end (GCS answers 416 to a read at the end,
    where torch's zip reader expects an empty one); a storage error is kept (torch rewraps it)."""

    def __init__(self, f, size: int):
        self.f, self.size, self.pos, self.error = f, size, 0, None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.size - self.pos))
        if n:
            try:
                buf[:n] = self.f.read_at(n, self.pos)
            except Exception as e:
                self.error = e
                raise
            self.pos += n
        return n


def _reason(e: Exception) -> str:
    """The line that says why: torch's weights-only refusal puts it after a paragraph of advice."""
    paragraphs = [p.strip() for p in str(e).split("\n\n") if p.strip()]
    if len(paragraphs) > 1 and paragraphs[0].startswith("Weights only load failed"):
        paragraphs = paragraphs[1:]
    first = paragraphs[0].splitlines()[0] if paragraphs else ""
    return f"{type(e).__name__}: {first}"


def _sharded(arg: str, loc: Location, metadata: dict) -> None:
    """A sharded checkpoint's DCP index and non-tensor items (trainers/sharded.py's vet)."""
    from trainers import sharded

    def read(rel: str, offset: int, length: int) -> bytes:
        with loc.fs.open_input_file(join(loc.path, rel)) as f:
            return f.read_at(length, offset)

    try:
        with loc.fs.open_input_stream(join(loc.path, sharded.DCP_METADATA)) as f:
            sharded.vet(f, set(metadata["files"]), read)
    except sharded.UnsafeCheckpoint as e:
        raise UserError(f"--resume {arg}: checkpoint {loc.uri} is refused ({e}); {FIX}") from None
