"""Property 2: across two stops and resumes every sample of an epoch is trained exactly once,
proven from the sample ids each rank logged, in the same order as an uninterrupted run."""

from collections import Counter

import pyarrow.parquet as pq
from conftest import audit


def _batches(records):
    return sorted((r["step"], r["rank"], tuple(r["ids"])) for r in records if r["event"] == "batch")


def test_epoch_zero_every_sample_exactly_once(runs):
    records = [r for seg in ("chain1", "chain2", "chain3") for r in audit(runs.audit / seg)]
    ids = Counter(i for r in records if r["event"] == "batch" and r["epoch"] == 0 for i in r["ids"])
    every = set()
    for f in sorted((runs.data / "train").glob("*.parquet")):
        every |= set(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    assert len(every) == 384
    assert set(ids) == every
    assert set(ids.values()) == {1}


def test_steps_trained_once_and_same_sequence_as_straight(runs):
    chain = _batches(r for seg in ("chain1", "chain2", "chain3") for r in audit(runs.audit / seg))
    straight = _batches(audit(runs.audit / "straight"))
    steps = Counter((s, rank) for s, rank, _ in chain)
    assert set(steps.values()) == {1}, "a step was trained twice across resumes"
    assert sorted({s for s, _, _ in chain}) == list(range(1, 41))
    assert chain == straight
    epoch1 = Counter(i for r in audit(runs.audit / "chain3") if r["event"] == "batch" for i in r["ids"])
    assert set(epoch1.values()) == {1} and len(epoch1) == 16 * 16


def test_batches_mix_the_corpus(runs):
    """data.shuffle=window (the test preset's windows of 32): a global batch is not a run of
    neighbouring samples. Ids are positions in the prepared corpus, so in file order about
    (G-1)/G = 0.94 of a batch's samples have their successor (id + 1) in the same batch."""
    records = [r for r in audit(runs.audit / "straight") if r["event"] == "batch"]
    steps = {}
    for r in records:
        steps.setdefault(r["step"], set()).update(r["ids"])
    share = sum(sum(i + 1 in ids for i in ids) / len(ids) for ids in steps.values()) / len(steps)
    assert len(steps) == 40 and share <= 2 * 16 / 32, share  # target: at most 2 G / window
