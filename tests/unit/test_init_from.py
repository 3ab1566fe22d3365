"""--init-from: the driver reads only the safetensors header and refuses the first name or shape
that is not the model's (exit 2, before Ray, nothing written); on the workers rank 0 reads the
file and the weights reach the model whole (ddp) or as shards (fsdp: a gloo group of one here;
2 workers in tests/integration/test_init_from_export.py), cast to the model's dtypes; a file
changed after the driver hashed it is refused."""

from __future__ import annotations

import contextlib
import hashlib
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from configs import load, with_overrides
from ray_job import init_from, train
from ray_job.errors import UserError
from trainers import init_weights, sharded
from trainers.launch_plan import InitFrom
from trainers.model import build_model


@pytest.fixture
def weights(tmp_path):
    """A model.safetensors of the test model, with weights unlike a fresh init's."""
    torch.manual_seed(7)
    state = {k: torch.randn_like(v) for k, v in build_model(load("test").model).state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    return path, state


def _bad(tmp_path, state, change):
    state = dict(state)
    change(state)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    return str(path)


def test_a_matching_file_is_accepted_with_its_sha256(weights):
    path, _ = weights
    got = init_from.check(str(path), load("test"))
    assert got.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert got.size == path.stat().st_size and got.uri.endswith("model.safetensors")


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("blocks.1.mlp.2.bias"), "no tensor 'blocks.1.mlp.2.bias' (shape [64]) there"),
    (lambda s: s.__setitem__("head.weight", torch.zeros(300, 64)),
     "'head.weight' has shape [300, 64] there, the model's is [256, 64]"),
    (lambda s: s.__setitem__("lm_head.weight", torch.zeros(2)),
     "holds 'lm_head.weight', which the model does not have"),
])
def test_the_first_mismatch_is_named(tmp_path, weights, change, message):
    with pytest.raises(UserError) as e:
        init_from.check(_bad(tmp_path, weights[1], change), load("test"))
    assert message in str(e.value)


def test_only_the_header_is_read(tmp_path, weights, monkeypatch):
    """A file whose tensor bytes are cut off still passes the name/shape check: they are not read."""
    path, _ = weights
    cut = tmp_path / "cut.safetensors"
    raw = path.read_bytes()
    cut.write_bytes(raw[: 8 + int.from_bytes(raw[:8], "little")])
    assert init_from.check(str(cut), load("test"), hash_it=False).sha256 == ""


@pytest.mark.parametrize("content, message", [(b"not a safetensors file at all", "not a safetensors file"),
                                              (None, "no such file")])
def test_not_a_safetensors_file(tmp_path, content, message):
    path = tmp_path / "x.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        init_from.check(str(path), load("test"))
    assert message in str(e.value)


def test_train_refuses_a_wrong_shape_before_ray_exit_2_nothing_written(tmp_path, weights, capsys):
    bad = _bad(tmp_path, weights[1], lambda s: s.__setitem__("tok.weight", torch.zeros(256, 32)))
    storage, data = tmp_path / "runs", tmp_path / "data"
    code = train.main(["--config", "test", "--storage", str(storage), "--set", f"data.path={data}",
                       "--init-from", bad])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: --init-from {bad}: 'tok.weight' has shape [256, 32] there, the model's is [256, 64]")
    assert not storage.exists() and not data.exists()


@contextlib.contextmanager
def _group():
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loaded_weights_are_the_files(tmp_path, weights, strategy, dtype):
    path, state = weights
    if dtype != torch.float32:
        path = tmp_path / "bf16.safetensors"
        save_file({k: v.to(dtype) for k, v in state.items()}, str(path))
    init = InitFrom(uri=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(), size=os.path.getsize(path))
    cfg = with_overrides(load("test"), {"train": {"strategy": strategy}})
    lines = []
    with _group():
        model = build_model(cfg.model)
        if strategy == "fsdp":
            model, _ = sharded.shard(model)
        init_weights.load(init, model, 0, lines.append)
        got = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
    assert got.keys() == state.keys()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], state[k].to(dtype).float()) for k in state)
    assert lines[0].startswith(f"🔁 Initialized the weights from {path} (sha256 {init.sha256[:12]}")


def test_a_file_changed_after_the_driver_checked_it_is_refused(weights):
    path, _ = weights
    init = InitFrom(uri=str(path), sha256="0" * 64, size=os.path.getsize(path))
    with _group(), pytest.raises(init_weights.InitFileChanged, match="the file changed since"):
        init_weights.load(init, build_model(load("test").model), 0, print)
