"""Every benchmark script runs end to end in --quick mode and prints its ratios (no timing
targets are asserted here: those belong to benchmarks/RESULTS.md, measured side by side)."""

import subprocess
import sys

import pytest
import torch

from ray_job import launcher
from ray_job.launcher import REPO

SCRIPTS = {
    "bench_resume_skip.py": ["skip_first_batches@90% / ours@90%:", "ours@90% / ours@0%:"],
    "bench_training.py": ["ratio", "job start -> first step"],  # --quick: no resumed job
    "bench_checkpoint.py": ["async/sync"],  # --quick: part 1 only
    "bench_sharded.py": ["max per rank / state", "fsdp / ddp", "async stall / sync save"],
    "bench_gpu.py": ["tokens/s" if torch.cuda.is_available() else "skipped: no CUDA GPU"],
    "bench_ingest.py": ["successor share window", "rows decoded but not trained",
                        "W=2: Ray Data path 1.00   per-rank reader 2.00",
                        "W=4: Ray Data path 1.00   per-rank reader 4.00",
                        "start@90% / start@0%:", "ingest / loop rows/s per rank:"],
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_quick(script, ray_address):
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick"], cwd=REPO,
                       env=launcher.env(BENCH_RAY_ADDRESS=ray_address), capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    for marker in SCRIPTS[script]:
        assert marker in p.stdout, p.stdout
