"""TrainState: everything about progress that a resume restores, as one unit.

metadata.json and training_metrics.json are views of it. Torch objects (model, optimizer,
scheduler, RNG) are saved beside it; see trainers/checkpointer.py for the mapping.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    """The epoch being trained (0-based)."""
    samples_in_epoch: int = 0
    """The data cursor: global samples of this epoch consumed (a multiple of the global batch)."""
    best_loss: float = math.inf
    """The lowest training loss seen so far (global mean over ranks, per step)."""
    best_val_loss: float = math.inf
    """The lowest validation loss seen so far."""
    loss_history: list = field(default_factory=list)
    """[step, loss] pairs."""
    lr_history: list = field(default_factory=list)
    """[step, lr] pairs."""
    val_history: list = field(default_factory=list)
    """[step, validation loss] pairs."""
    resumes: list = field(default_factory=list)
    """[step, checkpoint name] for every resume, so curves can mark them."""

    def metrics_dict(self) -> dict:
        """training_metrics.json."""
        return {
            "loss_history": self.loss_history,
            "lr_history": self.lr_history,
            "val_history": self.val_history,
            "resumes": self.resumes,
        }

    def progress_dict(self) -> dict:
        """The progress part of metadata.json."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "best_loss": _finite_or_none(self.best_loss),
            "best_val_loss": _finite_or_none(self.best_val_loss),
        }

    @classmethod
    def from_checkpoint(cls, metadata: dict, metrics: dict) -> TrainState:
        return cls(
            step=int(metadata["step"]),
            epoch=int(metadata["epoch"]),
            samples_in_epoch=int(metadata["samples_in_epoch"]),
            best_loss=_none_to_inf(metadata.get("best_loss")),
            best_val_loss=_none_to_inf(metadata.get("best_val_loss")),
            loss_history=list(metrics.get("loss_history", [])),
            lr_history=list(metrics.get("lr_history", [])),
            val_history=list(metrics.get("val_history", [])),
            resumes=list(metrics.get("resumes", [])),
        )

    def as_dict(self) -> dict:
        return asdict(self)


def _finite_or_none(x: float):
    return None if math.isinf(x) else x  # JSON has no Infinity


def _none_to_inf(x) -> float:
    return math.inf if x is None else float(x)
