"""Which checkpoints to delete: a pure function, tested without Ray or storage.

Kept: the newest ``keep_last`` complete checkpoints, the ``keep_best`` complete ones with the
lowest validation loss, every protected one (the checkpoint this run resumed from), and
always the newest complete one. Never touched: incomplete checkpoints (an upload may be in
flight), and checkpoints whose validation loss is not a finite number (NaN, inf, text): such a
metric cannot be ranked, so it is logged and the checkpoint kept. Order is by parsed step,
never by string.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from storage.listing import scan
from storage.location import Location
from storage.names import CheckpointName
from storage.transfer import delete


@dataclass(frozen=True)
class Candidate:
    name: CheckpointName
    complete: bool
    val_loss: float | None = None


@dataclass(frozen=True)
class Policy:
    keep_last: int = 0  # 0: keep everything
    keep_best: int = 0
    protect: frozenset[str] = frozenset()


def unrankable(candidate: Candidate) -> bool:
    """A validation loss that is there but is not a finite number (NaN sorts nowhere)."""
    v = candidate.val_loss
    if v is None:
        return False
    return isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)


def which_to_delete(candidates: list[Candidate], policy: Policy) -> list[CheckpointName]:
    if policy.keep_last <= 0:
        return []
    complete = sorted((c for c in candidates if c.complete), key=lambda c: c.name.sort_key)
    keep = {c.name for c in complete[-policy.keep_last:]}
    keep |= {c.name for c in complete if unrankable(c)}
    scored = sorted((c for c in complete if c.val_loss is not None and not unrankable(c)),
                    key=lambda c: (c.val_loss, -c.name.step))
    keep |= {c.name for c in scored[:max(policy.keep_best, 0)]}
    keep |= {c.name for c in complete if str(c.name) in policy.protect}
    return [c.name for c in complete if c.name not in keep]


def apply(run: Location, policy: Policy, log=print) -> list[str]:
    """Delete what the policy says; metadata.json first, so a half-deleted checkpoint reads as
    incomplete and is never resumed. A failed delete is logged, not fatal."""
    if policy.keep_last <= 0:
        return []
    entries = {e.name: e for e in scan(run)}
    candidates = []
    for name, entry in entries.items():
        result = entry.result
        candidates.append(Candidate(name, result.ok, result.metadata.get("val_loss")))
        if result.ok and unrankable(candidates[-1]):
            log(f"⚠️  Retention keeps {name}: its val_loss {candidates[-1].val_loss!r} is not a "
                "finite number, so it cannot be ranked")
    deleted = []
    for name in which_to_delete(candidates, policy):
        loc = entries[name].loc
        try:
            delete(loc)
            deleted.append(str(name))
        except OSError as e:
            log(f"⚠️  Retention could not delete {loc.uri}: {e}")
    return deleted
