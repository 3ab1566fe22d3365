"""The train set Ray Train hands the workers: the Ray Data stream of data/stream.py, built from
the checkpoint the attempt resumes from and for the size of the group Ray is starting."""

from __future__ import annotations

import numpy as np
import ray.data

from data.order import shuffle_window
from data.stream import SCHEMA, Stream
from trainers import source
from trainers.elastic import group_size
from trainers.launch_plan import LaunchPlan


def train_dataset(plan: LaunchPlan):
    """`TorchTrainer(datasets={"train": ...})`: Ray Train calls this on every worker-group
    start (train/v2/_internal/callbacks/datasets.py), so an in-run retry or a resize rebuilds the
    stream from the same checkpoint the loop restores (trainers/source.py decides for both),
    for the size of the group being started."""
    ray.data.DataContext.get_current().enable_progress_bars = plan.verbose  # this process builds it
    stream = stream_for(plan)
    return ray.data.from_arrow(SCHEMA.empty_table()) if stream is None else stream.dataset()


def stream_for(plan: LaunchPlan) -> Stream | None:
    """The stream from the attempt's resume point to max_steps, dealt to the group Ray is
    starting (trainers/elastic.py); None when there is nothing left to train."""
    cfg = plan.config
    start = source.choose(plan)
    step, epoch, cursor = (start.step, start.epoch, start.samples_in_epoch) if start else (0, 0, 0)
    steps = cfg.train.max_steps - step
    if steps <= 0:
        return None
    return Stream(
        data_uri=cfg.data.path, index=plan.data_index, seed=cfg.data.shuffle_seed,
        global_batch=cfg.train.global_batch_size, world=group_size(plan),
        row_bytes=(cfg.model.seq_len + 1) * np.dtype(plan.token_dtype).itemsize,
        epoch=epoch, cursor=cursor, steps=steps,
        steps_per_block=cfg.data.steps_per_block, audit_dir=plan.audit_dir,
        window=shuffle_window(cfg, plan.token_dtype),
    )
