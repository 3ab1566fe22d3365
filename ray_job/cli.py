"""Command-line flags and the resolved config. Flags beat the preset; --set beats flags."""

from __future__ import annotations

import argparse

from configs import Config, ConfigError, load, merge, parse_set, with_overrides

# Each flag that sets a config key: the parser, the overrides and the error names come from here.
FLAGS = {
    "--max-steps": ("train.max_steps", int, "stop at this optimizer step"),
    "--storage": ("checkpoint.storage", str, "local folder or gs://bucket/prefix for checkpoints"),
    "--run-name": ("checkpoint.run_name", str, "the run's folder under --storage (default: config name)"),
    "--num-workers": ("scaling.num_workers", int, "Ray Train workers (the most, with --min-workers)"),
    "--min-workers": ("scaling.min_workers", int,
                      "spot capacity: train on as few as N workers while nodes are missing (elastic)"),
    "--checkpoint-every": ("checkpoint.every", int, "save every N steps"),
    "--max-failures": ("checkpoint.max_failures", int,
                       "worker-group restarts Ray may do (resuming from this run's latest checkpoint)"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        self.exit(2, f"error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ray_job.train",
                description="Train on Ray with named, exactly resumable checkpoints.")
    p.add_argument("--config", default="test", help="preset (test, production) or a YAML file")
    p.add_argument("--resume", help="checkpoint name in this run, 'latest', or a full path/URI")
    for flag, (key, kind, text) in FLAGS.items():
        p.add_argument(flag, type=kind, help=f"{text} ({key})")
    p.add_argument("--init-from", metavar="PATH_OR_URI",
                   help="a fresh run starts from these weights (a safetensors file: `checkpoints "
                        "export`'s model.safetensors); ignored when resuming")
    p.add_argument("--allow-new-global-batch", action="store_true",
                   help="resume with a different train.global_batch_size on purpose")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own logs (Train's reports, Ray Data's plans and progress)")
    p.add_argument("--audit-dir", help="local folder for a per-rank audit trail of sample ids "
                                       "and opened files")
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    """The preset or YAML file, then the flags, then --set; validated once, at the end."""
    cfg = load(args.config)
    if args.run_name == "":  # the config's default would be used silently
        raise ConfigError("--run-name (checkpoint.run_name): must not be empty; omit the flag to "
                          "use the config's name")
    flags: dict = {}
    for flag, (key, _, _) in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            section, name = key.split(".")
            flags.setdefault(section, {})[name] = value
    try:
        return with_overrides(cfg, merge(flags, parse_set(args.set)))
    except ConfigError as e:
        msg = str(e)
        for flag, (key, _, _) in FLAGS.items():
            if msg.startswith(key + ":"):
                msg = f"{flag} ({key}){msg[len(key):]}"
        raise ConfigError(msg) from None
