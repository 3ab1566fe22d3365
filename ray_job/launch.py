"""Start or join Ray and run the TorchTrainer."""

from __future__ import annotations

import functools
import logging
import math
import os

# Ray 2.60 clusters use token auth, and Ray reads RAY_AUTH_MODE when it is imported: a client
# joining a `ray start` cluster on this machine needs it set first (the token is in ~/.ray).
if (os.environ.get("RAY_ADDRESS") and "RAY_AUTH_MODE" not in os.environ
        and os.path.exists(os.path.expanduser("~/.ray/auth_token"))):
    os.environ["RAY_AUTH_MODE"] = "token"

import ray  # noqa: E402
from ray.data import ExecutionOptions  # noqa: E402
from ray.train import (  # noqa: E402
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from configs.schema import Config
from storage import gcs
from storage.location import Location
from trainers.dataset import train_dataset
from trainers.elastic import ElasticHooks
from trainers.launch_plan import LaunchPlan
from trainers.loop import train_loop

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def init_ray(cfg: Config, verbose: bool = False) -> None:
    """Join RAY_ADDRESS's cluster if set (as `ray job submit` does), else start a local Ray.

    Quiet unless verbose: the service's own lines, the progress bar and warnings, not Ray's
    INFO chatter (Ray Data's execution plans and progress bars, Train's per-rank
    "Reporting training result" lines: see fit() and trainers/logs.py).
    """
    if ray.is_initialized():
        return
    env = {} if verbose else {"RAY_DATA_LOG_LEVEL": "WARNING"}  # Ray Data's loggers, every process
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # a submitted job ships its working dir
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    if os.environ.get("RAY_ADDRESS"):
        # Train's PlacementGroupCleaner asks Ray's state API for "the" cluster: with two Ray
        # instances on a machine it cannot tell which and its monitor thread dies loudly.
        env["RAY_ADDRESS"] = os.environ["RAY_ADDRESS"]
    if gcs.emulator_host():  # workers must see the same GCS as the driver
        env[gcs.EMULATOR_HOST] = gcs.emulator_host()
    runtime_env = {"env_vars": env} if env else None
    quiet = {} if verbose else {"logging_level": logging.WARNING}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=True, **quiet)
    else:
        # Logical CPUs: the workers' plus Ray Data's; on a 2-core machine the workers alone
        # would take them all and iteration would hang.
        cpus = max(os.cpu_count() or 1,
                   math.ceil(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.scaling.data_cpus))
        # With the dashboard up, Ray's state API answers Train's PlacementGroupCleaner; without
        # it the cleaner warns "Failed to query Ray Train Controller actor state" every few
        # seconds. Port 0: any free one, so two local jobs never collide.
        ray.init(num_cpus=cpus, runtime_env=runtime_env, include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=0, log_to_driver=True, **quiet)
    if not verbose:
        _drop_ray_noise()


# Lines Ray's processes print on every run that tell a user nothing they can act on (--verbose
# keeps them): Ray Train's PreemptionWatcher actor trips a core-worker check about its
# constructor arguments; Ray Data announces that its progress bars are off (we turn them off).
NOISE = ("has constructor arguments in the object store and max_restarts > 0",
         "Progress bars disabled. To enable, set")


def _drop_ray_noise() -> None:
    """Filter the worker log lines Ray forwards to this driver (its stdstream dispatcher: a
    private API, so any change in it leaves Ray's own printing in place)."""
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        print_to_stdstream = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):
        return

    def filtered(data):
        if data.get("actor_name") == "PlacementGroupCleaner" and any(
                "Found multiple active Ray instances" in line for line in data.get("lines", [])):
            return  # its monitor thread dies when two Rays run on a machine; training is unaffected
        lines = [line for line in data.get("lines", []) if not any(n in line for n in NOISE)]
        if lines:
            print_to_stdstream({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)


def fit(cfg: Config, run: Location, storage: Location, plan: LaunchPlan, verbose: bool = False):
    if cfg.scaling.elastic:  # Ray Train hands this variable on to its controller
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", f"{cfg.scaling.restart_wait_s:g}")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=plan,
        # A callable: rebuilt on every worker-group start, from the checkpoint the loop restores.
        datasets={"train": functools.partial(train_dataset, plan)},
        # preserve_order: read tasks' blocks keep the global order and the split deals them
        # round-robin (data/stream.py); the loop checks every batch's positions.
        dataset_config=DataConfig(datasets_to_split=["train"],
                                  execution_options=ExecutionOptions(preserve_order=True)),
        scaling_config=ScalingConfig(
            # a (min, max) range: Ray's elastic group (trainers/elastic.py)
            num_workers=(cfg.scaling.min_workers, cfg.scaling.num_workers) if cfg.scaling.elastic
            else cfg.scaling.num_workers,
            elastic_resize_monitor_interval_s=cfg.scaling.resize_check_s,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.worker_resources},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage.path,
            storage_filesystem=storage.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # retention: ours, not Ray's
            # elastic: a lost node restarts the group smaller (unlimited, unless max_failures says)
            failure_config=FailureConfig(max_failures=-1 if cfg.scaling.elastic and not cfg.checkpoint.max_failures
                                         else cfg.checkpoint.max_failures),
            # the stream built for each group's size; a resize saves the step in progress first
            callbacks=[ElasticHooks(plan)],
            logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        ),
    )
    return trainer.fit()
