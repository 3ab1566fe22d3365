"""Property 3: a resume deep in an epoch opens none of the files already processed: they held
garbage during the resumed segment, and the segment's audit trail never opened them."""

from conftest import audit


def test_processed_files_were_unreadable_and_never_opened(runs):
    assert len(runs.processed_while_garbage) == 2  # files 1-2 of epoch 0 done at step 10
    opened = [r["file"] for r in audit(runs.audit / "chain2") if r["event"] == "open"]
    assert opened, "the audit trail recorded no opens: the check below would prove nothing"
    assert not set(opened) & set(runs.processed_while_garbage)
    assert runs.chain[1].rc == 0


def test_partial_file_is_the_first_opened(runs):
    records = audit(runs.audit / "chain2")
    for rank in (0, 1):
        opens = [r["file"] for r in records if r["event"] == "open" and r["rank"] == rank]
        assert len(opens) == len(set(opens)) == 4  # the partial file and the 3 after it, once each
    first_batch = [r for r in records if r["event"] == "batch" and r["step"] == 11]
    assert sorted(i for r in first_batch for i in r["ids"]) == sorted(
        i for r in audit(runs.audit / "straight") if r["event"] == "batch" and r["step"] == 11
        for i in r["ids"])
