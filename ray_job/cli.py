"""Command-line flags and the resolved config. Flags beat the preset; --set beats flags."""

from __future__ import annotations

import argparse

from configs import load, with_overrides
from configs.schema import Config, ConfigError, _merge, parse_set


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        self.exit(2, f"error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ray_job.train",
                description="Train on Ray with named, exactly resumable checkpoints.")
    p.add_argument("--config", default="test", help="preset (test, production) or a YAML file")
    p.add_argument("--resume", help="checkpoint name in this run, 'latest', or a full path/URI")
    p.add_argument("--max-steps", type=int, help="stop at this optimizer step")
    p.add_argument("--storage", help="local folder or gs://bucket/prefix for checkpoints")
    p.add_argument("--run-name", help="the run's folder under --storage (default: config name)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers")
    p.add_argument("--checkpoint-every", type=int, help="save every N steps")
    p.add_argument("--max-failures", type=int,
                   help="worker-group restarts Ray may do (resuming from this run's latest checkpoint)")
    p.add_argument("--allow-new-global-batch", action="store_true",
                   help="resume with a different train.global_batch_size on purpose")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--audit-dir", help="local folder for a per-rank audit trail of sample ids "
                                       "and opened files")
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    cfg = load(args.config)
    flags: dict = {}
    if args.max_steps is not None:
        flags.setdefault("train", {})["max_steps"] = args.max_steps
    if args.storage is not None:
        flags.setdefault("checkpoint", {})["storage"] = args.storage
    if args.run_name == "":  # the config's default would be used silently
        raise ConfigError("--run-name (checkpoint.run_name): must not be empty; omit the flag to "
                          "use the config's name")
    if args.run_name is not None:
        flags.setdefault("checkpoint", {})["run_name"] = args.run_name
    if args.num_workers is not None:
        flags.setdefault("scaling", {})["num_workers"] = args.num_workers
    if args.max_failures is not None:
        flags.setdefault("checkpoint", {})["max_failures"] = args.max_failures
    if args.checkpoint_every is not None:
        flags.setdefault("checkpoint", {})["every"] = args.checkpoint_every
    try:
        return with_overrides(cfg, _merge(flags, parse_set(args.set)))  # validated once, at the end
    except ConfigError as e:
        flag = {"train.max_steps": "--max-steps", "scaling.num_workers": "--num-workers",
                "checkpoint.every": "--checkpoint-every", "checkpoint.max_failures": "--max-failures",
                "checkpoint.run_name": "--run-name"}
        msg = str(e)
        for key, name in flag.items():
            if msg.startswith(key + ":"):
                msg = f"{name} ({key}){msg[len(key):]}"
        raise ConfigError(msg) from None
