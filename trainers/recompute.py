"""train.activation_checkpointing: keep only each block's input in the forward pass and run the
block's forward again in backward (torch's activation checkpointing), trading about a third
more compute for the activations of every block.

Applied to the blocks the strategy shards (trainers/sharded.py's choice: model.shard_modules,
else the children of every nn.ModuleList), before fully_shard under fsdp, and under ddp too.
torch's composable `checkpoint` (non-reentrant) installs hooks and leaves the module tree and
the parameter names as they are, so checkpoints, exports and --init-from do not see it. It
saves the CPU and device RNG states before each block's forward and restores them for the
recomputation (preserve_rng_state): dropout draws the same masks twice, so a run with it is
bitwise the run without it.
"""

from __future__ import annotations

import torch.nn as nn

from configs.schema import Config

MODES = ("none", "full")


def apply(model: nn.Module, cfg: Config) -> int:
    """Checkpoint every block when train.activation_checkpointing is 'full'; the count."""
    if cfg.train.activation_checkpointing == "none":
        return 0
    from torch.distributed._composable import checkpoint

    from trainers.sharded import blocks_to_shard

    blocks = blocks_to_shard(model, cfg.model.shard_modules)
    for block in blocks:
        checkpoint(block, use_reentrant=False, preserve_rng_state=True)
    return len(blocks)
