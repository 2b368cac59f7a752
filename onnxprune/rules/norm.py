"""Normalisation ops: their per-channel parameters follow the channel axis."""
from __future__ import annotations

from ..roles import Role
from .registry import Barrier, In, NodeView, Out, Rule, couple, identity_couples, rule


@rule("BatchNormalization")
def batch_norm(n: NodeView) -> Rule:
    if any(n.used_output(i) for i in (1, 2)):
        raise Barrier("training-mode outputs are used")
    channel = couple(In(0, 1), Out(0, 1), In(1, 0, Role.SCALE), In(2, 0, Role.SHIFT), In(3, 0, Role.STAT),
                     In(4, 0, Role.STAT))
    return Rule(channel, *identity_couples(n, skip=(1,)))


@rule("InstanceNormalization")
def instance_norm(n: NodeView) -> Rule:
    # Statistics are per (sample, channel) over space: batch and channel axes are free, spatial axes are not.
    return Rule(couple(In(0, 0), Out(0, 0)), couple(In(0, 1), Out(0, 1), In(1, 0, Role.SCALE), In(2, 0, Role.SHIFT)))


@rule("LayerNormalization")
def layer_norm(n: NodeView) -> Rule:
    rank = len(n.in_shape(0))
    axis = int(n.attr("axis", -1)) % rank
    if any(n.used_output(i) for i in (1, 2)):
        raise Barrier("mean / inv-std outputs are used")
    shifted = "LayerNormalization of a removed (zero) row is its shift" if n.has_input(2) else None
    relations = [couple(In(0, a), Out(0, a), at_zero=shifted) for a in range(axis)]
    if axis != rank - 1:
        return Rule(*relations)  # normalised over several axes: those stay whole
    params = [In(i, len(n.in_shape(i)) - 1, role) for i, role in ((1, Role.SCALE), (2, Role.SHIFT)) if n.has_input(i)]
    relations.append(couple(In(0, axis), Out(0, axis), *params,
                            inexact="LayerNormalization normalises over this axis (mean and variance change)"))
    return Rule(*relations)
