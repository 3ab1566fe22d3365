"""trainers/stopping.py's record of what rank 0 saved, kept across a launch's attempts (issue
23, item 4): after Ray restarts the workers, the driver still names what an earlier attempt
saved. Ray's key-value store is stood in for by a dict with its put/get/keys semantics."""

from __future__ import annotations

import pytest

from trainers import stopping


class _KV:
    """ray.experimental.internal_kv's calls stopping.py makes, over a dict."""

    def __init__(self):
        self.data: dict[tuple[str, bytes], bytes] = {}

    @staticmethod
    def _key(key) -> bytes:
        return key.encode() if isinstance(key, str) else key

    def _internal_kv_put(self, key, value, overwrite=True, *, namespace=None):
        k = (namespace, self._key(key))
        if overwrite or k not in self.data:
            self.data[k] = value
        return k in self.data

    def _internal_kv_get(self, key, *, namespace=None):
        return self.data.get((namespace, self._key(key)))

    def _internal_kv_list(self, prefix, *, namespace=None):
        return [k for ns, k in self.data if ns == namespace and k.startswith(self._key(prefix))]


@pytest.fixture
def kv(monkeypatch):
    store = _KV()
    monkeypatch.setattr(stopping, "_kv", lambda: store)
    return store


def test_every_attempts_saved_checkpoints_are_kept_in_step_order(kv):
    first = ["checkpoint-epoch0-step4-files1", "checkpoint-epoch0-step8-files2"]
    for name in first:  # attempt 1, then Ray restarts the workers from step 4
        stopping.record_saved("L", name)
    for name in ["checkpoint-epoch0-step8-files2", "checkpoint-epoch0-step12-files3"]:  # attempt 2
        stopping.record_saved("L", name)
    stopping.record_saved("other-launch", "checkpoint-epoch0-step16-files4")
    assert stopping.saved("L") == first + ["checkpoint-epoch0-step12-files3"]


def test_what_was_committed_is_not_named_even_after_retention_deleted_it(kv):
    for name in ["checkpoint-epoch0-step4-files1", "checkpoint-epoch0-step8-files2",
                 "checkpoint-epoch0-step12-files3"]:
        stopping.record_saved("L", name)
    stopping.record_committed("L", "checkpoint-epoch0-step4-files1")  # since deleted by retention
    stopping.record_committed("L", "checkpoint-epoch0-step12-files3")
    assert stopping.uncommitted("L") == ["checkpoint-epoch0-step8-files2"]


def test_nothing_saved_and_ray_gone_say_nothing(kv, monkeypatch):
    assert stopping.saved("L") == []

    def gone():
        raise RuntimeError("Ray is not initialized")

    monkeypatch.setattr(stopping, "_kv", gone)
    assert stopping.saved("L") == []
