"""A resume reads the data at data.path, and only the files it trained on (ray_job/data_check.py
resume_index): the checkpoint's index holds names relative to the data path, sizes and parquet
footer fingerprints; a moved dataset is found, a missing, resized or rewritten file refused
before Ray (exit 2 material: one line naming the file and what differs)."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_job.data_check import resume_index
from ray_job.errors import UserError
from storage.location import resolve
from trainers.data import build_index

CK = "checkpoint-epoch0-step8-files2"


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "corpus"
    (root / "train").mkdir(parents=True)
    for f in range(3):
        table = pa.table({"id": pa.array(range(f * 10, f * 10 + 10), pa.int64()),
                          "tokens": pa.array([bytes([i]) * 5 for i in range(10)], pa.binary())})
        pq.write_table(table, root / "train" / f"part-{f:05d}.parquet", row_group_size=4)
    loc = resolve(str(root))
    return root, build_index(loc.fs, loc.path).to_json()


def test_the_index_is_relative_and_a_moved_dataset_is_found(data, tmp_path):
    root, saved = data
    assert saved["files"] == [f"train/part-{f:05d}.parquet" for f in range(3)]
    assert all(len(h) == 64 for h in saved["footers"]) and len(saved["sizes"]) == 3
    moved = tmp_path / "elsewhere"
    shutil.move(root, moved)
    index = resume_index(resolve(str(moved)), saved, CK)
    assert list(index.files) == [str(moved / "train" / f"part-{f:05d}.parquet") for f in range(3)]
    assert index.to_json() == saved


def _rewrite(path, ids):
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()),
                             "tokens": pa.array([bytes([i % 10]) * 5 for i in range(len(ids))], pa.binary())}),
                   path, row_group_size=4)


@pytest.mark.parametrize("change, words", [
    ("delete", "is missing"),
    ("same rows, other content", "another parquet footer"),
    ("more rows", "bytes, the checkpoint's index"),
    ("not parquet", "does not read as parquet"),
])
def test_a_changed_file_is_refused_naming_it(data, change, words):
    root, saved = data
    path = root / "train" / "part-00001.parquet"
    if change == "delete":
        path.unlink()
    elif change == "same rows, other content":  # same size, other ids: regenerated in place
        _rewrite(path, list(range(110, 120)))
        assert path.stat().st_size == saved["sizes"][1]
    elif change == "more rows":
        _rewrite(path, list(range(100, 160)))
    else:
        path.write_bytes(b"not parquet")
    with pytest.raises(UserError) as err:
        resume_index(resolve(str(root)), saved, CK)
    message = str(err.value)
    assert "train/part-00001.parquet, which checkpoint-epoch0-step8-files2 trained on," in message
    assert words in message and "\\n" not in message, message


def test_an_index_cannot_name_files_outside_the_data_path(data):
    root, saved = data
    bad = {**saved, "files": ["../../etc/passwd", *saved["files"][1:]]}
    with pytest.raises(UserError, match="not a file under data.path"):
        resume_index(resolve(str(root)), bad, CK)


def test_a_checkpoint_from_before_fingerprints_is_found_by_file_name(data, tmp_path):
    root, saved = data
    old = {"files": [f"/old/place/train/part-{f:05d}.parquet" for f in range(3)], "rows": saved["rows"]}
    index = resume_index(resolve(str(root)), old, CK)
    assert index.to_json() == saved  # fingerprinted from here on
    _rewrite(root / "train" / "part-00002.parquet", list(range(3)))
    with pytest.raises(UserError, match="has 3 rows, the checkpoint's index 10"):
        resume_index(resolve(str(root)), old, CK)
