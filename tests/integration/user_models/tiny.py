"""A model a user brings (model.factory=tests.integration.user_models.tiny:mlp): not a GPT, a
bag-of-embeddings MLP predicting the next token, with dropout so RNG state matters on resume."""

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
    """The MLP at most 1 / pace_s steps a second: a run long enough for what a test does to it
    meanwhile (tests/integration/test_elastic.py), however fast the machine."""

    def __init__(self, *args, pace_s: float):
        super().__init__(*args)
        self.pace_s = pace_s

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        time.sleep(self.pace_s)
        return super().forward(inputs, targets)


def paced(cfg, hidden: int = 48, pace_s: float = 0.2):
    return Paced(cfg.vocab_size, cfg.d_model, hidden, cfg.dropout, pace_s=pace_s)
