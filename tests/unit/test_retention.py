"""Retention is a pure function: tested without Ray or storage."""

from storage.names import CheckpointName
from storage.retention import Candidate, Policy, which_to_delete


def c(step, val=None, complete=True):
    return Candidate(CheckpointName(epoch=step // 100, step=step, files=0), complete, val)


def names(xs):
    return sorted(x.step for x in xs)


def test_keep_everything_by_default():
    assert which_to_delete([c(1), c(2), c(3)], Policy()) == []


def test_keep_newest_by_number_not_string():
    cands = [c(9), c(10), c(100), c(99)]
    assert names(which_to_delete(cands, Policy(keep_last=2))) == [9, 10]


def test_best_by_validation_loss_and_protected_survive():
    cands = [c(10, 0.5), c(20, 0.2), c(30, 0.9), c(40, 0.8), c(50, 0.7)]
    deleted = which_to_delete(cands, Policy(keep_last=1, keep_best=1, protect=frozenset({str(c(30).name)})))
    assert names(deleted) == [10, 40]  # 50 newest, 20 best, 30 resumed from


def test_incomplete_never_deleted_and_never_counted_as_newest():
    cands = [c(10), c(20), c(30, complete=False)]
    assert names(which_to_delete(cands, Policy(keep_last=1))) == [10]


def test_latest_complete_always_kept_even_with_best():
    cands = [c(10, 0.1), c(20, 0.9)]
    assert names(which_to_delete(cands, Policy(keep_last=1, keep_best=1))) == []
