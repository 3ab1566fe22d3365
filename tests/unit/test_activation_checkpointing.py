"""train.activation_checkpointing=full changes memory, not numbers: with dropout on, a few steps
through the real strategies (ddp: Accelerate; fsdp: FSDP2 on a gloo group of one) give bitwise
the losses and weights of the same steps without it, while every block really runs its forward
twice. Without the RNG states restored for the recomputation they would differ (shown below), so
the equality is not vacuous. (Stop/resume with it: tests/integration/test_sharded_training.py.)"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.distributed as dist

from configs import load, with_overrides
from trainers import parallel, recompute
from trainers.model import Block, build_model

STEPS = 3


@contextlib.contextmanager
def _group(strategy: str):
    if strategy != "fsdp":
        yield
        return
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _train(strategy: str, mode: str) -> tuple[list[float], dict[str, torch.Tensor], int]:
    cfg = with_overrides(load("test"), {
        "train": {"strategy": strategy, "activation_checkpointing": mode, "grad_accum_steps": 2,
                  "global_batch_size": 8},
        "scaling": {"num_workers": 1}, "logging": {"trackers": []}})
    assert cfg.model.dropout > 0
    tokens = np.random.default_rng(0).integers(0, 256, (STEPS, 8, cfg.model.seq_len + 1), dtype=np.uint8)
    forwards = []
    with _group(strategy):
        torch.manual_seed(cfg.train.seed)
        s = parallel.make(cfg, 1)
        model = build_model(cfg.model)
        for m in model.modules():
            if isinstance(m, Block):
                m.register_forward_pre_hook(lambda *_: forwards.append(1))
        s.build(model)
        s.prepare()
        torch.manual_seed(cfg.train.seed * 1000 + 1)  # rank 0's dropout stream, as seed_rank
        losses = [s.step(tokens[i]).item() for i in range(STEPS)]
        weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                   for k, v in s.model.state_dict().items()}
    assert s.recomputed == (2 if mode == "full" else 0)
    return losses, weights, len(forwards)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_full_activation_checkpointing_is_bitwise_the_run_without(strategy):
    losses, weights, forwards = _train(strategy, "none")
    ac_losses, ac_weights, ac_forwards = _train(strategy, "full")
    assert forwards == STEPS * 2 * 2  # 2 micro-batches x 2 blocks
    assert ac_forwards == 2 * forwards  # each block's forward again in backward
    assert ac_losses == losses  # floats compared exactly
    assert ac_weights.keys() == weights.keys()  # the parameter names do not change
    assert all(torch.equal(ac_weights[k], weights[k]) for k in weights)


def test_without_the_rng_states_restored_the_weights_differ(monkeypatch):
    """The power of the test above: recomputing with other dropout masks is visible."""
    from torch.distributed._composable import checkpoint

    def careless(model, cfg):
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        for block in blocks:
            checkpoint(block, use_reentrant=False, preserve_rng_state=False)
        return len(blocks)

    losses, weights, _ = _train("ddp", "none")
    monkeypatch.setattr(recompute, "apply", careless)
    _, careless_weights, _ = _train("ddp", "full")
    assert not all(torch.equal(careless_weights[k], weights[k]) for k in weights)
