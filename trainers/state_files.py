"""What a checkpoint holds on disk, and how each part is written and loaded back.

One mapping of stateful parts (as torchtitan's CheckpointManager). The strategy
(trainers/parallel.py) decides how the model and optimizer are written, not what a checkpoint is:

    ======================  ===========================================  ==================
    file                    what                                         loaded with
    ======================  ===========================================  ==================
    model.safetensors       ddp: model weights (rank 0 writes)           safetensors
    optimizer.pt            ddp: AdamW state (rank 0 writes)             torch weights_only
    .metadata               fsdp: DCP's index of every rank's shards     allow-listed unpickler
    __{r}_0.distcp          fsdp: rank r's shards of model and AdamW     torch weights_only
    scheduler_state.pt      LR scheduler state                           torch weights_only
    rng_state_rank{r}.pt    torch / numpy / python RNG of rank r         torch weights_only
    training_metrics.json   loss, LR and validation histories, resumes   json
    metadata.json           progress, data cursor, config, manifest      json (written last)
    ======================  ===========================================  ==================

Nothing is unpickled on load: a checkpoint from a stranger cannot run code. The file names are
storage/manifest.py's: its completeness check requires every file loaded here.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from storage import manifest
from trainers import sharded


class Full:
    """ddp: rank 0 writes the whole model (safetensors) and optimizer (torch.save of tensors
    and numbers), index-keyed as AdamW's own state_dict."""

    writers = frozenset([0])

    def __init__(self, model, optimizer, group):
        self.model, self.optimizer = model, optimizer

    def stage(self, fresh: bool = False) -> dict:
        return {"model": _cpu_copy(self.model.state_dict()), "optim": _cpu_copy(self.optimizer.state_dict())}

    def write(self, staged: dict, folder: str) -> None:
        save_file({k: v.contiguous() for k, v in staged["model"].items()}, os.path.join(folder, manifest.MODEL))
        torch.save(staged["optim"], os.path.join(folder, manifest.OPTIMIZER))


class Sharded:
    """fsdp: every rank writes its own shards of model and AdamW state through DCP, keyed by
    parameter name; rank 0 adds .metadata after every rank's data."""

    def __init__(self, model, optimizer, group):
        self.model, self.optimizer, self.group = model, optimizer, group
        self.writers = frozenset(range(dist.get_world_size()))
        self.stager = sharded.Stager()

    def stage(self, fresh: bool = False) -> dict:
        """fresh: into new buffers, the reused ones being still written (a stop's last save)."""
        msd, osd = get_state_dict(self.model, self.optimizer)
        return (sharded.Stager() if fresh else self.stager).stage({"model": msd, "optim": osd})

    def write(self, staged: dict, folder: str) -> None:
        sharded.save(staged, folder, self.group)  # collective over self.group: every rank at once


def _cpu_copy(tree):
    """tree with every tensor copied to CPU memory, containers as they were (AdamW's betas stay
    a tuple: torch.save keeps what load_state_dict gets back)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu_copy(v) for v in tree)
    return tree


def _by_name(optim_state: dict, names: list[str]) -> dict:
    """An optimizer state_dict keyed by parameter index (optimizer.pt) -> keyed by parameter name
    (what set_state_dict takes): index i is the i-th of model.named_parameters()."""
    return {"state": {names[i]: s for i, s in optim_state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]]}


def load_model_and_optimizer(model, optimizer, into_shards: bool, folder: str, metadata: dict,
                             fetch_shards: Callable[[list[str]], None] | None = None) -> None:
    """A checkpoint's model and optimizer state into this run's, whichever strategy wrote it: a
    sharded one through DCP (it reshards to this world size, and to plain tensors alike); a
    whole one directly (ddp) or spread over the shards (fsdp: each rank keeps its part)."""
    tuples = [{k for k, v in g.items() if isinstance(v, tuple)} for g in optimizer.param_groups]
    if metadata.get("strategy", "ddp") == "fsdp":
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        try:
            sharded.load(state, folder, allowed=set(metadata["files"]), before_read=fetch_shards)
        except sharded.UnsafeCheckpoint as e:
            raise manifest.CheckpointError(f"checkpoint {metadata.get('name')} refused: {e}; nothing of it "
                                           "was run") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        weights = load_file(os.path.join(folder, manifest.MODEL))
        optim = torch.load(os.path.join(folder, manifest.OPTIMIZER), weights_only=True)
        if not into_shards:
            model.load_state_dict(weights)
            optimizer.load_state_dict(optim)
            return
        names = [n for n, _ in model.named_parameters()]  # FSDP2 keeps the parameter names
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=_by_name(optim, names),
                       options=StateDictOptions(full_state_dict=True))
    for group, keys in zip(optimizer.param_groups, tuples):  # set_state_dict gives betas back as a list
        group.update({k: tuple(group[k]) for k in keys if isinstance(group.get(k), list)})



def tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree.to_local() if hasattr(tree, "to_local") else tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from tensors(v)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


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


def seed_rank(seed: int, rank: int) -> None:
    """Each rank's own dropout stream (the model's init is seeded identically on every rank)."""
    torch.manual_seed(seed * 1000 + rank + 1)
    np.random.seed((seed * 1000 + rank + 1) % 2**32)
