"""--init-from PATH_OR_URI, checked on the driver before Ray: a safetensors file (a
`checkpoints export`, or any file whose tensor names and shapes are the model's) that a fresh
run starts from, with a fresh optimizer and schedule (trainers/init_weights.py loads it).

Only the file's header is read here (8 bytes of length, then its JSON index of names, dtypes
and shapes), never its tensors; the model's names and shapes come from building it on the meta
device. The first mismatch is refused, named (exit 2). The file's sha256 goes into the plan and
every checkpoint's metadata.json, and rank 0 checks it again before loading.
"""

from __future__ import annotations

import hashlib
import json
import struct

import pyarrow.fs as pafs

from configs.schema import Config
from ray_job.errors import UserError
from storage.location import StorageUnreachable, probe, resolve
from trainers.launch_plan import InitFrom

MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class Unreachable(UserError):
    """The file's bucket cannot be reached from here (the launch plan shows it as not checked)."""


def check(arg: str, cfg: Config, hash_it: bool = True) -> InitFrom:
    """The file at arg, its names and shapes checked against cfg's model; hashed unless not
    hash_it (the launch plan: nothing of size is read)."""
    try:
        loc = resolve(arg)
    except ValueError as e:
        raise UserError(f"--init-from {arg}: {e}") from None
    if loc.is_gcs:
        try:
            probe(loc)
        except StorageUnreachable as e:
            raise Unreachable(f"--init-from {e}") from None
    info = loc.fs.get_file_info(loc.path)
    if info.type != pafs.FileType.File:
        raise UserError(f"--init-from {arg}: no such file; give a model.safetensors (from `python -m "
                        "ray_job.checkpoints export`) or a safetensors file of this model's weights")
    theirs = read_header(loc, arg)
    ours = model_shapes(cfg)
    for name, shape in ours.items():
        if name not in theirs:
            raise UserError(f"--init-from {arg}: no tensor {name!r} (shape {list(shape)}) there; the file "
                            f"must hold every weight of model.factory {cfg.model.factory} by its name")
        if tuple(theirs[name]) != shape:
            raise UserError(f"--init-from {arg}: {name!r} has shape {list(theirs[name])} there, the model's "
                            f"is {list(shape)}; use a file made for this model.* config")
    extra = [n for n in theirs if n not in ours]
    if extra:
        raise UserError(f"--init-from {arg}: holds {extra[0]!r}, which the model does not have "
                        f"({len(extra)} such tensor(s)); use a file made for this model")
    return InitFrom(uri=loc.uri, sha256=sha256(loc) if hash_it else "", size=info.size)


def read_header(loc, arg: str) -> dict[str, list[int]]:
    """Tensor name -> shape, from the safetensors header alone."""
    try:
        with loc.fs.open_input_file(loc.path) as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 2 <= n <= MAX_HEADER:
                raise ValueError("no safetensors header")
            header = json.loads(f.read(n))
        return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
        raise UserError(f"--init-from {arg}: not a safetensors file ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise UserError(f"--init-from {arg}: cannot read it ({str(e).splitlines()[0][:200]})") from None


def model_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """The model's state dict names and shapes, from a build on the meta device (no memory)."""
    import torch

    from trainers.model import build_model

    with torch.device("meta"):
        model = build_model(cfg.model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def sha256(loc) -> str:
    from tqdm import tqdm

    digest = hashlib.sha256()
    size = loc.fs.get_file_info(loc.path).size
    with loc.fs.open_input_stream(loc.path) as f, tqdm(total=size, unit="B", unit_scale=True,
                                                        desc="sha256 --init-from", leave=False,
                                                        disable=size < 256 << 20) as bar:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()
