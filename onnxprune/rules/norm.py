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
    """Axes before `axis` are rows, each normalised alone; the axes from `axis` on are normalised together, so
    pruning any of them changes the mean and variance: inexact, with the scale and shift sliced along."""
    rank = len(n.in_shape(0))
    axis = int(n.attr("axis", -1)) % rank
    if any(n.used_output(i) for i in (1, 2)):
        raise Barrier("mean / inv-std outputs are used")
    shifted = "LayerNormalization of a removed (zero) row is its shift" if n.has_input(2) else None
    relations = [couple(In(0, a), Out(0, a), at_zero=shifted) for a in range(axis)]
    inexact = "LayerNormalization normalises over this axis (mean and variance change)"
    relations += [couple(In(0, a), Out(0, a), *_norm_params(n, a), inexact=inexact) for a in range(axis, rank)]
    return Rule(*relations)


def _norm_params(n: NodeView, axis: int) -> list:
    """The scale's and shift's refs on input axis `axis` (they line up with the input's last axes), where they are
    not broadcast along it."""
    size, from_end = n.in_shape(0)[axis], axis - len(n.in_shape(0))
    refs = []
    for i, role in ((1, Role.SCALE), (2, Role.SHIFT)):
        shape = n.in_shape(i) if n.has_input(i) else ()
        if len(shape) >= -from_end and shape[from_end] == size:
            refs.append(In(i, from_end, role))
    return refs
