"""What a user watches while training: scalars through Accelerate's trackers (`log_with`,
`init_trackers`, `accelerator.log`), TensorBoard by default (`logging.trackers`). Rank 0 logs.

Where the TensorBoard event files go: `{run}/tensorboard/` for a run on local disk, so
`tensorboard --logdir {storage}/{run}` shows it live; for a run on gs:// they are written on
rank 0's node ({tmp}/ray-train-resume-tensorboard/{run key}/{launch}/tensorboard/) and copied
into `{run}/tensorboard/` after every committed checkpoint and at the end.

One curve across stops and resumes: every attempt writes a new event file whose purge step is
the step it starts from + 1, so TensorBoard hides what earlier files logged past that step
(steps a crash re-trains after the checkpoint): each step shows once.

What is logged, every train.log_every steps: train/loss, train/lr, train/grad_norm (before
clipping), perf/tokens_per_s, perf/samples_per_s, perf/data_wait_s and perf/compute_s (per
step, averaged since the last log), perf/mfu on GPU; val/loss at validation steps; per
checkpoint, checkpoint/stall_s (the loop blocked) and checkpoint/upload_s (written, hashed,
uploaded, committed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import threading
import time

import pyarrow.fs as pafs

from configs.schema import Config
from storage.location import Location, join
from trainers.logs import say

MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
           "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}
FOLDER = "tensorboard"

# Dense bf16 peak FLOP/s of one GPU, by the name CUDA reports (MFU's denominator).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
              "A10G": 125e12, "A10": 125e12, "V100": 125e12, "T4": 65e12}


def missing(trackers: tuple[str, ...]) -> list[str]:
    """The trackers asked for whose package is not installed here (checked before Ray)."""
    return [t for t in trackers if importlib.util.find_spec(MODULES[t]) is None]


def project_dir(run: Location, launch_id: str) -> str:
    """Accelerate's project_dir: the event files go to {project_dir}/tensorboard/."""
    if run.is_local:
        return run.path
    key = hashlib.sha256(run.uri.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "ray-train-resume-tensorboard", key, launch_id)


def flops_per_token(n_params: int, n_layer: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward and backward) plus attention's
    12 x layers x d_model x seq_len (PaLM's appendix B)."""
    return 6 * n_params + 12 * n_layer * d_model * seq_len


def peak_flops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class Tracking:
    """Rank 0's trackers for one attempt (a no-op elsewhere, or with no trackers)."""

    def __init__(self, cfg: Config, accelerator, run: Location, launch_id: str, rank: int,
                 start_step: int, world: int, n_params: int):
        self.cfg, self.accelerator, self.run = cfg, accelerator, run
        self.rank0 = rank == 0
        self.on = self.rank0 and bool(cfg.logging.trackers)
        self.local = project_dir(run, launch_id)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
        self.world = world
        self.flops = flops_per_token(n_params, cfg.model.n_layer, cfg.model.d_model, cfg.model.seq_len)
        self.peak = peak_flops(accelerator.device) if self.on else None
        self._lock = threading.Lock()  # the writer thread logs checkpoint times and uploads
        self.tokens_per_s: float | None = None
        self._since = time.perf_counter()
        self._steps = 0
        self._wait = self._compute = 0.0
        if not self.on:
            return
        kwargs = {"tensorboard": {"purge_step": start_step + 1, "flush_secs": 10}}
        self.accelerator.init_trackers(FOLDER, init_kwargs=kwargs)

    def step(self, step: int, loss: float, lr: float, grad_norm, wait_s: float, compute_s: float) -> None:
        """Every step (cheap): accumulate; every train.log_every steps: log. grad_norm is a
        callable, read only when logging (a device sync on GPU)."""
        if not self.rank0:  # the progress bar's tokens/s is rank 0's too
            return
        self._steps += 1
        self._wait += wait_s
        self._compute += compute_s
        if step % self.cfg.train.log_every:
            return
        now = time.perf_counter()
        per_s = self._steps / max(now - self._since, 1e-9)
        self.tokens_per_s = per_s * self.tokens_per_step
        values = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm(),
                  "perf/tokens_per_s": self.tokens_per_s,
                  "perf/samples_per_s": per_s * self.cfg.train.global_batch_size,
                  "perf/data_wait_s": self._wait / self._steps, "perf/compute_s": self._compute / self._steps}
        if self.peak:
            values["perf/mfu"] = self.tokens_per_s * self.flops / (self.peak * self.world)
        self._since, self._steps, self._wait, self._compute = now, 0, 0.0, 0.0
        self.log(values, step)

    def log(self, values: dict, step: int) -> None:
        if self.on:
            with self._lock:
                self.accelerator.log(values, step=step)

    def sync(self) -> None:
        """Flush; on gs://, copy the event files into {run}/tensorboard/ (each launch's files
        have names of their own: nothing of another launch is replaced). Best effort: after a
        commit the checkpoint is whole whatever happens here, so a failed copy is a warning and
        the next one (after the next checkpoint, and at the end) copies every file again."""
        if not self.on:
            return
        with self._lock:
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.flush()
            if self.run.is_local:
                return
            dest = self.run.child(FOLDER)
            try:
                self._copy(dest)
            except Exception as e:  # a GCS blip, a full bucket, no permission
                first = (str(e).strip().splitlines() or [""])[0][:200]
                say(f"⚠️  TensorBoard copy to {dest.uri} failed ({type(e).__name__}: {first}); "
                    "retried after the next checkpoint and at the end")

    def _copy(self, dest: Location) -> None:
        source = os.path.join(self.local, FOLDER)
        for root, _, names in os.walk(source):
            for name in names:
                rel = os.path.relpath(os.path.join(root, name), source).replace(os.sep, "/")
                pafs.copy_files(os.path.join(root, name), join(dest.path, rel),
                                source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)

    def end(self, timeout_s: float | None = None) -> None:
        """The last copy, then close the trackers. timeout_s: a stop's time left; a copy still
        running after it is left behind (a storage that stopped answering must not hold the
        job past checkpoint.drain_timeout_s)."""
        if not self.on:
            return
        copy = threading.Thread(target=self.sync, name="tensorboard-copy", daemon=True)
        copy.start()
        copy.join(timeout_s)
        if copy.is_alive():
            say(f"⚠️  TensorBoard copy to {self.run.child(FOLDER).uri} did not finish in {timeout_s:g}s; "
                "the event files stay on rank 0's node")
            return
        self.accelerator.end_training()
        if not self.run.is_local:
            shutil.rmtree(self.local, ignore_errors=True)
