"""The memory estimate (trainers/memory.py) against the same step measured with real CPU
tensors (MemTracker / FSDPMemTracker on a real step, one rank): the traced activation peak is
within 10% of the measured one, and the training state is the same to the byte. Activation
checkpointing lowers the traced activations."""

from __future__ import annotations

import pytest

from configs import load, with_overrides
from trainers import memory

SMALL = {"model": {"d_model": 128, "n_head": 4, "seq_len": 128}, "train": {"global_batch_size": 8}}


def _cfg(strategy: str, dropout: float, recompute: str = "none"):
    return with_overrides(load("test"), {**SMALL, "model": {**SMALL["model"], "dropout": dropout},
                                         "train": {**SMALL["train"], "strategy": strategy,
                                                   "activation_checkpointing": recompute}})


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])  # flash attention on CPU, or the math path
def test_traced_activations_are_within_10_percent_of_measured(strategy, dropout):
    cfg = _cfg(strategy, dropout)
    traced, real = memory.estimate(cfg, world=1), memory.measure(cfg)
    assert traced.fake and not real.fake
    assert abs(traced.activations - real.activations) <= 0.1 * real.activations, (traced, real)
    assert (traced.params, traced.grads, traced.optimizer) == (real.params, real.grads, real.optimizer)
    assert traced.activations > 10 * traced.params  # the micro-batch's activations dominate here


def test_activation_checkpointing_lowers_the_traced_activations():
    none = memory.estimate(_cfg("fsdp", 0.0), world=2)
    full = memory.estimate(_cfg("fsdp", 0.0, "full"), world=2)
    assert full.activations < 0.7 * none.activations, (none, full)
    assert (full.params, full.optimizer) == (none.params, none.optimizer)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_step_of_several_micro_batches_is_traced_whole(strategy):
    """Grad accumulation: the trackers see every micro-batch's forward (each refuses a second
    root forward unless its module stats restart); gradients held across micro-batches count."""
    one = _cfg(strategy, 0.0)
    two = with_overrides(one, {"train": {"grad_accum_steps": 2, "global_batch_size": 16}})  # micro-batch 8 both
    traced, real = memory.estimate(two, world=1), memory.measure(two)
    assert abs(traced.activations - real.activations) <= 0.1 * real.activations, (traced, real)
    assert traced.micro_batch == memory.estimate(one, world=1).micro_batch == 8
