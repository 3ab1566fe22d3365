"""The curve checks the training tests rely on can fail: assert_same_grad_norms refuses norms
that differ by more than a relative 1e-4 (a rank-local norm is off by far more) or miss a step."""

from __future__ import annotations

import pytest
from conftest import assert_same_grad_norms
from torch.utils.tensorboard import SummaryWriter


def _log(folder, norms) -> None:
    writer = SummaryWriter(str(folder))
    for step, value in norms.items():
        writer.add_scalar("train/grad_norm", value, step)
    writer.close()


def test_grad_norms_equal_within_1e_4_pass_and_others_fail(tmp_path):
    ddp = {s: 1.0 + s / 10 for s in range(1, 6)}
    _log(tmp_path / "ddp", ddp)
    _log(tmp_path / "close", {s: v * (1 + 2e-5) for s, v in ddp.items()})
    assert_same_grad_norms(tmp_path / "close", tmp_path / "ddp", 5)
    _log(tmp_path / "local", {s: v * 0.5 ** 0.5 for s, v in ddp.items()})  # one rank's shard of two
    with pytest.raises(AssertionError, match="grad norms differ"):
        assert_same_grad_norms(tmp_path / "local", tmp_path / "ddp", 5)
    _log(tmp_path / "off", {**ddp, 3: ddp[3] * (1 + 3e-4)})
    with pytest.raises(AssertionError, match=r"\(3, "):
        assert_same_grad_norms(tmp_path / "off", tmp_path / "ddp", 5)
    _log(tmp_path / "short", {s: v for s, v in ddp.items() if s != 4})
    with pytest.raises(AssertionError):
        assert_same_grad_norms(tmp_path / "short", tmp_path / "ddp", 5)
