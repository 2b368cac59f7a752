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


def member_norms(group: Group, member: Member, ctx: ScoringContext, order: int) -> np.ndarray:
    """Per-channel L1 or L2 norm of one member's weights. The norms along each (tensor, axis) are computed once and
    shared by every group that has a part of that axis."""
    key = ("norms", order, member.space)
    if key not in ctx.extras:
        array = ctx.index.array(member.space[0])
        axis = member.space[1]
        others = tuple(a for a in range(array.ndim) if a != axis)
        if order == 1:
            norms = np.add.reduce(np.abs(array), axis=others, dtype=np.float64)
        else:
            norms = np.sqrt(np.add.reduce(np.square(array), axis=others, dtype=np.float64))
        ctx.extras[key] = np.asarray(norms, dtype=np.float64).reshape(-1)
    span = ctx.extras[key][member.offset: member.offset + group.size * member.inner]
    per_channel = span.reshape(group.size, member.inner)
    return per_channel.sum(1) if order == 1 else np.sqrt((per_channel ** 2).sum(1))


def _norm_criterion(order: int) -> Criterion:
    def score(group: Group, ctx: ScoringContext) -> np.ndarray:
        members = [m for m in group.members if m.constant and m.role in _WEIGHT_ROLES]
        members = members or [m for m in group.members if m.constant]
        total = np.zeros(group.size)
        for m in members:
            norms = member_norms(group, m, ctx, order)
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
