"""Elastic worker ranges (issue 22), the parts that need no cluster: which ranges keep the global
batch, and the train stream built for the size of the group Ray is starting."""

from __future__ import annotations

import dataclasses
import types

import pytest

from configs import load
from configs.schema import ConfigError
from data.index import DataIndex
from ray_job.cli import parser, resolve_config
from trainers import dataset, elastic
from trainers.launch_plan import LaunchPlan


def cli(*argv):
    return resolve_config(parser().parse_args(list(argv)))


def test_a_range_whose_every_size_divides_the_global_batch_is_elastic():
    cfg = cli("--config", "test", "--min-workers", "1", "--num-workers", "2")
    assert cfg.scaling.elastic and list(cfg.scaling.sizes) == [1, 2]
    assert not load("test").scaling.elastic and list(load("test").scaling.sizes) == [2]
    # min_workers == num_workers: a fixed size, as 0
    assert not cli("--config", "test", "--min-workers", "2").scaling.elastic


@pytest.mark.parametrize("argv, size", [
    (["--min-workers", "1", "--num-workers", "4"], 3),  # G 16: 3 workers cannot keep it
    (["--min-workers", "2", "--num-workers", "8", "--set", "train.grad_accum_steps=2"], 3),
    (["--min-workers", "5", "--num-workers", "8"], 5),
])
def test_a_range_holding_a_size_that_cannot_keep_the_global_batch_is_refused(argv, size):
    with pytest.raises(ConfigError) as e:
        cli("--config", "test", *argv)
    message = str(e.value)
    assert message.startswith("--min-workers (scaling.min_workers): at ")
    assert f"at {size} workers the global batch cannot be kept" in message


def test_min_workers_outside_the_range_is_refused():
    with pytest.raises(ConfigError, match="scaling.min_workers"):
        cli("--config", "test", "--min-workers", "3")
    with pytest.raises(ConfigError, match="scaling.worker_resources"):
        cli("--config", "test", "--set", 'scaling.worker_resources={"CPU": 1}')


def _plan(tmp_path, *argv, launch="L" * 32) -> LaunchPlan:
    cfg = cli("--config", "test", *argv)
    index = DataIndex(tuple(f"/data/train/part-{i}.parquet" for i in range(6)), (64,) * 6)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path="/data"))
    return LaunchPlan(config=cfg, launch_id=launch, run_uri=str(tmp_path / "run"), data_index=index)


def test_the_stream_is_dealt_to_the_group_ray_starts(tmp_path):
    plan = _plan(tmp_path, "--min-workers", "1", "--num-workers", "2", launch="A" * 32)
    hooks = elastic.ElasticHooks(plan)
    for size in (2, 1, 2):
        hooks.before_worker_group_start(types.SimpleNamespace(num_workers=size))
        stream = dataset.stream_for(plan)
        assert stream.world == size and stream.global_batch == 16  # the global batch is kept


def test_an_elastic_stream_never_guesses_the_size(tmp_path):
    plan = _plan(tmp_path, "--min-workers", "1", "--num-workers", "2", launch="B" * 32)
    with pytest.raises(RuntimeError, match="without telling its size"):
        dataset.stream_for(plan)
    fixed = _plan(tmp_path, launch="C" * 32)
    assert dataset.stream_for(fixed).world == 2


def test_a_resize_is_noticed_only_for_a_running_group(tmp_path, monkeypatch):
    plan = _plan(tmp_path, "--min-workers", "1", "--num-workers", "2", launch="D" * 32)
    hooks = elastic.ElasticHooks(plan)
    asked = []
    monkeypatch.setattr(elastic, "save_before_resize", lambda p, n: asked.append(n))
    decision = types.SimpleNamespace(num_workers=2)
    hooks.before_controller_execute_resize_decision(decision)  # the first start
    assert asked == []
    ResizingState = type("ResizingState", (), {})
    hooks.after_controller_state_update(object(), ResizingState())
    hooks.before_controller_execute_resize_decision(decision)
    assert asked == [2]
    hooks.before_controller_execute_resize_decision(decision)  # a restart after it
    assert asked == [2]
