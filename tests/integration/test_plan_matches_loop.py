"""The launch plan's training state per rank (trainers/memory.py, traced under FakeTensorMode on
a fake process group of 2) equals what the train loop reports on rank 0 of the real 2-worker
runs (`💽 Training state on rank 0 ...`), for ddp and fsdp. The shared runs are reused: no new
training here."""

from __future__ import annotations

import re

import pytest

from configs import load, with_overrides
from trainers import memory

pytestmark = pytest.mark.slow  # the shared runs (fixtures taken by name below: not seen by conftest)

LINE = re.compile(r"💽 Training state on rank 0 \((\w+), (\d+) workers\): params ([\d.]+) MB, "
                  r"grads ([\d.]+) MB, AdamW ([\d.]+) MB")


@pytest.mark.parametrize("strategy, fixture", [("ddp", "runs"), ("fsdp", "fsdp_runs")])
def test_the_plans_state_bytes_are_the_loops(strategy, fixture, request):
    out = request.getfixturevalue(fixture).straight.out
    reported = LINE.search(out)
    assert reported, out[-3000:]
    est = memory.estimate(with_overrides(load("test"), {"train": {"strategy": strategy}}))
    mb = [f"{n / 2**20:.2f}" for n in (est.params, est.grads, est.optimizer)]
    assert reported.groups() == (strategy, "2", *mb)
