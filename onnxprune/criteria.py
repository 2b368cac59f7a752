"""Importance criteria: `(group, context) -> scores`, one score per channel of the group, higher = keep.

Criteria are chosen by name from CRITERIA; data-driven ones (later) plug into the same signature through the
context, which carries whatever the run collected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import UsageError
from .graph import GraphIndex
from .groups import Group, Member

# Weight members that say how much a channel matters: the producer's and consumers' kernels, a norm's scale.
_WEIGHT_ROLES = ("w_out", "w_in", "scale")


@dataclass
class ScoringContext:
    index: GraphIndex
    seed: int = 0
    extras: dict = field(default_factory=dict)


Criterion = Callable[[Group, ScoringContext], np.ndarray]
CRITERIA: dict[str, Criterion] = {}


def criterion(name: str) -> Callable[[Criterion], Criterion]:
    def register(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        return fn
    return register


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise UsageError(f"unknown criterion '{name}' (choose from {', '.join(sorted(CRITERIA))})")
    return CRITERIA[name]


def member_channels(group: Group, member: Member, index: GraphIndex) -> np.ndarray:
    """The member's weights as (channels, values-per-channel)."""
    array = index.array(member.space[0])
    axis = member.space[1]
    span = np.take(array, np.arange(member.offset, member.offset + group.size * member.inner), axis=axis)
    span = np.moveaxis(span, axis, 0).astype(np.float64)
    return span.reshape(group.size, -1)


def _norm_criterion(order: int) -> Criterion:
    def score(group: Group, ctx: ScoringContext) -> np.ndarray:
        members = [m for m in group.members if m.constant and m.role in _WEIGHT_ROLES]
        members = members or [m for m in group.members if m.constant]
        total = np.zeros(group.size)
        for m in members:
            values = member_channels(group, m, ctx.index)
            norms = np.abs(values).sum(1) if order == 1 else np.sqrt((values ** 2).sum(1))
            # Normalise each member so one wide layer does not dominate the group's ranking.
            mean = norms.mean()
            total += norms / mean if mean > 0 else norms
        return total
    return score


CRITERIA["l1"] = _norm_criterion(1)
CRITERIA["l2"] = _norm_criterion(2)


@criterion("random")
def random_scores(group: Group, ctx: ScoringContext) -> np.ndarray:
    """A seeded baseline: the same seed and model give the same choice."""
    return np.random.default_rng([ctx.seed, group.id]).random(group.size)
