"""Named presets as plain functions; variants are built with dataclasses.replace."""

from __future__ import annotations

import os

from configs.schema import (
    CheckpointConfig, Config, ConfigError, DataConfig, ModelConfig, OptimConfig, ScalingConfig,
    TrainConfig, with_overrides,
)


def test() -> Config:
    """2 CPU workers, a 6-file byte-level corpus from the stdlib: 24 steps an epoch, 40 steps,
    a checkpoint every 8 (mid-file, mid-epoch and at the epoch boundary), under two minutes."""
    return Config(name="test")


def production() -> Config:
    """A ~100M-parameter GPT on one multi-GPU node: bf16, 8 GPUs, checkpoints to GCS."""
    return Config(
        name="production",
        model=ModelConfig(vocab_size=256, seq_len=1024, n_layer=12, n_head=12, d_model=768, dropout=0.1),
        data=DataConfig(path="gs://my-training-data/corpus", prepare="none"),
        optim=OptimConfig(lr=6e-4, weight_decay=0.1, warmup_steps=2000, decay_steps=100_000),
        train=TrainConfig(max_steps=100_000, global_batch_size=256, grad_accum_steps=1,
                          mixed_precision="bf16", log_every=10, val_every=1000, val_batch_size=32),
        scaling=ScalingConfig(num_workers=8, use_gpu=True, cpus_per_worker=4),
        checkpoint=CheckpointConfig(storage="gs://my-training-checkpoints/runs", every=1000,
                                    max_failures=3, preemption_check_every=10, keep_last=5,
                                    keep_best=2),
    )


PRESETS = {"test": test, "production": production}


def load(name_or_yaml: str) -> Config:
    """A preset name, or a YAML file of overrides with an optional `base: PRESET` key."""
    if name_or_yaml in PRESETS:
        return PRESETS[name_or_yaml]()
    if name_or_yaml.endswith((".yaml", ".yml")):
        import yaml

        if not os.path.isfile(name_or_yaml):
            raise ConfigError(f"--config {name_or_yaml}: no such file")
        with open(name_or_yaml) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"--config {name_or_yaml}: expected a mapping at the top level")
        base_name = data.pop("base", "test")
        if base_name not in PRESETS:
            raise ConfigError(f"--config {name_or_yaml}: unknown base '{base_name}' "
                              f"(known: {', '.join(PRESETS)})")
        data.setdefault("name", os.path.splitext(os.path.basename(name_or_yaml))[0])
        return with_overrides(PRESETS[base_name](), data)
    raise ConfigError(
        f"--config {name_or_yaml}: unknown config (known: {', '.join(PRESETS)}, or a .yaml file)"
    )

