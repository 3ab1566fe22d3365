"""Sharded state: FSDP2 (`fully_shard`) for the model, torch.distributed.checkpoint (DCP) for
its checkpoints, and the one safe way to read a DCP folder.

A sharded checkpoint is DCP's layout inside the named checkpoint folder: ``.metadata`` (the
global index, written by rank 0 after every rank's data) and one ``__{rank}_0.distcp`` per
rank, holding the keys ``model.*`` (weights) and ``optim.*`` (AdamW state and param_groups),
keyed by parameter name, so any worker count can read them back (DCP reshards).

Stock DCP unpickles twice on load: ``FileSystemReader.read_metadata`` (``pickle.load`` of
``.metadata``) and ``DefaultLoadPlanner.load_bytes`` (``torch.load(weights_only=False)`` of every
non-tensor item, e.g. AdamW's param_groups). ``SafeReader`` reads ``.metadata`` through an
Unpickler that admits only DCP's own metadata classes and sets state only on the instances it
makes, refuses transforms and files outside the checkpoint's manifest; ``SafePlanner`` loads
bytes items with ``weights_only=True``. A stranger's checkpoint runs no code and changes no
class. (torch's weights-only unpickler cannot read ``.metadata``:
protocol 4's FRAME opcode; see ../shared/research/fsdp-dcp.md.)
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo

DCP_METADATA = ".metadata"


def shard_file(rank: int) -> str:
    """What FileSystemWriter names rank r's data (one file per rank: thread_count=1)."""
    return f"__{rank}_0.distcp"


class UnsafeCheckpoint(Exception):
    """A DCP file asks for something the allow-list does not admit: nothing of it ran."""


# --- FSDP2 -------------------------------------------------------------------------------------

def blocks_to_shard(model: nn.Module, class_names: tuple[str, ...] = ()) -> list[nn.Module]:
    """The modules fully_shard wraps one by one before the root: instances of the classes named
    in model.shard_modules, else every nn.ModuleList's children (a transformer's blocks).
    Outermost first; a module inside one already chosen is not chosen again."""
    chosen: list[nn.Module] = []
    inside: set[int] = set()
    for _, module in model.named_modules():
        if id(module) in inside:
            continue
        picked = (type(module).__name__ in class_names if class_names
                  else any(module is child for lst in model.modules() if isinstance(lst, nn.ModuleList)
                           for child in lst))
        if picked and module is not model:
            chosen.append(module)
            inside.update(id(m) for m in module.modules())
    return chosen


def shard(model: nn.Module, class_names: tuple[str, ...] = (), bf16: bool = False) -> tuple[nn.Module, int]:
    """fully_shard each block, then the root, on the default process group (Ray Train's: gloo on
    CPU, NCCL on GPU). bf16: compute in bf16, reduce gradients and keep master weights in fp32.
    Returns the model and how many blocks were sharded on their own."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    blocks = blocks_to_shard(model, class_names)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model, len(blocks)


def local_bytes(tensors) -> int:
    """Bytes this rank holds for these tensors (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


# --- safe reading ------------------------------------------------------------------------------

# Every global a torch 2.13 FileSystemWriter's .metadata refers to (recorded with a logging
# find_class); anything else is refused before it is looked up.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"} | {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath"},
}


class _MetadataUnpickler(pickle._Unpickler):
    """Unpickles only what a DCP index holds: globals from the allow-list; new objects only as
    object.__new__ of an allowed class (DCP's dataclasses), and state (BUILD) only on those new
    objects, items only into lists, dicts and sets it made. A stock unpickler lets BUILD set
    attributes on whatever is on its stack: an allowed class (Metadata.__eq__), a function, an
    enum member, changed for the rest of the process. REDUCE stays: every allowed callable makes a
    new object or looks one up (torch.Size, an enum by value, a layout by name). The pure-Python
    unpickler, because its opcodes can be overridden (the C one's cannot); it reads a 4.4 MB
    index (20,000 tensors) in about the C one's time here, which is spent making the objects."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file):
        super().__init__(file)
        self._made: dict[int, object] = {}  # id -> the object: instances made here (kept, so ids stay theirs)

    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"DCP {DCP_METADATA} refers to {module}.{name}: not allowed")

    def _new(self, cls, args: tuple, kwargs: dict):
        if not (isinstance(cls, type) and cls.__new__ is object.__new__
                and cls.__name__ in _ALLOWED.get(cls.__module__, ())):
            raise UnsafeCheckpoint(f"DCP {DCP_METADATA} makes {_describe(cls)} by NEWOBJ: only DCP's own "
                                   "metadata classes")
        obj = cls.__new__(cls, *args, **kwargs)
        self._made[id(obj)] = obj
        return obj

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, {}))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    def load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        if self._made.get(id(inst)) is not inst:
            raise UnsafeCheckpoint(f"DCP {DCP_METADATA} sets state on {_describe(inst)}: only on an "
                                   "instance it made")
        if getattr(inst, "__setstate__", None) is None and not isinstance(state, dict):
            raise UnsafeCheckpoint(f"DCP {DCP_METADATA} sets state on {_describe(inst)} other than its "
                                   "fields (setattr): not allowed")
        super().load_build()

    def _into(self, kind: type, depth: int) -> None:
        target = self.stack[-depth] if depth else self.metastack[-1][-1]
        if type(target) is not kind:
            raise UnsafeCheckpoint(f"DCP {DCP_METADATA} adds items to {_describe(target)}: only to a "
                                   f"{kind.__name__} it made")

    def load_setitem(self):
        self._into(dict, 3)
        super().load_setitem()

    def load_setitems(self):
        self._into(dict, 0)
        super().load_setitems()

    def load_append(self):
        self._into(list, 2)
        super().load_append()

    def load_appends(self):
        self._into(list, 0)
        super().load_appends()

    def load_additems(self):
        self._into(set, 0)
        super().load_additems()

    def load_inst(self):  # protocol 0/1 ways to make objects: DCP never writes them
        raise UnsafeCheckpoint(f"DCP {DCP_METADATA} makes an object by INST: not allowed")

    load_obj = load_inst

    for _op, _method in ((pickle.NEWOBJ, load_newobj), (pickle.NEWOBJ_EX, load_newobj_ex),
                         (pickle.BUILD, load_build), (pickle.SETITEM, load_setitem),
                         (pickle.SETITEMS, load_setitems), (pickle.APPEND, load_append),
                         (pickle.APPENDS, load_appends), (pickle.ADDITEMS, load_additems),
                         (pickle.INST, load_inst), (pickle.OBJ, load_obj)):
        dispatch[_op[0]] = _method
    del _op, _method


def _describe(obj) -> str:
    if isinstance(obj, type) or callable(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    return f"{type(obj).__module__}.{type(obj).__qualname__} {obj!r}"[:200]


def read_dcp_metadata(path: str) -> dcp_metadata.Metadata:
    """.metadata through the allow-list (see parse_dcp_metadata)."""
    with open(path, "rb") as f:
        return parse_dcp_metadata(f)


def parse_dcp_metadata(stream) -> dcp_metadata.Metadata:
    """DCP's index unpickled through the allow-list; its storage entries must name plain files
    and use no transforms (we never write any: a transform would run registered extensions)."""
    try:
        md = _MetadataUnpickler(stream).load()
    except UnsafeCheckpoint:
        raise
    except Exception as e:  # truncated, not a pickle, wrong objects: corrupt, never run
        raise UnsafeCheckpoint(f"DCP {DCP_METADATA} is unreadable: {type(e).__name__}: {e}") from None
    if not isinstance(md, dcp_metadata.Metadata) or not isinstance(md.storage_data, dict):
        raise UnsafeCheckpoint(f"DCP {DCP_METADATA} does not hold DCP metadata")
    for info in md.storage_data.values():
        if not isinstance(info, _StorageInfo) or not isinstance(info.relative_path, str):
            raise UnsafeCheckpoint(f"DCP {DCP_METADATA} has a malformed storage entry")
        if info.transform_descriptors:
            raise UnsafeCheckpoint(f"DCP {DCP_METADATA} asks for load transforms "
                                   f"{list(info.transform_descriptors)}: not allowed")
    return md


def vet(metadata_stream, allowed: set[str], read: Callable[[str, int, int], bytes]) -> int:
    """Everything a load would unpickle, checked before anything loads (the driver does this
    for --resume, so a hostile checkpoint is refused before Ray starts): .metadata through the
    allow-list, every file it points at listed in the manifest (allowed), and every non-tensor
    item (read(file, offset, length)) loadable with weights_only. Returns how many items were
    checked; raises UnsafeCheckpoint."""
    md = parse_dcp_metadata(metadata_stream)
    checked = 0
    for index, info in md.storage_data.items():
        if info.relative_path not in allowed:
            raise UnsafeCheckpoint(f"DCP {DCP_METADATA} points at {info.relative_path!r}, which "
                                   "metadata.json does not list")
        if isinstance(md.state_dict_metadata.get(index.fqn), dcp_metadata.BytesStorageMetadata):
            try:
                torch.load(io.BytesIO(read(info.relative_path, info.offset, info.length)), weights_only=True)
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0]
                raise UnsafeCheckpoint(f"DCP item {index.fqn} is not plain data: {first}") from None
            checked += 1
    return checked


class SafeReader(FileSystemReader):
    """FileSystemReader that unpickles nothing unlisted and reads only manifest files.

    allowed: the checkpoint's manifest names; every file .metadata points at must be one.
    before_read: called with the names this rank's plan needs, before they are opened (a remote
    checkpoint downloads and verifies just those).
    """

    def __init__(self, path: str, allowed: set[str], before_read: Callable[[list[str]], None] | None = None):
        super().__init__(path)
        self.allowed = allowed
        self.before_read = before_read

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        if kwargs.get("rank") is not None:  # DCP's fallback to rank-local metadata: we never write it
            raise UnsafeCheckpoint(f"DCP {DCP_METADATA} is missing or refused (no rank-local fallback)")
        md = read_dcp_metadata(os.path.join(str(self.path), DCP_METADATA))
        if md.storage_meta is None:
            md.storage_meta = dcp_metadata.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan, planner):
        needed = sorted({self.storage_data[item.storage_index].relative_path for item in plan.items})
        outside = [rel for rel in needed if rel not in self.allowed]
        if outside:
            raise UnsafeCheckpoint(f"DCP {DCP_METADATA} points at {outside[0]!r}, which metadata.json "
                                   "does not list")
        if self.before_read is not None:
            self.before_read(needed)
        return super().read_data(plan, planner)


class SafePlanner(DefaultLoadPlanner):
    """Non-tensor items (AdamW's param_groups) loaded weights_only: numbers, strings, tuples."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise UnsafeCheckpoint(f"DCP item {read_item.dest_index.fqn} is not plain data: {first}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def first_failure(e: BaseException) -> BaseException:
    """DCP wraps every rank's failure in a CheckpointException (a BaseException): the first one."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, BaseException):
            return inner
    return e


def load(state_dict: dict, folder: str, allowed: set[str],
         before_read: Callable[[list[str]], None] | None = None, no_dist: bool = False) -> None:
    """Fill state_dict (DTensors or plain tensors: DCP reshards to them) from folder, in place."""
    import warnings

    from torch.distributed.checkpoint.api import CheckpointException

    read_dcp_metadata(os.path.join(folder, DCP_METADATA))  # refused here, before DCP retries it per rank
    try:
        with warnings.catch_warnings():  # no_dist: one process on purpose, not a missing group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state_dict, storage_reader=SafeReader(folder, allowed, before_read),
                     planner=SafePlanner(), no_dist=no_dist)
    except CheckpointException as e:
        inner = first_failure(e)
        if isinstance(inner, UnsafeCheckpoint):
            raise UnsafeCheckpoint(str(inner)) from None
        raise RuntimeError(f"DCP load failed: {type(inner).__name__}: {inner}") from None


def save(staged: dict, folder: str, group=None) -> None:
    """Write staged (a CPU copy; see stage) into folder: every rank its own shard file, rank 0
    .metadata last. group: a process group of its own, so that this (running in a background
    thread) never interleaves its collectives with FSDP's on the default group."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(staged, storage_writer=FileSystemWriter(folder, thread_count=1, sync_files=False),
                 process_group=group)
    except CheckpointException as e:
        inner = first_failure(e)
        raise RuntimeError(f"DCP save failed: {type(inner).__name__}: {inner}") from None


class Stager:
    """CPU copies of a state dict (DTensors stay DTensors) for a background write to read while
    training changes the originals. The buffers are allocated on the first save and reused
    (pinned on GPU, for fast device-to-host copies): one copy of this rank's state, kept; the
    checkpointer waits until the previous copy is written before it stages the next.

    torch's own BlockingAsyncStager caches only with pinned memory, which a CPU-only build
    cannot allocate; these are the helpers it uses."""

    def __init__(self):
        self.cache = None

    def stage(self, state_dict: dict) -> dict:
        from torch.distributed._state_dict_utils import CompanionMismatch, _copy_state_dict, _create_cpu_state_dict

        if self.cache is not None:
            try:  # tensors copied into the cached buffers; other leaves (lr, betas) taken as they are now
                return _copy_state_dict(state_dict, self.cache)
            except (CompanionMismatch, KeyError, ValueError, RuntimeError, TypeError):
                self.cache = None  # the state's shape changed: allocate again
        self.cache = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
        return _copy_state_dict(state_dict, self.cache)


def new_group():
    """A gloo group of all ranks for checkpoint collectives (made by every rank at once)."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


# --- one file for people: consolidated weights ----------------------------------------------------

def full_model_state(folder: str, allowed: set[str],
                     before_read: Callable[[list[str]], None] | None = None) -> dict[str, torch.Tensor]:
    """The model's full weights from a sharded checkpoint, in this process (no Ray, no process
    group, no GPU): shapes and dtypes from .metadata, data read through the safe reader."""
    md = read_dcp_metadata(os.path.join(folder, DCP_METADATA))
    wanted = {}
    for key, meta in md.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(meta, dcp_metadata.TensorStorageMetadata):
            wanted[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    if not wanted:
        raise UnsafeCheckpoint(f"DCP {DCP_METADATA} holds no model.* tensors")
    load(wanted, folder, allowed, before_read, no_dist=True)
    return {key[len("model."):]: t for key, t in wanted.items()}

