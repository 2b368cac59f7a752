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
    """Channels kept after removing round(ratio * size), at least one, rounded so that every weight dimension the
    group spans stays a multiple of `round_to`. A group whose channels are blocks of `inner` (a grouped conv's
    groups, attention heads) needs fewer units per step: 16 channels are 4 groups of 4, or a quarter of a head."""
    keep = max(1, group.size - int(round(ratio * group.size)))
    step = 1
    for inner in {m.inner for m in group.members if m.constant} or {1}:
        step = math.lcm(step, round_to // math.gcd(round_to, inner))
    if step <= 1:
        return keep
    if group.size <= step:
        return group.size
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
