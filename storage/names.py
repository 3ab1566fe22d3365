"""The one place that formats and parses checkpoint names.

    ===========================================  =====  ====  =====
    name                                         epoch  step  files
    ===========================================  =====  ====  =====
    checkpoint-epoch0-step8-files2               0      8     2
    checkpoint-epoch1-step24-files0              1      24    0
    checkpoint-epoch12-step150000-files310       12     150000 310
    ===========================================  =====  ====  =====

Numbers are unpadded (the guide's form), so names never sort as strings:
always sort by ``CheckpointName.sort_key`` (transformers#27138 deleted the newest
checkpoint by sorting "step-9" after "step-10").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PATTERN = re.compile(r"checkpoint-epoch(0|[1-9][0-9]*)-step(0|[1-9][0-9]*)-files(0|[1-9][0-9]*)")


@dataclass(frozen=True, slots=True)
class CheckpointName:
    epoch: int
    step: int
    files: int  # data files fully trained on in the current epoch

    def __str__(self) -> str:
        return f"checkpoint-epoch{self.epoch}-step{self.step}-files{self.files}"

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (self.step, self.epoch, self.files)

    @classmethod
    def parse(cls, text: str) -> CheckpointName:
        """Parse a name; raise ValueError naming the expected form."""
        match = _PATTERN.fullmatch(text)
        if match is None:
            raise ValueError(
                f"'{text}' is not a checkpoint name: expected "
                "checkpoint-epoch{E}-step{S}-files{F}, e.g. checkpoint-epoch0-step800-files0"
            )
        epoch, step, files = (int(g) for g in match.groups())
        return cls(epoch=epoch, step=step, files=files)

    @classmethod
    def try_parse(cls, text: str) -> CheckpointName | None:
        try:
            return cls.parse(text)
        except ValueError:
            return None

