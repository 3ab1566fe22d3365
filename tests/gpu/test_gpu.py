"""On a CUDA machine: NCCL between GPU workers (when there are two or more GPUs), bf16, gradient
accumulation, a checkpoint and a resume, under ddp and fsdp. Skipped where there is no GPU (CI
and the dev machines here).

The resume is checked as the CPU tests check it: the same sample ids at every step, and the
per-step losses bitwise equal (deterministic kernels are on: CUBLAS_WORKSPACE_CONFIG and
torch.use_deterministic_algorithms in trainers/loop.py).

Run: .venv/bin/python -m pytest tests/gpu -q -s
"""

import json

import pytest
import torch

from ray_job import launcher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
WORKERS = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _run(tmp_path, strategy, *extra):
    p = launcher.run(["--config", "test", "--storage", tmp_path / "ckpt",
                      "--set", f"data.path={tmp_path / 'data'}", "--set", "scaling.use_gpu=true",
                      "--set", "train.mixed_precision=bf16", "--set", "train.grad_accum_steps=2",
                      "--set", f"train.strategy={strategy}", "--num-workers", WORKERS, *extra], timeout=900)
    assert p.rc == 0, p.out[-4000:]
    return p.out


def _metrics(tmp_path, run, name):
    return json.loads((tmp_path / "ckpt" / run / name / "training_metrics.json").read_text())


def _ids(folder):
    by_step = {}
    for f in sorted(folder.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if r["event"] == "batch":
                by_step[(r["step"], f.stem)] = r["ids"]  # the last attempt of a step counts
    return by_step


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gpu_bf16_checkpoint_and_resume_bitwise(tmp_path, strategy):
    print(f"\nGPU test ({strategy}): {WORKERS} worker(s) on {torch.cuda.device_count()} GPU(s)"
          + ("; only one GPU here: NCCL is not exercised between devices" if WORKERS < 2 else ""))
    _run(tmp_path, strategy, "--run-name", "straight", "--audit-dir", tmp_path / "a-straight")
    _run(tmp_path, strategy, "--run-name", "chain", "--max-steps", 16, "--audit-dir", tmp_path / "a-chain1")
    out = _run(tmp_path, strategy, "--run-name", "chain", "--resume", "latest", "--audit-dir", tmp_path / "a-chain2")
    assert "✅ Resumed from checkpoint: checkpoint-epoch0-step16-files4" in out
    final = "checkpoint-epoch1-step40-files4"
    a, b = _metrics(tmp_path, "straight", final), _metrics(tmp_path, "chain", final)
    chain_ids = {**_ids(tmp_path / "a-chain1"), **_ids(tmp_path / "a-chain2")}
    assert _ids(tmp_path / "a-straight") == chain_ids  # the same samples at every step, every rank
    la = torch.tensor([v for _, v in a["loss_history"]])
    lb = torch.tensor([v for _, v in b["loss_history"]])
    print(f"GPU resume ({strategy}): bitwise equal losses = {torch.equal(la, lb)}; "
          f"max |diff| = {(la - lb).abs().max():.3g}")
    assert a["loss_history"] == b["loss_history"], "resumed GPU run is not bitwise equal to the straight run"
    assert a["lr_history"] == b["lr_history"]
