"""What the driver hands every worker: one frozen, typed launch plan. Torch-free: the driver,
Ray Train's controller (which builds the train dataset) and the workers all read it."""

from __future__ import annotations

from dataclasses import dataclass

from configs.schema import Config
from data.index import DataIndex


@dataclass(frozen=True, kw_only=True)
class ResumePoint:
    """The checkpoint --resume named, resolved and verified on the driver."""

    name: str
    uri: str
    step: int
    epoch: int
    samples_in_epoch: int


@dataclass(frozen=True, kw_only=True)
class InitFrom:
    """--init-from: the safetensors file a fresh run's weights start from (checked on the driver)."""

    uri: str
    sha256: str
    size: int


@dataclass(frozen=True, kw_only=True)
class LaunchPlan:
    config: Config
    """The resolved config; absolute data and storage locations (workers run elsewhere)."""
    launch_id: str
    """This launch; Ray's in-run retries keep it, a new job gets a new one."""
    run_uri: str
    """{storage}/{run_name}: where this run's checkpoints go."""
    data_index: DataIndex
    """The train files and their row counts, fixed for the run (a resume reuses the
    checkpoint's, so a changed folder cannot reorder the data)."""
    resume: ResumePoint | None = None
    """--resume, for the first attempt; in-run retries use this launch's newest checkpoint."""
    audit_dir: str | None = None
    """--audit-dir (absolute): per-rank sample ids and the read tasks' opens."""
    verbose: bool = False
    """--verbose: Ray's own INFO logs too (Train's per-rank reports, Ray Data's plans)."""
    token_dtype: str = "uint8"
    """How the tokens column packs token ids: uint8, or little-endian uint16/uint32 (the data
    set's dataset.json says which; a folder without one holds bytes)."""
    init_from: InitFrom | None = None
    """--init-from on a fresh run: rank 0 reads it and the weights are broadcast before the first
    step; on a resume, the file the run started from (recorded in metadata.json, not loaded)."""
