"""trainers.state.TrainState: the metadata/metrics views round-trip through JSON."""

import json
import math

import pytest

from trainers.state import TrainState


def through_json(state):
    """What a save then a resume does: write the two JSON views, read them back."""
    meta = json.loads(json.dumps({"config": {}, **state.progress_dict()}, allow_nan=False))
    metrics = json.loads(json.dumps(state.metrics_dict(), allow_nan=False))
    return TrainState.from_checkpoint(meta, metrics)


def test_fresh_state_round_trip_keeps_inf_best_losses():
    state = TrainState()
    progress = state.progress_dict()
    assert progress["best_loss"] is None and progress["best_val_loss"] is None
    back = through_json(state)
    assert back == state
    assert math.isinf(back.best_loss) and back.best_loss > 0
    assert math.isinf(back.best_val_loss) and back.best_val_loss > 0


def test_full_state_round_trip():
    state = TrainState(
        step=24, epoch=1, samples_in_epoch=0, best_loss=2.125, best_val_loss=math.inf,
        loss_history=[[1, 5.5], [2, 4.25], [24, 2.125]],
        lr_history=[[1, 0.00075], [24, 0.0021]],
        val_history=[],
        resumes=[[16, "checkpoint-epoch0-step16-files4"]],
    )
    progress = state.progress_dict()
    assert progress == {"step": 24, "epoch": 1, "samples_in_epoch": 0, "best_loss": 2.125,
                        "best_val_loss": None}
    back = through_json(state)
    assert back == state
    assert back.as_dict() == state.as_dict()
    assert back.best_val_loss == math.inf


@pytest.mark.parametrize("step,epoch,cursor,best,val", [
    (0, 0, 0, math.inf, math.inf),
    (8, 0, 128, 3.0, 3.5),
    (10**9, 12, 2**40, 1e-9, 0.0),
    (5, 0, 80, 0.0, math.inf),
])
def test_progress_round_trip(step, epoch, cursor, best, val):
    state = TrainState(step=step, epoch=epoch, samples_in_epoch=cursor, best_loss=best, best_val_loss=val)
    back = through_json(state)
    assert (back.step, back.epoch, back.samples_in_epoch) == (step, epoch, cursor)
    assert back.best_loss == best and back.best_val_loss == val


def test_histories_are_copied_not_shared():
    metrics = {"loss_history": [[1, 2.0]], "lr_history": [], "val_history": [], "resumes": []}
    meta = {"step": 1, "epoch": 0, "samples_in_epoch": 16, "best_loss": 2.0, "best_val_loss": None}
    state = TrainState.from_checkpoint(meta, metrics)
    state.loss_history.append([2, 1.0])
    assert metrics["loss_history"] == [[1, 2.0]]


def test_from_checkpoint_tolerates_missing_optional_fields():
    state = TrainState.from_checkpoint({"step": "3", "epoch": 0, "samples_in_epoch": 48}, {})
    assert state.step == 3 and isinstance(state.step, int)
    assert state.best_loss == math.inf and state.best_val_loss == math.inf
    assert state.loss_history == [] and state.resumes == []


def test_metrics_dict_holds_exactly_the_histories():
    state = TrainState(loss_history=[[1, 1.0]], lr_history=[[1, 0.1]], val_history=[[1, 2.0]],
                       resumes=[[1, "x"]])
    assert state.metrics_dict() == {"loss_history": [[1, 1.0]], "lr_history": [[1, 0.1]],
                                    "val_history": [[1, 2.0]], "resumes": [[1, "x"]]}
