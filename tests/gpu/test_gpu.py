"""On a CUDA machine: NCCL between GPU workers, bf16 through Accelerate, gradient accumulation,
a checkpoint and a resume. Skipped where there is no GPU (CI and the dev machines here).

Run: .venv/bin/python -m pytest tests/gpu -q -s
"""

import json

import pytest
import torch

from ray_job import launcher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _run(tmp_path, *extra):
    workers = min(2, torch.cuda.device_count())
    p = launcher.run(["--config", "test", "--storage", tmp_path / "ckpt",
                      "--set", f"data.path={tmp_path / 'data'}", "--set", "scaling.use_gpu=true",
                      "--set", "train.mixed_precision=bf16", "--set", "train.grad_accum_steps=2",
                      "--num-workers", workers, *extra], timeout=900)
    assert p.rc == 0, p.out[-4000:]
    return p.out


def _metrics(tmp_path, run, name):
    return json.loads((tmp_path / "ckpt" / run / name / "training_metrics.json").read_text())


def test_gpu_bf16_nccl_checkpoint_and_resume(tmp_path):
    _run(tmp_path, "--run-name", "straight")
    _run(tmp_path, "--run-name", "chain", "--max-steps", 16)
    out = _run(tmp_path, "--run-name", "chain", "--resume", "latest")
    assert "✅ Resumed from checkpoint: checkpoint-epoch0-step16-files4" in out
    final = "checkpoint-epoch1-step40-files4"
    a, b = _metrics(tmp_path, "straight", final), _metrics(tmp_path, "chain", final)
    assert a["loss_history"][:16] == b["loss_history"][:16]
    la = torch.tensor([v for _, v in a["loss_history"]])
    lb = torch.tensor([v for _, v in b["loss_history"]])
    exact = torch.equal(la, lb)
    print(f"GPU resume: bitwise equal losses = {exact}; max |diff| = {(la - lb).abs().max():.3g}")
    assert torch.allclose(la, lb, rtol=2e-2), "resumed GPU run drifted beyond bf16 noise"
