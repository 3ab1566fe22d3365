"""A graceful stop, asked by the driver and seen by every rank at the same step.

The driver (Ctrl-C, SIGTERM: what `ray job stop` sends) puts a key in Ray's key-value store,
in the GCS every process of the job reaches. Rank 0 reads it once a step; every rank learns it
from the step's loss all-reduce, which carries the flag beside the loss (no extra collective),
so all ranks stop after the same step, then finish the checkpoints already saved.

Rank 0 also records each checkpoint name it saves, so that a driver stopped at once can say
which saved checkpoints stay incomplete.
"""

from __future__ import annotations

import json

NAMESPACE = "ray_train_resume"


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def request(launch_id: str) -> None:
    _kv()._internal_kv_put(f"stop/{launch_id}", b"1", overwrite=True, namespace=NAMESPACE)


def requested(launch_id: str) -> bool:
    return _kv()._internal_kv_get(f"stop/{launch_id}", namespace=NAMESPACE) is not None


def record_saved(launch_id: str, names: list[str]) -> None:
    _kv()._internal_kv_put(f"saved/{launch_id}", json.dumps(names).encode(), overwrite=True,
                           namespace=NAMESPACE)


def saved(launch_id: str) -> list[str]:
    try:
        raw = _kv()._internal_kv_get(f"saved/{launch_id}", namespace=NAMESPACE)
    except Exception:  # Ray already gone: nothing to say
        return []
    return json.loads(raw) if raw else []
