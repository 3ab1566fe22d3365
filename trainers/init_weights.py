"""--init-from on the workers: a fresh run's weights from a safetensors file (names and shapes
checked on the driver: ray_job/init_from.py), before the first step; the optimizer and the
schedule stay fresh.

Rank 0 alone reads the file (fetched first when it is on gs://) and checks its sha256 against
the driver's; DCP's set_model_state_dict broadcasts it from rank 0 (broadcast_from_rank0), and
each rank keeps what it holds: the whole model under ddp (before Accelerate wraps it), its own
shards under fsdp, so no rank but 0 ever holds a full copy. Tensors are cast to the model's
dtypes (a bf16 export loads into fp32 weights).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time

import torch

from storage.location import resolve
from trainers.launch_plan import InitFrom


class InitFileChanged(RuntimeError):
    """The file is not the one the driver checked."""


def load(init: InitFrom, model: torch.nn.Module, rank: int, say) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    started = time.time()
    full: dict[str, torch.Tensor] = {}
    if rank == 0:
        full = _read(init, {k: v.dtype for k, v in model.state_dict().items()})
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    say(f"🔁 Initialized the weights from {init.uri} (sha256 {init.sha256[:12]}, {init.size / 2**20:.1f} MB) "
        f"in {time.time() - started:.1f}s: a fresh optimizer and schedule")


def _read(init: InitFrom, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    loc = resolve(init.uri)
    scratch = None
    try:
        if loc.is_local:
            path = loc.path
        else:
            scratch = tempfile.mkdtemp(prefix="init-from-")
            path = os.path.join(scratch, "model.safetensors")
            with loc.fs.open_input_stream(loc.path) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
        if digest.hexdigest() != init.sha256:
            raise InitFileChanged(f"--init-from {init.uri}: its sha256 is {digest.hexdigest()}, the driver "
                                  f"checked {init.sha256}: the file changed since; launch again")
        weights = load_file(path)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return {k: v.to(dtypes[k]) for k, v in weights.items()}
