"""Importance criteria: `(group, context) -> scores`, one score per channel of the group, higher = keep.

Criteria are chosen by name from CRITERIA; data-driven ones plug into the same signature through the context, which
carries the calibration statistics each criterion declares it reads (STATISTICS): "channels", per-channel activation
sums (and sums of squares) where a group enters its consumers, and "contributions", the regression criterion's Gram
matrices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import UsageError
from .graph import GraphIndex
from .groups import Group, Member
from .layers import Layer, constant_values, dequantizer, refittable, weight_readers
from .roles import Role
from .regression import removal_order

# Weight members that say how much a channel matters: the producer's and consumers' kernels, a norm's scale.
_WEIGHT_ROLES = (Role.W_OUT, Role.W_IN, Role.SCALE)


@dataclass
class ScoringContext:
    index: GraphIndex
    seed: int = 0
    stats: object = None  # calibrate.Statistics, for the criteria that need data
    extras: dict = field(default_factory=dict)  # caches shared between groups
    fallbacks: list[int] = field(default_factory=list)  # groups a criterion could not rank and ranked by l1


Criterion = Callable[[Group, ScoringContext], np.ndarray]
CRITERIA: dict[str, Criterion] = {}
STATISTICS: dict[str, frozenset[str]] = {}  # criterion -> the calibration statistics it reads


def criterion(name: str, reads: tuple[str, ...] = ()) -> Callable[[Criterion], Criterion]:
    def register(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        STATISTICS[name] = frozenset(reads)
        return fn
    return register


def needs_data(name: str) -> bool:
    """Whether the criterion reads calibration statistics."""
    return bool(STATISTICS.get(name))


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise UsageError(f"unknown criterion '{name}' (choose from {', '.join(sorted(CRITERIA))})")
    return CRITERIA[name]


def member_norms(group: Group, member: Member, ctx: ScoringContext, order: int) -> np.ndarray:
    """Per-channel L1 or L2 norm of one member's weights. The norms along each (tensor, axis) are computed once and
    shared by every group that has a part of that axis."""
    key = ("norms", order, member.space)
    if key not in ctx.extras:
        array = constant_values(member.space[0], ctx.index)
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


criterion("l1")(_norm_criterion(1))
criterion("l2")(_norm_criterion(2))


@criterion("random")
def random_scores(group: Group, ctx: ScoringContext) -> np.ndarray:
    """A seeded baseline: the same seed and model give the same choice."""
    return np.random.default_rng([ctx.seed, group.id]).random(group.size)


@criterion("bn")
def bn_scale(group: Group, ctx: ScoringContext) -> np.ndarray:
    """|gamma| of the BatchNormalization on the channels (network slimming); l1 where BN was folded away."""
    members = [m for m in group.members if m.role == Role.SCALE and _read_by(ctx.index, m.space[0], "BatchNormalization")]
    if not members:
        return _fallback(group, ctx)
    return sum(np.abs(member_values(group, m, ctx.index)).sum(1) for m in members)


def _fallback(group: Group, ctx: ScoringContext) -> np.ndarray:
    """l1 for a group a criterion cannot rank; counted, so the run can say how many."""
    ctx.fallbacks.append(group.id)
    return CRITERIA["l1"](group, ctx)


def _read_by(index: GraphIndex, tensor: str, op_type: str) -> bool:
    return any(node.op_type == op_type for node in index.consumers.get(tensor, []))


def member_values(group: Group, member: Member, index: GraphIndex) -> np.ndarray:
    """The member's values as (channels, values per channel)."""
    array = np.moveaxis(constant_values(member.space[0], index), member.space[1], 0)
    span = array[member.offset: member.offset + group.size * member.inner]
    return span.reshape(group.size, -1).astype(np.float64)


def probes(group: Group, index: GraphIndex) -> list[Member]:
    """Where the group's channels enter the layers that consume them: the data inputs of the nodes whose weights
    read the group (`w_in`). Activation statistics are taken there, so values inside If branches and Loop and Scan
    bodies, which onnxruntime cannot expose, are left out (a group with no other probe is ranked by l1)."""
    spaces = {m.space: m for m in group.members if not m.constant and m.space[0] not in index.body_values}
    found: dict[tuple[str, int], Member] = {}
    for m in group.members:
        if m.constant and m.role == Role.W_IN:
            for node in weight_readers(m.space[0], index):
                for name in (i for i in node.input if dequantizer(i, index) is None):  # not a QDQ weight
                    found.update({s: spaces[s] for s in spaces if s[0] == name})
    return list(found.values())


def consumers(group: Group, index: GraphIndex) -> list[tuple[object, Member]]:
    """(layer, its data input member) for every layer whose weights read the group."""
    data = {m.space[0]: m for m in probes(group, index)}
    found = []
    for m in group.members:
        if m.constant and m.role == Role.W_IN:
            for node in weight_readers(m.space[0], index):
                member = next((data[i] for i in node.input if i in data), None)
                if member is not None and (node, member) not in found:
                    found.append((node, member))
    return found


def _probe_channels(group: Group, ctx: ScoringContext, value: str) -> np.ndarray | None:
    """A per-channel statistic (`zero_fraction` or `mean_abs`) averaged over the group's probes."""
    found = probes(group, ctx.index)
    if not found or ctx.stats is None:
        return None
    total = np.zeros(group.size)
    for m in found:
        per_index = getattr(ctx.stats.channels[m.space], value)
        total += per_index[m.offset: m.offset + group.size * m.inner].reshape(group.size, m.inner).mean(1)
    return total / len(found)


@criterion("apoz", reads=("channels",))
def apoz(group: Group, ctx: ScoringContext) -> np.ndarray:
    """Average percentage of zeros where the channels enter their consumers: the most-zero channels go first."""
    zeros = _probe_channels(group, ctx, "zero_fraction")
    if zeros is None:
        return _fallback(group, ctx)
    # Ties (channels that are never zero, before a non-ReLU consumer) are broken by mean |activation|.
    mean_abs = _probe_channels(group, ctx, "mean_abs")
    return 1.0 - zeros + 1e-3 * mean_abs / max(float(mean_abs.max()), 1e-12)


@criterion("activation", reads=("channels",))
def activation(group: Group, ctx: ScoringContext) -> np.ndarray:
    """Mean |activation| where the channels enter their consumers."""
    mean_abs = _probe_channels(group, ctx, "mean_abs")
    if mean_abs is None:
        return _fallback(group, ctx)
    return mean_abs


@criterion("regression", reads=("contributions",))
def regression(group: Group, ctx: ScoringContext) -> np.ndarray:
    """ThiNet-style greedy selection: channels whose removal adds the least reconstruction error to the consumer
    layers' outputs on calibration data go first (see regression.py)."""
    gram = ctx.stats.extra.get(group.id) if ctx.stats is not None else None
    if gram is None or not gram.gram.any():
        return _fallback(group, ctx)
    return removal_order(gram.gram)


@criterion("fluctuation", reads=("channels",))
def fluctuation(group: Group, ctx: ScoringContext) -> np.ndarray:
    """FLAP's fluctuation metric (An et al. 2024): per input feature j of each layer that reads the group, the sample
    variance of X_j over the calibration positions (real ones only) times ||W[:, j]||^2, summed over the features of a
    channel (a head's 32). A channel that barely varies is what bias compensation (`--recover bias`) can replace by
    its mean, so it goes first."""
    if ctx.stats is None:
        return _fallback(group, ctx)
    total, found = np.zeros(group.size), False
    for node, data in consumers(group, ctx.index):
        layer = refittable(node, ctx.index, quantized=True)
        if layer is None or data.space[0] != node.input[0]:
            continue
        features = slice(data.offset, data.offset + group.size * data.inner)
        energy = column_energy(layer, ctx)[features] * ctx.stats.channels[data.space].variance[features]
        total += energy.reshape(group.size, data.inner).sum(1)
        found = True
    return total if found else _fallback(group, ctx)


def column_energy(layer: Layer, ctx: ScoringContext) -> np.ndarray:
    """||W[:, j]||^2 for every input channel j of the layer (its kernel's taps summed), alpha folded in; computed once
    per weight."""
    key = ("column_energy", layer.weight)
    if key not in ctx.extras:
        kernels = layer.kernels(constant_values(layer.weight, ctx.index)).astype(np.float64) * layer.alpha
        ctx.extras[key] = np.square(kernels).sum(axis=tuple(a for a in range(kernels.ndim) if a != 1))
    return ctx.extras[key]
