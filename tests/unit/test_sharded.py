"""Sharded state without Ray (trainers/sharded.py, trainers/checkpointer.py's formats and loader):
the state right after loading equals the saved state exactly, at another world size (2 -> 1,
1 -> 2) and across strategies (fsdp -> ddp, ddp -> fsdp); export gives the gathered weights; a
poisoned DCP index or bytes item runs no code and is refused, where stock DCP runs it.

World-1 steps run in this process (a gloo group on a file store, torn down after); the world-2
steps in one torch.multiprocessing job of two processes."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from configs.schema import ModelSection
from storage import manifest
from trainers import checkpointer, sharded
from trainers.model import GPT, Block

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # no_dist on purpose


# --- what gets sharded ---------------------------------------------------------------------------

class TwoLists(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
        inner = torch.nn.ModuleList([torch.nn.ReLU()])
        self.dec = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(4, 4), inner)])
        self.head = torch.nn.Linear(4, 2)


def test_blocks_are_module_list_children_or_the_named_classes():
    gpt = GPT(ModelSection())
    assert sharded.blocks_to_shard(gpt) == list(gpt.blocks)
    assert sharded.blocks_to_shard(gpt, ("Block",)) == list(gpt.blocks)
    assert all(isinstance(b, Block) for b in sharded.blocks_to_shard(gpt))
    assert sharded.blocks_to_shard(gpt, ("LayerNorm",)) == [gpt.blocks[0].ln1, gpt.blocks[0].ln2,
                                                             gpt.blocks[1].ln1, gpt.blocks[1].ln2, gpt.ln_f]
    m = TwoLists()
    # outermost only: the ReLU inside dec[0]'s own ModuleList is inside a chosen block already
    assert sharded.blocks_to_shard(m) == [m.enc[0], m.enc[1], m.dec[0]]
    assert sharded.blocks_to_shard(torch.nn.Linear(2, 2)) == []  # no blocks: the root alone


# --- exact state across world sizes and strategies ---------------------------------------------------

def _model(seed: int, into_shards: bool):
    torch.manual_seed(seed)
    model = GPT(ModelSection(d_model=32, n_head=2, dropout=0.0))
    if into_shards:
        model, _ = sharded.shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _train_and_save(folder: str, into_shards: bool) -> None:
    """Two AdamW steps, then a checkpoint as the service writes it (stage, write, manifest) and
    the gathered full state beside it (full.pt) to compare with."""
    model, opt = _model(0, into_shards)
    torch.manual_seed(1 + dist.get_rank())
    for _ in range(2):
        x = torch.randint(0, 256, (2, 17))
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    fmt = (checkpointer._Sharded if into_shards else checkpointer._Full)(model, opt, sharded.new_group())
    if dist.get_rank() in fmt.writers:
        fmt.write(fmt.stage(), folder)
    full = get_state_dict(model, opt, options=FULL)
    dist.barrier()
    if dist.get_rank() == 0:
        torch.save({"model": full[0], "optim": full[1]}, folder + ".full.pt")
        strategy = "fsdp" if into_shards else "ddp"
        manifest.write_metadata(folder, {"name": os.path.basename(folder), "strategy": strategy})


def _load_and_gather(folder: str, into_shards: bool, out: str) -> None:
    """A fresh model (another seed, another LR) loads the checkpoint; its gathered state goes to out."""
    model, opt = _model(7, into_shards)
    with open(os.path.join(folder, manifest.METADATA)) as f:
        meta = json.load(f)
    checkpointer.load_model_and_optimizer(model, opt, into_shards, folder, meta)
    full = get_state_dict(model, opt, options=FULL)
    if dist.get_rank() == 0:
        torch.save({"model": full[0], "optim": full[1]}, out)


def _group(store: str, rank: int, world: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _world2(rank: int, root: str) -> None:
    _group(os.path.join(root, "store2"), rank, 2)
    try:
        _train_and_save(os.path.join(root, "fsdp@2"), into_shards=True)
        _load_and_gather(os.path.join(root, "fsdp@1"), True, os.path.join(root, "fsdp@1-into-fsdp@2.pt"))
        _load_and_gather(os.path.join(root, "ddp@1"), True, os.path.join(root, "ddp@1-into-fsdp@2.pt"))
    finally:
        dist.destroy_process_group()


def _in_process(root: str, name: str, step) -> None:
    _group(os.path.join(root, f"store-{name}"), 0, 1)
    try:
        step()
    finally:
        dist.destroy_process_group()


def _same(a: dict, b: dict) -> int:
    """Model tensors, every optimizer state tensor and param_groups bitwise equal; returns the
    number of tensors compared."""
    assert a["model"].keys() == b["model"].keys()
    n = 0
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        n += 1
    assert a["optim"]["state"].keys() == b["optim"]["state"].keys()
    for k, fields in a["optim"]["state"].items():
        for f, v in fields.items():
            assert torch.equal(v, b["optim"]["state"][k][f]), (k, f)
            n += 1
    ga, gb = a["optim"]["param_groups"], b["optim"]["param_groups"]
    assert len(ga) == len(gb)
    for x, y in zip(ga, gb):
        assert {k: (x.get(k), y.get(k)) for k in x.keys() | y.keys() if x.get(k) != y.get(k)} == {}
    return n


@pytest.mark.slow
def test_state_after_loading_equals_saved_state_across_world_sizes_and_strategies(tmp_path):
    root = str(tmp_path)
    for name, shards in (("fsdp@1", True), ("ddp@1", False)):
        folder = os.path.join(root, name)
        os.makedirs(folder)
        _in_process(root, f"save-{name}", lambda f=folder, s=shards: _train_and_save(f, s))
    os.makedirs(os.path.join(root, "fsdp@2"))
    mp.spawn(_world2, args=(root,), nprocs=2)
    for name, into, out in (("fsdp@2", True, "fsdp@2-into-fsdp@1.pt"), ("fsdp@2", False, "fsdp@2-into-ddp@1.pt")):
        _in_process(root, out, lambda n=name, i=into, o=out: _load_and_gather(
            os.path.join(root, n), i, os.path.join(root, o)))

    def saved(name):
        return torch.load(os.path.join(root, name + ".full.pt"), weights_only=True)

    def loaded(name):
        return torch.load(os.path.join(root, name), weights_only=True)

    assert _same(saved("fsdp@2"), loaded("fsdp@2-into-fsdp@1.pt")) == 29 + 3 * 29  # 2 -> 1
    assert _same(saved("fsdp@1"), loaded("fsdp@1-into-fsdp@2.pt")) > 29  # 1 -> 2
    assert _same(saved("fsdp@2"), loaded("fsdp@2-into-ddp@1.pt")) > 29  # fsdp -> ddp
    assert _same(saved("ddp@1"), loaded("ddp@1-into-fsdp@2.pt")) > 29  # ddp -> fsdp
    assert saved("fsdp@2")["optim"]["state"]["tok.weight"]["step"] == 2  # it trained
    fresh, _ = _model(7, into_shards=False)
    assert not torch.equal(fresh.tok.weight, saved("fsdp@2")["model"]["tok.weight"])  # loading changed it

    # export: the consolidated weights of a sharded checkpoint, in one process, no group
    folder = os.path.join(root, "fsdp@2")
    exported = sharded.full_model_state(folder, set(os.listdir(folder)))
    gathered = saved("fsdp@2")["model"]
    assert exported.keys() == gathered.keys()
    assert all(torch.equal(exported[k], gathered[k]) for k in gathered)


# --- nothing unpickled outside the allow-list -------------------------------------------------------

class Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny_checkpoint(folder, extra=None) -> None:
    state = {"model": {"w": torch.arange(4.0)}, "optim": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}}
    state.update(extra or {})
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)


def test_poisoned_dcp_index_runs_nothing_and_is_refused(tmp_path):
    _tiny_checkpoint(tmp_path / "ck")
    marker = tmp_path / "ran"
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(Evil(str(marker)), protocol=4))
    allowed = set(os.listdir(tmp_path / "ck"))
    with pytest.raises(sharded.UnsafeCheckpoint, match="refers to posix.system: not allowed"):
        sharded.read_dcp_metadata(str(tmp_path / "ck" / ".metadata"))
    with pytest.raises(sharded.UnsafeCheckpoint, match="posix.system"):
        sharded.load({"model": {"w": torch.zeros(4)}}, str(tmp_path / "ck"), allowed, no_dist=True)
    with pytest.raises(sharded.UnsafeCheckpoint, match="posix.system"):
        with open(tmp_path / "ck" / ".metadata", "rb") as f:
            sharded.vet(f, allowed, lambda *a: b"")
    assert not marker.exists()
    # the poison is live: stock DCP's reader runs it (then fails on what os.system returned)
    with pytest.raises(AttributeError):
        dcp.FileSystemReader(str(tmp_path / "ck")).read_metadata()
    assert marker.exists()


def test_poisoned_bytes_item_runs_nothing_and_is_refused(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "ck"
    _tiny_checkpoint(folder, {"optim": {"param_groups": [{"lr": Evil(str(marker)), "betas": (0.9, 0.99)}]}})
    allowed = set(os.listdir(folder))
    target = {"model": {"w": torch.zeros(4)}, "optim": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0)}]}}

    def read(rel, offset, length):
        with open(folder / rel, "rb") as f:
            f.seek(offset)
            return f.read(length)

    with open(folder / ".metadata", "rb") as f:
        with pytest.raises(sharded.UnsafeCheckpoint, match="optim.param_groups.0.lr is not plain data"):
            sharded.vet(f, allowed, read)
    with pytest.raises(sharded.UnsafeCheckpoint, match="is not plain data"):
        sharded.load(target, str(folder), allowed, no_dist=True)
    assert not marker.exists()
    dcp.load(target, checkpoint_id=str(folder), no_dist=True)  # the stock planner runs it
    assert marker.exists()


# State set on what a .metadata did not make (issue 23 item 7): each prefix leaves its object on
# the stack, sets state on it (BUILD), pops it; the real index follows, so the file loads whole.
def _global(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4, as DCP writes: GLOBAL's line reads fail on a pyarrow stream)."""
    return b"".join(b"\x8c" + bytes([len(x)]) + x.encode() for x in (module, name)) + b"\x93"


_SET_ATTR = (b"N}\x8c\x06__eq__" + _global("torch.serialization", "_get_layout")
             + b"s\x86b0")  # (None, {"__eq__": _get_layout}) BUILD, POP
_DCP = "torch.distributed.checkpoint.metadata"
ON_WHAT = {
    "class": _global(_DCP, "Metadata") + _SET_ATTR,
    "function": _global("torch.serialization", "_get_layout") + _SET_ATTR,
    "enum member": _global(_DCP, "_MEM_FORMAT_ENCODING") + b"K\x00\x85R" + _SET_ATTR,  # E(0): REDUCE
    "enum member by NEWOBJ": _global(_DCP, "_MEM_FORMAT_ENCODING") + b"K\x00\x85\x81" + _SET_ATTR,
    "class by SETITEM": _global(_DCP, "Metadata") + b"\x8c\x06__eq__Ns0",
}


def _targets():
    from torch.distributed.checkpoint import metadata as md
    from torch.serialization import _get_layout

    member = md._MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    return {"Metadata": (md.Metadata, dict(vars(md.Metadata))), "_get_layout": (_get_layout, dict(vars(_get_layout))),
            "member": (member, dict(vars(member)))}


@pytest.fixture
def classes_kept():
    """The targets' attributes as they were (restored after, so a failing run harms no other test)."""
    before = _targets()
    yield before
    for obj, saved in before.values():
        for key in set(vars(obj)) - set(saved):
            delattr(obj, key)
        for key, value in saved.items():
            if vars(obj).get(key) is not value:
                setattr(obj, key, value)


@pytest.mark.parametrize("on", list(ON_WHAT))
def test_state_on_anything_but_a_new_instance_is_refused_and_changes_nothing(tmp_path, on, classes_kept):
    _tiny_checkpoint(tmp_path / "ck")
    index = tmp_path / "ck" / ".metadata"
    index.write_bytes(ON_WHAT[on] + index.read_bytes())
    with pytest.raises(sharded.UnsafeCheckpoint, match=r"DCP \.metadata (sets state on|makes|adds items to) "):
        sharded.read_dcp_metadata(str(index))
    for name, (obj, saved) in classes_kept.items():
        assert dict(vars(obj)) == saved, f"the .metadata changed {name}"


def test_a_resigned_checkpoint_whose_index_sets_a_class_attribute_is_refused_on_the_driver(tmp_path, classes_kept):
    """--resume of such a checkpoint, manifest signed again over it: refused before Ray (ray_job/vet.py)."""
    from test_checkpoint_files import realistic_meta

    from ray_job.errors import UserError
    from ray_job.resume import resolve_resume
    from storage.location import resolve

    folder = tmp_path / "checkpoint-epoch0-step8-files2"
    _tiny_checkpoint(folder)
    (folder / ".metadata").write_bytes(ON_WHAT["class"] + (folder / ".metadata").read_bytes())
    for rel in (manifest.SCHEDULER, manifest.METRICS, manifest.rng_file(0)):
        (folder / rel).write_bytes(b"{}")
    manifest.write_metadata(str(folder), realistic_meta(folder.name, world_size=1, strategy="fsdp",
                                                        shards={"0": ["__0_0.distcp"]}))
    assert manifest.check(resolve(str(folder)), verify_hashes=True).ok  # hashes alone would pass it
    with pytest.raises(UserError, match="is refused .DCP .metadata sets state on .*Metadata"):
        resolve_resume(str(folder), resolve(str(tmp_path / "runs")))
    assert dict(vars(classes_kept["Metadata"][0])) == classes_kept["Metadata"][1]


def test_safe_load_of_a_clean_checkpoint_and_files_outside_the_manifest(tmp_path):
    _tiny_checkpoint(tmp_path / "ck")
    target = {"model": {"w": torch.zeros(4)}, "optim": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0)}]}}
    seen = []
    sharded.load(target, str(tmp_path / "ck"), {".metadata", "__0_0.distcp"}, before_read=seen.extend, no_dist=True)
    assert torch.equal(target["model"]["w"], torch.arange(4.0))
    assert target["optim"]["param_groups"][0] == {"lr": 0.1, "betas": (0.9, 0.99)}
    assert seen == ["__0_0.distcp"]  # what this reader asked to have fetched
    with pytest.raises(sharded.UnsafeCheckpoint, match="'__0_0.distcp', which metadata.json does not list"):
        sharded.load(target, str(tmp_path / "ck"), {".metadata"}, no_dist=True)


def test_stager_reuses_its_buffers_and_stages_the_state_as_it_is_now():
    stager = sharded.Stager()
    w = torch.arange(6.0)
    state = {"model": {"w": w}, "optim": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}}
    first = stager.stage(state)
    assert torch.equal(first["model"]["w"], w) and first["model"]["w"].data_ptr() != w.data_ptr()
    w += 1  # training moves on: the staged copy does not
    assert torch.equal(first["model"]["w"], torch.arange(6.0))
    state["optim"]["param_groups"][0]["lr"] = 0.05
    second = stager.stage(state)
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()  # the same buffer
    assert torch.equal(second["model"]["w"], w) and second["optim"]["param_groups"][0]["lr"] == 0.05
    state["model"]["extra"] = torch.ones(2)  # the shape changed: new buffers
    third = stager.stage(state)
    assert torch.equal(third["model"]["extra"], torch.ones(2))
