"""What a checkpoint holds and how a worker saves and restores it.

    ======================  ===========================================  ==================
    file                    what                                         loaded with
    ======================  ===========================================  ==================
    model.safetensors       model weights (unwrapped)                    safetensors
    optimizer.pt            AdamW state                                  torch weights_only
    scheduler_state.pt      LR scheduler state                           torch weights_only
    rng_state_rank{r}.pt    torch / numpy / python RNG of rank r         torch weights_only
    training_metrics.json   loss, LR and validation histories, resumes   json
    metadata.json           progress, data cursor, config, manifest      json (written last)
    ======================  ===========================================  ==================

Nothing is unpickled on load: a checkpoint from a stranger cannot run code.
"""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from storage import checkpoint as ckpt
from trainers.state import TrainState


def capture_rng() -> bytes:
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached": float(np_cached)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def restore_rng(path: str) -> None:
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def save_local(folder: str, model: torch.nn.Module, optimizer, scheduler, rng_states: list[bytes],
               state: TrainState, metadata: dict) -> dict:
    """Write every data file of a checkpoint into folder; return the metadata to commit.

    Hashing the files and writing metadata.json (``storage.checkpoint.write_metadata``) is left
    to the caller: the upload runs it in the background, so training waits only for the
    serialization (a third of a sync stall at ~150 MB, measured in benchmarks/).
    """
    os.makedirs(folder, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(folder, ckpt.MODEL))
    torch.save(optimizer.state_dict(), os.path.join(folder, ckpt.OPTIMIZER))
    torch.save(scheduler.state_dict(), os.path.join(folder, ckpt.SCHEDULER))
    for rank, blob in enumerate(rng_states):
        with open(os.path.join(folder, ckpt.rng_file(rank)), "wb") as f:
            f.write(blob)
    with open(os.path.join(folder, ckpt.METRICS), "w") as f:
        json.dump(state.metrics_dict(), f)
    return {**metadata, **state.progress_dict()}


def load_model(folder: str, model: torch.nn.Module) -> None:
    model.load_state_dict(load_file(os.path.join(folder, ckpt.MODEL)))


def load_optimizer(folder: str, optimizer) -> None:
    optimizer.load_state_dict(torch.load(os.path.join(folder, ckpt.OPTIMIZER), weights_only=True))


def load_scheduler(folder: str, scheduler) -> None:
    scheduler.load_state_dict(torch.load(os.path.join(folder, ckpt.SCHEDULER), weights_only=True))


def load_metrics(folder: str) -> dict:
    with open(os.path.join(folder, ckpt.METRICS)) as f:
        return json.load(f)


def load_metadata(folder: str) -> dict:
    with open(os.path.join(folder, ckpt.METADATA)) as f:
        return json.load(f)
