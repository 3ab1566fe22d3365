"""Which train files a run trains on, and what identifies them wherever the dataset lives.

The index is listed once, at a fresh run's start, and kept in every checkpoint (metadata.json
"data_index"): names relative to the data path, row counts, sizes and a parquet-footer
fingerprint; a resume finds the same files under its own data.path (data/checks.py). The
validation files are read whole (read_all).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.location import join


@dataclass(frozen=True)
class DataIndex:
    """The train files in canonical (sorted) order: where they are now (files, on the data
    path's filesystem), their row counts, and what identifies them wherever the dataset lives:
    the name relative to the data path, the size and a fingerprint (sha256 of the parquet
    footer: row groups, row counts and column statistics; one small read, local or gs://)."""

    files: tuple[str, ...]
    rows: tuple[int, ...]
    names: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()
    footers: tuple[str, ...] = ()

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    def to_json(self) -> dict:
        """metadata.json's data_index: relative names, never where the data was (a resume
        finds them under its own data.path)."""
        return {"files": list(self.names or self.files), "rows": list(self.rows), "sizes": list(self.sizes),
                "footers": list(self.footers)}

    @classmethod
    def from_json(cls, data: dict, root: str | None = None) -> DataIndex:
        """The index of a checkpoint, its names resolved under root (the data path as a
        pyarrow path); without root the names are taken as they are."""
        names = tuple(data["files"])
        files = tuple(join(root, n) for n in names) if root is not None else names
        return cls(files, tuple(int(r) for r in data["rows"]), names,
                   tuple(int(x) for x in data.get("sizes", ())), tuple(data.get("footers", ())))


def footer_digest(handle) -> str:
    """sha256 of an open parquet file's footer (its row groups, row counts and column statistics),
    from its last bytes alone."""
    import hashlib
    import struct

    size = handle.size()
    tail = handle.read_at(8, size - 8) if size >= 12 else b""
    if len(tail) != 8 or tail[4:] != b"PAR1":
        raise ValueError("not a parquet file (no footer)")
    length = struct.unpack("<I", tail[:4])[0]
    return hashlib.sha256(handle.read_at(length, size - 8 - length)).hexdigest()


def footer_fingerprint(fs: pafs.FileSystem, path: str) -> tuple[int, str, int]:
    """(size, footer sha256, rows): what identifies a train file, from its last bytes."""
    with fs.open_input_file(path) as f:
        try:
            digest = footer_digest(f)
        except ValueError:
            raise ValueError(f"{path} is not a parquet file (no footer)") from None
        return f.size(), digest, pq.ParquetFile(f).metadata.num_rows


def build_index(fs: pafs.FileSystem, data_path: str) -> DataIndex:
    """List {data_path}/train/*.parquet and read each footer (row count, size, fingerprint; no
    data read)."""
    selector = pafs.FileSelector(join(data_path, "train"), recursive=False)
    paths = sorted(i.path for i in fs.get_file_info(selector) if i.path.endswith(".parquet"))
    prints = [footer_fingerprint(fs, path) for path in paths]
    root = data_path.rstrip("/") + "/"
    return DataIndex(tuple(paths), tuple(r for _, _, r in prints), tuple(p[len(root):] for p in paths),
                     tuple(size for size, _, _ in prints), tuple(h for _, h, _ in prints))


def read_all(fs: pafs.FileSystem, folder: str, dtype: str = "uint8") -> tuple[np.ndarray, np.ndarray]:
    """Every row of every parquet file in folder (validation data): (ids, tokens uint8).

    The files are listed here, not by pyarrow's dataset discovery, which would recurse and skip
    names starting with '_' or '.': only folder/*.parquet, in sorted order, all of them."""
    selector = pafs.FileSelector(folder, recursive=False)
    paths = sorted(i.path for i in fs.get_file_info(selector) if i.path.endswith(".parquet"))
    table = pq.read_table(paths, filesystem=fs, columns=["id", "tokens"], partitioning=None)
    tokens = table.column("tokens").to_pylist()
    arr = np.frombuffer(b"".join(tokens), dtype=np.dtype(dtype).newbyteorder("<")).reshape(len(tokens), -1)
    return table.column("id").to_numpy(), arr
