"""The launch plan (`python -m ray_job.plan`): train's checks before Ray, dry (nothing written),
the lease read and not taken, the per-GPU memory of one traced step and its verdict: exit 0
fits, 1 does not fit, 2 bad input. The production preset fits cluster.yaml's A100 40GB."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import types

import pytest

import ray_job
from configs import load, with_overrides
from ray_job import plan, train
from storage.lease import LEASE

PEAK = re.compile(r"^Peak per GPU: ([\d.]+) GB of (\d+) GB: (fits|does not fit)$")


def _args(tmp_path, *extra):
    return ["--config", "test", "--storage", str(tmp_path / "runs"), "--set",
            f"data.path={tmp_path / 'data'}", *extra]


@pytest.mark.slow  # about 20 s of CPU: the 3B model's step, traced
def test_production_fits_on_8_a100_40gb(capsys):
    """On a laptop: its buckets are shown as not checked, the step of the 3B model is traced
    (FakeTensorMode, 8 fake ranks, bf16, activation checkpointing) and its peak is <= 36 GB."""
    started = time.time()
    assert plan.main(["--config", "production"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    m = PEAK.match(lines[-1])
    assert m and m.group(2) == "40" and m.group(3) == "fits", lines[-1]
    assert float(m.group(1)) <= 36.0
    assert re.search(r"--storage +not checked: gs://my-training-checkpoints/runs/production: ", out)
    assert re.search(r"data.path +not checked: gs://my-training-data/corpus: ", out)
    assert "8 x fsdp on nvidia-tesla-a100, bf16, activation checkpointing" in out
    assert "4 micro-batch(es) of 8 x 2048 tokens" in out
    assert time.time() - started < 240


def test_a_fresh_test_run_plans_without_writing_anything(tmp_path, capsys):
    """The corpus is not there yet (train would prepare it): not checked; the storage folder is
    not made; the lease is free and stays absent."""
    assert plan.main(_args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "holds no corpus yet; train prepares the test corpus there first" in out
    assert re.search(r"lease +free", out)
    assert out.strip().splitlines()[-1].startswith("Peak per worker: ")
    assert not os.listdir(tmp_path)  # neither runs/ nor data/ was made


def test_a_live_lease_is_read_not_taken_and_refused(tmp_path, capsys):
    run = tmp_path / "runs" / "test"
    run.mkdir(parents=True)
    holder = {"format": 1, "launch_id": "other", "host": "elsewhere", "pid": 1, "started_at": time.time(),
              "heartbeat": time.time(), "write_id": "w"}
    (run / LEASE).write_text(json.dumps(holder))
    before = (run / LEASE).read_bytes()
    assert plan.main(_args(tmp_path)) == 2
    captured = capsys.readouterr()
    assert "in use by another launch (host elsewhere, pid 1" in captured.err
    assert (run / LEASE).read_bytes() == before


@pytest.mark.parametrize("extra, message", [
    (["--set", "train.activation_checkpointing=some"], "train.activation_checkpointing: must be 'none' or 'full'"),
    (["--set", "scaling.gpu=rtx-9000"], "scaling.gpu: 'rtx-9000' is not a GPU this knows"),
    (["--resume", "latest"], "--resume latest"),
])
def test_bad_input_is_2_with_one_line(tmp_path, capsys, extra, message):
    assert plan.main(_args(tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_gpu_run_that_does_not_fit_is_1(tmp_path, capsys):
    args = _args(tmp_path, "--set", "scaling.use_gpu=true", "--set", "scaling.gpu_memory_gb=0.01")
    assert plan.main(args) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"Peak per GPU: 0\.0 GB of 0\.01 GB: does not fit", last), last


def test_train_warns_before_ray_when_a_gpu_run_does_not_fit(monkeypatch, tmp_path, capsys):
    cfg = with_overrides(load("test"), {"scaling": {"use_gpu": True, "gpu_memory_gb": 0.01},
                                        "checkpoint": {"storage": str(tmp_path / "runs")}})
    from storage.location import resolve

    started = types.SimpleNamespace(ray=False)
    monkeypatch.setattr(train, "prepare", lambda argv: (cfg, resolve(str(tmp_path / "runs")),
                                                        resolve(str(tmp_path / "runs" / "test")),
                                                        types.SimpleNamespace(launch_id="x", resume=None,
                                                                              verbose=False)))
    fake = types.ModuleType("ray_job.launch")

    def init_ray(cfg, **kw):
        started.ray = True
        raise RuntimeError("stop here")

    fake.init_ray = init_ray
    monkeypatch.setitem(sys.modules, "ray_job.launch", fake)
    monkeypatch.setattr(ray_job, "launch", fake, raising=False)
    assert train.main([]) == 1
    err = capsys.readouterr().err
    assert "⚠️  Peak per GPU: 0.0 GB of 0.01 GB: does not fit: expect CUDA out of memory" in err
    assert err.index("does not fit") < err.index("Ray did not start") and started.ray


def test_an_elastic_range_is_traced_at_its_smallest_group(tmp_path, capsys):
    """The global batch is kept at every size: the fewest workers hold the most per GPU."""
    assert plan.main(_args(tmp_path, "--set", "scaling.min_workers=1", "--set", "train.strategy=fsdp")) == 0
    out = capsys.readouterr().out
    assert "1..2 (elastic) x fsdp on CPU" in out
    assert "Memory per rank (traced: 1 ranks, micro-batch 16, the smallest group of" in out
