"""A graceful stop, asked by the driver and seen by every rank at the same step.

The driver (Ctrl-C, SIGTERM: what `ray job stop` sends) puts a key in Ray's key-value store,
in the GCS every process of the job reaches. Rank 0 reads it once a step; every rank learns it
from the step's loss all-reduce, which carries the flag beside the loss (no extra collective),
so all ranks stop after the same step, then finish the checkpoints already saved.

Rank 0 also records each checkpoint name it saves, one key per name, so that every way the
driver ends (failed, stopped, stopped at once, lease lost) can say which saved checkpoints stay
incomplete: every attempt's, as Ray restarts the workers (a new attempt adds its own keys and
never replaces an earlier attempt's record).
"""

from __future__ import annotations

from storage.names import CheckpointName

NAMESPACE = "ray_train_resume"


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def request(launch_id: str) -> None:
    _kv()._internal_kv_put(f"stop/{launch_id}", b"1", overwrite=True, namespace=NAMESPACE)


def requested(launch_id: str) -> bool:
    return _kv()._internal_kv_get(f"stop/{launch_id}", namespace=NAMESPACE) is not None


def record_saved(launch_id: str, name: str) -> None:
    _kv()._internal_kv_put(f"saved/{launch_id}/{name}", b"1", overwrite=True, namespace=NAMESPACE)


def record_committed(launch_id: str, name: str) -> None:
    _kv()._internal_kv_put(f"committed/{launch_id}/{name}", b"1", overwrite=True, namespace=NAMESPACE)


def saved(launch_id: str) -> list[str]:
    """Every checkpoint this launch's rank 0 saved, in every attempt, oldest first."""
    return _names("saved", launch_id)


def committed(launch_id: str) -> list[str]:
    """Those this launch committed (retention may have deleted some since)."""
    return _names("committed", launch_id)


def uncommitted(launch_id: str) -> list[str]:
    """Saved and not (known to be) committed: what an exit names, once storage confirms."""
    done = set(committed(launch_id))
    return [n for n in saved(launch_id) if n not in done]


def _names(kind: str, launch_id: str) -> list[str]:
    prefix = f"{kind}/{launch_id}/"
    try:
        keys = _kv()._internal_kv_list(prefix, namespace=NAMESPACE)
    except Exception:  # Ray already gone: nothing to say
        return []
    names = {(k.decode() if isinstance(k, bytes) else k)[len(prefix):] for k in keys}
    return sorted(names, key=lambda n: CheckpointName.parse(n).sort_key)
