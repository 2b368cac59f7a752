"""From scores to a Plan: how many channels each group keeps, and which."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .groups import Analysis, Group


@dataclass
class Plan:
    """Plain data: per group id, the sorted channel indices to keep. Groups not listed keep everything."""

    keep: dict[int, np.ndarray] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"keep": {str(g): [int(i) for i in idx] for g, idx in sorted(self.keep.items())}}


def keep_count(group: Group, ratio: float, round_to: int) -> int:
    """Channels kept after removing round(ratio * size), at least one, rounded so the kept width is a multiple of
    `round_to` channels. A group whose channels are blocks of `inner` (grouped conv) rounds whole blocks."""
    keep = max(1, group.size - int(round(ratio * group.size)))
    inner = math.gcd(*[m.inner for m in group.members]) or 1
    step = round_to // math.gcd(round_to, inner) if round_to > 1 else 1
    if step <= 1 or group.size <= step:
        return keep if step <= 1 else group.size
    return int(min(max(step, round(keep / step) * step), group.size))


def uniform_plan(analysis: Analysis, scores: dict[int, np.ndarray], ratio: float, round_to: int = 1) -> Plan:
    plan = Plan()
    for group in analysis.prunable:
        n_keep = keep_count(group, ratio, round_to)
        if n_keep >= group.size:
            continue
        order = np.argsort(-scores[group.id], kind="stable")
        plan.keep[group.id] = np.sort(order[:n_keep])
    return plan
