"""A model a user brings (model.factory=tests.integration.user_models.tiny:mlp): not a GPT, a
bag-of-embeddings MLP predicting the next token, with dropout so RNG state matters on resume."""

import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class NextTokenMLP(nn.Module):
    def __init__(self, vocab: int, width: int, hidden: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, vocab))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.net(self.embed(inputs))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def mlp(cfg, hidden: int = 48):
    return NextTokenMLP(cfg.vocab_size, cfg.d_model, hidden, cfg.dropout)


class Paced(NextTokenMLP):
    """The MLP at most 1 / pace_s steps a second while the file `while_exists` does: a run
    long enough for what a test does to it meanwhile (tests/integration/test_elastic.py),
    however fast the machine, and quick once the test removes the file."""

    def __init__(self, *args, pace_s: float, while_exists: str):
        super().__init__(*args)
        self.pace_s, self.while_exists = pace_s, while_exists

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.training and os.path.exists(self.while_exists):
            time.sleep(self.pace_s)
        return super().forward(inputs, targets)


def paced(cfg, while_exists: str, hidden: int = 48, pace_s: float = 0.25):
    return Paced(cfg.vocab_size, cfg.d_model, hidden, cfg.dropout, pace_s=pace_s, while_exists=while_exists)
