"""What a worker prints: the service's lines and the progress bar; Ray's INFO chatter only with
--verbose."""

from __future__ import annotations

import logging
import sys


def say(message: str) -> None:
    """A line on stdout, in order with the progress bar. Not print(): Ray Train patches print
    to log *and* tee to stdout, so lines showed twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def quiet_ray(verbose: bool) -> None:
    """Ray Train logs "Reporting training result ..." for every report on every rank through a
    logger named by its file path (logging.getLogger(__file__) in execution/context.py), so
    RunConfig's LoggingConfig, which filters "ray.train.*", does not reach it."""
    if verbose:
        return
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
