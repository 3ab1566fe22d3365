"""Named presets as plain functions; variants are built with dataclasses.replace."""

from __future__ import annotations

import os

from configs.loading import with_overrides
from configs.schema import (
    CheckpointSection,
    Config,
    ConfigError,
    DataSection,
    ModelSection,
    OptimSection,
    ScalingSection,
    TrainSection,
)


def test() -> Config:
    """2 CPU workers, a 6-file byte-level corpus from the stdlib: 24 steps an epoch, 40 steps,
    a checkpoint every 8 (mid-file, mid-epoch and at the epoch boundary), under two minutes.
    Ray Data blocks of 3 steps: several blocks per rank and a padded last chunk, as at scale.
    Shuffle windows of 2 steps (32 samples, half a file): twelve windows an epoch, so resumes
    skip whole windows and start reading mid-file and mid-row-group (step 10: file 3, row 32)."""
    return Config(name="test", data=DataSection(steps_per_block=3, shuffle_window=32))


def production() -> Config:
    """A ~3B-parameter GPT sharded over one 8-GPU node (FSDP2, bf16 compute), checkpoints to GCS.

    It would not fit replicated: 3.0B parameters hold 12 GB of fp32 weights, 12 GB of
    gradients and 24 GB of AdamW state, 48 GB before activations, more than one A100 40 GB of
    cluster.yaml's nodes. Sharded over 8 GPUs each holds ~6 GB of that, and every rank writes
    its 1/8 of each checkpoint.

    Activations decide the rest (`python -m ray_job.plan --config production`: one step traced
    under FakeTensorMode, 8 fake ranks, micro-batches of 8 x 2048 tokens, GB = 2^30 bytes):
    params 1.41, gradients 1.41, AdamW 2.83, activations at the peak 22.95 (the logits of
    50304 tokens, their fp32 copy and gradient; each block's input; one block recomputed; the
    unsharded gradients fsdp keeps between micro-batches), gathered blocks 0.80: a peak of
    28.0 GB of 40, within the plan's 90%. Without activation checkpointing the peak is 61.8 GB
    (activations 56.7): it would not fit. grad_accum_steps=4 keeps the micro-batch at 8; fewer
    steps of accumulation mean larger micro-batches (1: 51.6 GB even with checkpointing)."""
    return Config(
        name="production",
        # 12 * 24 * 3072^2 in the blocks + 2 * 50304 * 3072 in the (untied) embedding and head
        model=ModelSection(vocab_size=50304, seq_len=2048, n_layer=24, n_head=24, d_model=3072, dropout=0.0,
                           shard_modules=("Block",)),
        # Your own corpus, made by `python -m ray_job.prepare_data --seq-len 2048 --out gs://...`
        # (README: "Your own text"): dataset.json's vocab must be within model.vocab_size.
        data=DataSection(path="gs://my-training-data/corpus", prepare="none"),
        optim=OptimSection(lr=3e-4, weight_decay=0.1, warmup_steps=2000, decay_steps=100_000),
        train=TrainSection(max_steps=100_000, global_batch_size=256, grad_accum_steps=4, strategy="fsdp",
                           mixed_precision="bf16", activation_checkpointing="full", log_every=10,
                           val_every=1000, val_batch_size=8),
        scaling=ScalingSection(num_workers=8, use_gpu=True, cpus_per_worker=4, data_cpus=32,
                               gpu="nvidia-tesla-a100"),  # cluster.yaml's a2-highgpu-8g: A100 40GB
        checkpoint=CheckpointSection(storage="gs://my-training-checkpoints/runs", every=1000,
                                    max_failures=3, preemption_check_every=10, keep_last=5,
                                    keep_best=2),
    )


PRESETS = {"test": test, "production": production}


def load(name_or_yaml: str) -> Config:
    """A preset name, or a YAML file of overrides with an optional `base: PRESET` key."""
    if name_or_yaml in PRESETS:
        return PRESETS[name_or_yaml]()
    if name_or_yaml.endswith((".yaml", ".yml")):
        data = _read_yaml(name_or_yaml)
        base_name = data.pop("base", "test")
        if not isinstance(base_name, str) or base_name not in PRESETS:
            raise ConfigError(f"--config {name_or_yaml}: unknown base {base_name!r} "
                              f"(known: {', '.join(PRESETS)})")
        data.setdefault("name", os.path.splitext(os.path.basename(name_or_yaml))[0])
        try:
            return with_overrides(PRESETS[base_name](), data)
        except ConfigError as e:
            raise ConfigError(f"--config {name_or_yaml}: {e}") from None
    raise ConfigError(
        f"--config {name_or_yaml}: unknown config (known: {', '.join(PRESETS)}, or a .yaml file)"
    )


def _read_yaml(path: str) -> dict:
    """The file's top-level mapping; any unreadable file is a ConfigError naming it, one line."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        data = yaml.safe_load(text)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or type(e).__name__).split())
        raise ConfigError(f"--config {path}: not valid YAML{where} ({what})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping at the top level")
    return data
