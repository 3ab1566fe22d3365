"""A stranger's checkpoint runs no code (trainers/checkpointer.py's claim): an optimizer.pt and
an RNG file that would run a command when unpickled, in a checkpoint whose manifest was signed
again over them (so every size and hash checks out), are refused by the loader, and the command
never runs. The same files, not poisoned, load: the refusal is the payload's, not the format's."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from test_checkpoint_files import realistic_meta

from storage import manifest
from storage.location import resolve
from trainers import checkpointer


class RunsACommand:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _signed_checkpoint(folder, optimizer_bytes: bytes, rng_bytes: bytes) -> dict:
    """A ddp checkpoint folder with these two files, the manifest signed over them."""
    os.makedirs(folder)
    model, optimizer = _model_and_optimizer()
    save_file(model.state_dict(), os.path.join(folder, manifest.MODEL))
    files = {manifest.OPTIMIZER: optimizer_bytes, manifest.rng_file(0): rng_bytes,
             manifest.SCHEDULER: b"", manifest.METRICS: b"{}"}
    for rel, data in files.items():
        with open(os.path.join(folder, rel), "wb") as f:
            f.write(data)
    meta = manifest.write_metadata(str(folder), realistic_meta(os.path.basename(str(folder)), world_size=1))
    result = manifest.check(resolve(str(folder)), verify_hashes=True)
    assert result.ok, result.reason  # sizes and hashes all check out: only the loader stands guard
    return meta


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("poisoned", ["optimizer", "rng"])
def test_a_poisoned_file_under_a_signed_manifest_is_refused_and_runs_nothing(tmp_path, poisoned):
    marker = tmp_path / "the-command-ran"
    _, optimizer = _model_and_optimizer()
    good_optimizer, good_rng = _bytes(optimizer.state_dict()), checkpointer._capture_rng()
    payload = _bytes({"state": {}, "param_groups": RunsACommand(str(marker))})
    folder = tmp_path / "checkpoint-epoch0-step8-files2"
    meta = _signed_checkpoint(folder, payload if poisoned == "optimizer" else good_optimizer,
                              payload if poisoned == "rng" else good_rng)
    model, optimizer = _model_and_optimizer()
    with pytest.raises(pickle.UnpicklingError):
        if poisoned == "optimizer":
            checkpointer.load_model_and_optimizer(model, optimizer, False, str(folder), meta)
        else:
            checkpointer._restore_rng(os.path.join(folder, manifest.rng_file(0)))
    assert not marker.exists(), "the checkpoint ran a command"


def test_the_same_files_not_poisoned_load(tmp_path):
    _, optimizer = _model_and_optimizer()
    folder = tmp_path / "checkpoint-epoch0-step8-files2"
    meta = _signed_checkpoint(folder, _bytes(optimizer.state_dict()), checkpointer._capture_rng())
    model, optimizer = _model_and_optimizer()
    checkpointer.load_model_and_optimizer(model, optimizer, False, str(folder), meta)
    checkpointer._restore_rng(os.path.join(folder, manifest.rng_file(0)))
    assert optimizer.state_dict()["state"][0]["step"] == 1
