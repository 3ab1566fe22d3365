"""Frozen dataclasses, one per section of the config. Each field has a docstring; checks name
the field. Loading, merging and --set parsing are in configs/loading.py.

The sections are *Section, not *Config: Ray's ScalingConfig, CheckpointConfig and DataConfig
are imported next to them in ray_job/launch.py."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass, field

from configs.gpus import GPU_MEMORY_GB

_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


class ConfigError(ValueError):
    """An unknown key or a bad value; the message names the key."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _finite(x: float) -> bool:
    return math.isfinite(x)


def path_component_problem(text) -> str | None:
    """Why text cannot be one folder name under --storage (None if it can).

    Run and config names become `{storage}/{name}/`: `..`, a `/` or a leading dot would put
    a run (and retention's deletes) outside --storage or hide it.
    """
    if not isinstance(text, str) or not text:
        return "must not be empty"
    if text in (".", ".."):
        return f"{text!r} is not a folder name"
    if "/" in text or "\\" in text:
        return f"{text!r} must be one folder name, without '/' or '\\'"
    if text.startswith("."):
        return f"{text!r} must not start with '.'"
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        return f"{text!r} must not contain control characters"
    if len(text.encode("utf-8")) > 200:
        return f"{text[:20]!r}... is longer than 200 bytes"
    return None


def _safe_name(text: str, key: str) -> None:
    problem = path_component_problem(text)
    _require(problem is None, key,
             f"{problem}; use letters, digits, '-', '_' or '.' inside (e.g. exp-1)")


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    vocab_size: int = 256
    """Byte-level tokens: 256."""
    seq_len: int = 64
    """Tokens per sample seen by the model (each stored sample holds seq_len + 1 bytes)."""
    n_layer: int = 2
    """Transformer blocks."""
    n_head: int = 2
    """Attention heads per block."""
    d_model: int = 64
    """Width of the residual stream; a multiple of n_head."""
    dropout: float = 0.1
    """Dropout probability: it draws random numbers, so resume must restore the RNG states."""
    factory: str = "trainers.model:GPT"
    """"package.module:function" building the model: called as function(model_section,
    **kwargs), it returns an nn.Module whose forward(inputs, targets) gives the loss. The module
    must import on every worker: ship it in the job's working dir or an installed package."""
    kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for the factory (JSON values); recorded in every checkpoint."""
    shard_modules: tuple[str, ...] = ()
    """train.strategy=fsdp: class names of the blocks sharded one by one (fully_shard each, then
    the root), e.g. ["Block"]; empty: the children of every nn.ModuleList (a transformer's
    layers). Each sharded block is gathered whole only while it computes."""

    def __post_init__(self):
        _require(isinstance(self.factory, str) and _FACTORY.fullmatch(self.factory) is not None,
                 "model.factory", f"{self.factory!r} is not 'package.module:function'")
        _require(isinstance(self.kwargs, dict) and all(isinstance(k, str) for k in self.kwargs),
                 "model.kwargs", "must be a mapping of names to values")
        try:
            json.dumps(self.kwargs, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.kwargs: values must be JSON (numbers, strings, lists, "
                              f"mappings): {e}") from None
        _require(isinstance(self.shard_modules, tuple)
                 and all(isinstance(n, str) and n.isidentifier() for n in self.shard_modules),
                 "model.shard_modules", f"{self.shard_modules!r} is not a list of class names")
        _require(self.d_model % self.n_head == 0, "model.d_model", "must be a multiple of model.n_head")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")  # nan fails too
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            _require(getattr(self, name) > 0, f"model.{name}", "must be positive")


@dataclass(frozen=True, kw_only=True)
class DataSection:
    path: str = "./datasets/test"
    """Folder (local or gs://) holding train/*.parquet and val/*.parquet with columns id, tokens."""
    prepare: str = "stdlib"
    """'stdlib': build the corpus from this Python's own source files if path has none; 'none'."""
    train_files: int = 6
    """Prepared dataset only: number of train parquet files."""
    samples_per_file: int = 64
    """Prepared dataset only: samples per train file."""
    val_samples: int = 32
    """Prepared dataset only: samples in the validation file."""
    row_group_size: int = 10
    """Prepared dataset only: rows per parquet row group (the unit a resume reads from)."""
    shuffle_seed: int = 0
    """The order of files in epoch E is a permutation drawn from (shuffle_seed, E)."""
    shuffle: str = "window"
    """'window': the samples of each window of shuffle_window samples (in the epoch's file
    order) are shuffled by a permutation drawn from (shuffle_seed, E, window): batches mix the
    corpus, resume stays exact and each row is still read once. 'files': files permuted, rows in
    file order (a global batch is G neighbouring samples)."""
    shuffle_window: int = 0
    """Samples per shuffle window, rounded down to whole global batches (at least one); 0: about
    256 MB of samples (a small corpus shuffles over its whole epoch). A resume reads its
    cursor's window whole, so this bounds the data read but not trained on at a resume."""
    steps_per_block: int = 0
    """Ray Data ingest: steps of data per block each rank receives (k); 0 sizes blocks to about
    1 MB per rank. Larger blocks cost fewer Ray Data round trips, smaller ones start faster."""

    def __post_init__(self):
        _require(self.steps_per_block >= 0, "data.steps_per_block", "must be >= 0 (0: about 1 MB per rank)")
        _require(self.prepare in ("stdlib", "none"), "data.prepare", "must be 'stdlib' or 'none'")
        for name in ("train_files", "samples_per_file", "val_samples", "row_group_size"):
            _require(getattr(self, name) > 0, f"data.{name}", "must be positive")
        _require(self.shuffle_seed >= 0, "data.shuffle_seed", "must be >= 0")
        _require(self.shuffle in ("window", "files"), "data.shuffle",
                 f"must be 'window' or 'files', got {self.shuffle!r}")
        _require(self.shuffle_window >= 0, "data.shuffle_window", "must be >= 0 (0: about 256 MB of samples)")


@dataclass(frozen=True, kw_only=True)
class OptimSection:
    lr: float = 3e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 4
    """Linear warm-up steps."""
    decay_steps: int = 40
    """Cosine decay horizon. Independent of max_steps, so --max-steps never bends the schedule."""
    min_lr_ratio: float = 0.1
    """The LR at and after decay_steps, as a fraction of lr."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""

    def __post_init__(self):
        _require(_finite(self.lr) and self.lr > 0, "optim.lr", f"must be a positive number, got {self.lr}")
        _require(_finite(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay",
                 f"must be >= 0, got {self.weight_decay}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio",
                 f"must be in [0, 1] (a fraction of optim.lr), got {self.min_lr_ratio}")
        _require(_finite(self.grad_clip) and self.grad_clip >= 0, "optim.grad_clip",
                 f"must be >= 0 (0 disables clipping), got {self.grad_clip}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(self.decay_steps > self.warmup_steps, "optim.decay_steps", "must exceed optim.warmup_steps")


@dataclass(frozen=True, kw_only=True)
class TrainSection:
    max_steps: int = 40
    """Optimizer steps at which the run stops (--max-steps overrides)."""
    global_batch_size: int = 16
    """Samples per optimizer step over all workers; a multiple of workers x grad_accum_steps."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step on each worker."""
    mixed_precision: str = "no"
    """Mixed precision: 'no', 'bf16' or 'fp16' (Accelerate's autocast under ddp; under fsdp
    bf16 is FSDP2's policy: bf16 compute, fp32 gradient reduction and master weights)."""
    strategy: str = "ddp"
    """'ddp': every worker holds the whole model, Accelerate's DistributedDataParallel, rank 0
    writes each checkpoint. 'fsdp': FSDP2 shards weights, gradients and AdamW state over the
    workers (models larger than one GPU) and every rank writes its own checkpoint shards."""
    seed: int = 1234
    """Seeds model init and each rank's dropout stream."""
    log_every: int = 1
    """Record loss and LR every N steps."""
    val_every: int = 8
    """Validate every N steps (and at the end); 0 disables it."""
    val_batch_size: int = 16
    """Validation samples per forward pass."""
    activation_checkpointing: str = "none"
    """'full': each block (those the strategy shards) keeps only its input for backward and
    recomputes its forward there: a block's activations for about a third more compute, the
    same losses and weights bit for bit. 'none' keeps every activation."""

    def __post_init__(self):
        _require(self.max_steps > 0, "train.max_steps", "must be positive")
        _require(self.global_batch_size > 0, "train.global_batch_size", "must be positive")
        _require(self.grad_accum_steps > 0, "train.grad_accum_steps", "must be positive")
        _require(self.mixed_precision in ("no", "bf16", "fp16"), "train.mixed_precision",
                 "must be 'no', 'bf16' or 'fp16'")
        _require(self.strategy in ("ddp", "fsdp"), "train.strategy", f"must be 'ddp' or 'fsdp', got {self.strategy!r}")
        _require(not (self.strategy == "fsdp" and self.mixed_precision == "fp16"), "train.mixed_precision",
                 "fp16 needs a gradient scaler, which sharded training here does not have; use bf16 "
                 "with train.strategy=fsdp")
        _require(self.log_every > 0, "train.log_every", "must be positive")
        _require(self.val_every >= 0, "train.val_every", "must be >= 0")
        _require(self.val_every == 0 or self.val_batch_size > 0, "train.val_batch_size",
                 "must be positive while validation is on (train.val_every=0 turns it off)")
        _require(self.seed >= 0, "train.seed", "must be >= 0")
        _require(self.activation_checkpointing in ("none", "full"), "train.activation_checkpointing",
                 f"must be 'none' or 'full', got {self.activation_checkpointing!r}")


@dataclass(frozen=True, kw_only=True)
class ScalingSection:
    num_workers: int = 2
    """Ray Train workers (one process each); with min_workers, the most the job trains on."""
    min_workers: int = 0
    """Spot capacity: the fewest workers the job trains on (Ray's elastic worker group). A lost
    node restarts the group at whatever size fits, at least this many, from the newest
    committed checkpoint; returning capacity grows it back (every resize_check_s). The global
    batch and the sample order stay the same at every size, so every size in the range must
    divide train.global_batch_size / train.grad_accum_steps. A lost node is a restart Ray does
    without limit unless checkpoint.max_failures is set. 0: num_workers (a fixed size)."""
    restart_wait_s: float = 20.0
    """Elastic only: how long a (re)start waits for the workers Ray chose to place before it
    chooses again (Ray's RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default): a node just
    lost still counts as capacity for a while, and the first choice after a loss waits for it."""
    resize_check_s: float = 60.0
    """Elastic only: how often a running group checks for room to grow (Ray's
    elastic_resize_monitor_interval_s). Growing saves and commits the step in progress first."""
    use_gpu: bool = False
    """One GPU per worker, NCCL between them."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each worker reserves."""
    placement_strategy: str = "PACK"
    """Ray placement group strategy for the workers: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD."""
    worker_resources: dict = field(default_factory=dict)
    """Ray resources each worker reserves besides its CPUs (and GPU), e.g. {"train_slot": 1} on
    a cluster whose nodes each offer one slot: one worker per node, so a lost node shrinks an
    elastic group by one."""
    data_cpus: float = 2.0
    """Logical CPUs left for Ray Data beside the workers' (read tasks take 0.5, the reorder 1):
    a local Ray gets this many more; on a cluster, nodes must have them free (cluster.yaml)."""
    gpu: str = ""
    """The GPU each worker gets, by name (cluster.yaml's acceleratorType, e.g. nvidia-tesla-a100,
    or Ray's, e.g. A100-80G: configs/gpus.py); the launch plan checks the memory estimate
    against its memory."""
    gpu_memory_gb: float = 0.0
    """GPU memory per worker in GB (2^30 bytes) for the launch plan's fit check; 0: by scaling.gpu."""

    def __post_init__(self):
        _require(self.num_workers > 0, "scaling.num_workers", "must be positive")
        _require(isinstance(self.worker_resources, dict) and all(
            isinstance(k, str) and k not in ("CPU", "GPU") and isinstance(v, (int, float))
            and not isinstance(v, bool) and _finite(v) and v > 0 for k, v in self.worker_resources.items()),
            "scaling.worker_resources", f"{self.worker_resources!r}: a mapping of Ray resource names "
            "(not CPU or GPU: scaling.cpus_per_worker, scaling.use_gpu) to positive amounts")
        _require(0 <= self.min_workers <= self.num_workers, "scaling.min_workers",
                 f"must be in 0..scaling.num_workers ({self.num_workers}); 0 means a fixed size, got "
                 f"{self.min_workers}")
        _require(_finite(self.resize_check_s) and self.resize_check_s > 0, "scaling.resize_check_s",
                 "must be positive")
        _require(_finite(self.restart_wait_s) and self.restart_wait_s > 0, "scaling.restart_wait_s",
                 "must be positive")
        _require(_finite(self.data_cpus) and self.data_cpus >= 1.5, "scaling.data_cpus",
                 "must be at least 1.5 (one read task and the reorder)")
        _require(_finite(self.cpus_per_worker) and self.cpus_per_worker > 0, "scaling.cpus_per_worker",
                 "must be positive")
        _require(_finite(self.gpu_memory_gb) and self.gpu_memory_gb >= 0, "scaling.gpu_memory_gb",
                 "must be >= 0 (0: from scaling.gpu)")
        _require(not self.gpu or self.gpu_memory_gb or self.gpu in GPU_MEMORY_GB, "scaling.gpu",
                 f"{self.gpu!r} is not a GPU this knows ({', '.join(GPU_MEMORY_GB)}); set "
                 "scaling.gpu_memory_gb too")
        _require(self.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                 "scaling.placement_strategy", "must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")

    @property
    def elastic(self) -> bool:
        return 0 < self.min_workers < self.num_workers

    @property
    def sizes(self) -> range:
        """Every worker count a group of this job may train at."""
        return range(self.min_workers if self.elastic else self.num_workers, self.num_workers + 1)


@dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    storage: str = "./runs"
    """Local folder or gs://bucket/prefix; checkpoints go to {storage}/{run_name}/."""
    run_name: str = ""
    """The run's folder; empty means the config's name."""
    every: int = 8
    """Save every N steps (and always at the last step)."""
    upload: str = "async"
    """'async': upload in the background (training waits only for the local snapshot); 'sync'."""
    max_failures: int = 0
    """Worker-group restarts Ray may do before the run fails."""
    preemption_check_every: int = 1
    """Ask Ray every N steps whether a node is being preempted (a barrier); 0 never asks."""
    preemption_wait_s: float = 60.0
    """After the preemption checkpoint is committed, training holds until Ray restarts the run
    from it (at the notice's deadline), so that no step is trained only to be lost with the
    node; it trains on if Ray has not restarted it this long after the deadline. 0 never holds."""
    keep_last: int = 0
    """Retention: keep the newest N complete checkpoints (0 keeps everything)."""
    keep_best: int = 0
    """Retention: also keep the K with the lowest validation loss."""
    lease_stale_s: float = 120.0
    """One launch writes a run at a time (its lease, {run}/.lease.json, refreshed every
    min(20, lease_stale_s / 4) s). A lease whose heartbeat is older than this was left by a
    killed job and the next launch takes it over; hosts' clocks must agree well within it."""
    max_pending: int = 2
    """At most this many checkpoints saved but not yet committed (written, uploaded, committed in
    the background); a save beyond that waits for the oldest (counted as stall). Bounds the
    local copies and the work a hard stop can lose."""
    drain_timeout_s: float = 300.0
    """A graceful stop (Ctrl-C, SIGTERM, `ray job stop`) finishes the checkpoints already saved
    for up to this long before the job exits; a second Ctrl-C stops at once."""

    def __post_init__(self):
        _require(self.every > 0, "checkpoint.every", "must be positive")
        _require(self.max_pending >= 1, "checkpoint.max_pending", "must be at least 1")
        _require(_finite(self.drain_timeout_s) and self.drain_timeout_s >= 0,
                 "checkpoint.drain_timeout_s", "must be >= 0")
        _require(self.upload in ("async", "sync"), "checkpoint.upload", "must be 'async' or 'sync'")
        _require(self.max_failures >= -1, "checkpoint.max_failures", "must be >= -1 (-1: no limit)")
        if self.run_name:  # empty: the config's name, checked on Config
            _safe_name(self.run_name, "checkpoint.run_name")
        _require(self.keep_last >= 0, "checkpoint.keep_last", "must be >= 0")
        _require(self.preemption_check_every >= 0, "checkpoint.preemption_check_every", "must be >= 0")
        _require(_finite(self.preemption_wait_s) and self.preemption_wait_s >= 0,
                 "checkpoint.preemption_wait_s", "must be >= 0")
        _require(self.keep_best >= 0, "checkpoint.keep_best", "must be >= 0")
        _require(_finite(self.lease_stale_s) and self.lease_stale_s >= 10, "checkpoint.lease_stale_s",
                 f"must be at least 10 (seconds without a heartbeat before a run's lease is taken "
                 f"over), got {self.lease_stale_s}")
        _require(self.keep_best == 0 or self.keep_last > 0, "checkpoint.keep_best",
                 "needs checkpoint.keep_last > 0 (keep_last=0 keeps every checkpoint, so "
                 "keep_best would do nothing)")


TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")


@dataclass(frozen=True, kw_only=True)
class LoggingSection:
    trackers: tuple[str, ...] = ("tensorboard",)
    """Accelerate's trackers rank 0 logs scalars to every train.log_every steps (loss, LR,
    gradient norm, throughput, step time, validation loss, checkpoint stall and upload):
    tensorboard (event files in {run}/tensorboard/), or wandb, mlflow, ... when installed;
    [] logs none."""

    def __post_init__(self):
        _require(isinstance(self.trackers, tuple) and all(t in TRACKERS for t in self.trackers),
                 "logging.trackers", f"{list(self.trackers)!r}: each one of {', '.join(TRACKERS)}")


@dataclass(frozen=True, kw_only=True)
class Config:
    name: str = "test"
    """The preset this config came from; the default run name."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self):
        _safe_name(self.name, "name")
        G, accum = self.train.global_batch_size, self.train.grad_accum_steps
        if not self.scaling.elastic:
            per_step = self.scaling.num_workers * accum
            _require(G % per_step == 0, "train.global_batch_size",
                     f"{G} is not a multiple of scaling.num_workers x train.grad_accum_steps = {per_step}")
        # Ray may give an elastic group any size in the range: each must keep the global batch.
        for w in self.scaling.sizes:
            _require(G % (w * accum) == 0, "scaling.min_workers",
                     f"at {w} workers the global batch cannot be kept: train.global_batch_size {G} is "
                     f"not a multiple of {w} workers x train.grad_accum_steps {accum}; choose a worker "
                     f"range ({self.scaling.min_workers}..{self.scaling.num_workers}) whose every size "
                     "divides it")

    @property
    def run_name(self) -> str:
        return self.checkpoint.run_name or self.name
