"""storage.names: the one format/parse of checkpoint names."""

import dataclasses
import itertools
import random

import pytest

from storage.names import CheckpointName

NUMBERS = [0, 1, 2, 7, 9, 10, 11, 99, 100, 101, 999, 1000, 150000, 10**9, 2**31, 2**63 + 5, 10**30]


def test_format_parse_round_trip():
    count = 0
    for epoch, step, files in itertools.product(NUMBERS, NUMBERS, [0, 1, 10, 310, 10**12]):
        text = f"checkpoint-epoch{epoch}-step{step}-files{files}"
        name = CheckpointName(epoch=epoch, step=step, files=files)
        assert str(name) == text
        parsed = CheckpointName.parse(text)
        assert (parsed.epoch, parsed.step, parsed.files) == (epoch, step, files)
        assert parsed == name
        assert CheckpointName.try_parse(text) == name
        assert str(CheckpointName.parse(str(name))) == text
        count += 1
    assert count == len(NUMBERS) ** 2 * 5


def test_documented_examples():
    assert CheckpointName.parse("checkpoint-epoch0-step8-files2") == CheckpointName(0, 8, 2)
    assert CheckpointName.parse("checkpoint-epoch1-step24-files0") == CheckpointName(1, 24, 0)
    assert CheckpointName.parse("checkpoint-epoch12-step150000-files310") == CheckpointName(12, 150000, 310)


MALFORMED = [
    "",
    "checkpoint",
    "checkpoint-epoch0-step08-files2",  # leading zero
    "checkpoint-epoch00-step8-files2",
    "checkpoint-epoch0-step8-files02",
    "checkpoint-epoch-1-step8-files2",  # negative
    "checkpoint-epoch0-step-8-files2",
    "checkpoint-epoch0-step8-files-2",
    "checkpoint-epoch0-step8",  # missing parts
    "checkpoint-step8-files2",
    "checkpoint-epoch0-files2",
    "checkpoint-epoch-step8-files2",
    "checkpoint-epoch0-step-files2",
    "checkpoint-epoch0-step8-files",
    "checkpoint-epoch0-step8-files2.tmp",  # extra suffix
    "checkpoint-epoch0-step8-files2-old",
    "checkpoint-epoch0-step8-files2/",
    "old-checkpoint-epoch0-step8-files2",  # extra prefix
    "checkpoint-epoch0-step8-files2 ",  # spaces
    " checkpoint-epoch0-step8-files2",
    "checkpoint-epoch 0-step8-files2",
    "checkpoint-epoch0-step 8-files2",
    "checkpoint-epoch0-step+8-files2",
    "checkpoint-epoch0-step8.0-files2",
    "checkpoint-epoch0-step1e3-files2",
    "checkpoint-epoch0-step0x10-files2",
    "Checkpoint-epoch0-step8-files2",  # case
    "checkpoint-Epoch0-step8-files2",
    "checkpoint_epoch0_step8_files2",
    "checkpoint-epoch0-step8-files2-step9",
    "checkpoint-epoch0-step_8-files2",
    "checkpoint-epoch0-step8-files2\t",
    "checkpoint_manager_snapshot.json",
    "metadata.json",
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_names_rejected(text):
    with pytest.raises(ValueError) as err:
        CheckpointName.parse(text)
    message = str(err.value)
    assert "checkpoint-epoch{E}-step{S}-files{F}" in message
    assert repr(text)[1:-1] in message or text in message
    assert CheckpointName.try_parse(text) is None


def test_trailing_newline_rejected():
    with pytest.raises(ValueError):
        CheckpointName.parse("checkpoint-epoch0-step8-files2\n")


def test_non_ascii_digits_rejected():
    with pytest.raises(ValueError):
        CheckpointName.parse("checkpoint-epoch1\u0663-step8-files2")


def test_names_are_frozen_and_hashable():
    name = CheckpointName(1, 2, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        name.step = 5  # type: ignore[misc]
    assert len({name, CheckpointName(1, 2, 3), CheckpointName(1, 2, 4)}) == 2


def in_order(texts):
    """Names sorted as storage/listing.py sorts a run's checkpoints: by sort_key."""
    return [str(n) for n in sorted(map(CheckpointName.parse, texts), key=lambda n: n.sort_key)]


def test_sort_key_is_numeric_not_string():
    names = [
        "checkpoint-epoch0-step100-files0",
        "checkpoint-epoch0-step10-files0",
        "checkpoint-epoch0-step9-files0",
    ]
    assert in_order(names) == [
        "checkpoint-epoch0-step9-files0",
        "checkpoint-epoch0-step10-files0",
        "checkpoint-epoch0-step100-files0",
    ]
    # string sort would get this wrong: the test is meaningful
    assert sorted(names) != in_order(names)


def test_sort_key_orders_by_step_then_epoch_then_files():
    rng = random.Random(7)
    triples = {(e, s, f) for e in (0, 1, 2, 10) for s in (0, 8, 9, 10, 99, 100, 1000, 10**12) for f in (0, 2, 10)}
    names = [f"checkpoint-epoch{e}-step{s}-files{f}" for e, s, f in triples]
    rng.shuffle(names)
    in_order_triples = sorted(triples, key=lambda t: (t[1], t[0], t[2]))
    assert in_order(names) == [f"checkpoint-epoch{e}-step{s}-files{f}" for e, s, f in in_order_triples]
