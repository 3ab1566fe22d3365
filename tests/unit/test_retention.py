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


def test_a_non_numeric_validation_loss_is_kept_and_never_ranked():
    cands = [c(10, float("nan")), c(20, "low"), c(30, float("inf")), c(40, 0.5), c(50, 0.4), c(60, 0.9)]
    deleted = which_to_delete(cands, Policy(keep_last=1, keep_best=1))
    assert names(deleted) == [40]  # 60 newest, 50 best; 10, 20, 30 cannot be ranked: kept


def test_apply_logs_a_non_numeric_metric_and_keeps_the_checkpoint(tmp_path):
    import os

    from storage import manifest
    from storage.location import resolve
    from storage.retention import apply

    run = resolve(str(tmp_path / "run"))
    for step, val in ((8, float("nan")), (16, 0.5), (24, 0.4)):
        name = str(CheckpointName(epoch=0, step=step, files=0))
        folder = tmp_path / "run" / name
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"w")
        meta = {"step": step, "epoch": 0, "samples_in_epoch": 0, "files_processed": 0,
                "world_size": 1, "global_batch_size": 1, "val_loss": val,
                "config": {"model": {}}, "data_index": {"files": ["a"], "rows": [100]}}
        meta = manifest.write_metadata(str(folder), meta)
        for rel in manifest.loaded_files(1):
            if rel not in meta["files"]:
                (folder / rel).write_bytes(b"x")
        manifest.write_metadata(str(folder), meta)
        assert manifest.check(run.child(name)).ok, manifest.check(run.child(name)).reason
    said = []
    deleted = apply(run, Policy(keep_last=1), log=said.append)
    assert deleted == ["checkpoint-epoch0-step16-files0"]
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-epoch0-step24-files0",
                                                     "checkpoint-epoch0-step8-files0"]
    assert len(said) == 1 and "keeps checkpoint-epoch0-step8-files0: its val_loss nan" in said[0]
