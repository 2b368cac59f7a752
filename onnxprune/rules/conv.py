"""Convolutions, linear layers and pooling."""
from __future__ import annotations

from dataclasses import replace

from ..einsum import Equation, equation_of
from ..layers import weight_axes
from ..roles import Role
from .elementwise import broadcast_couples
from .registry import (Barrier, FixContext, In, NodeView, Out, Pseudo, Ref, Rule, compose, couple, expand, is_static,
                       rule)


def _bias(n: NodeView, index: int) -> list:
    return [In(index, 0, Role.BIAS)] if n.has_input(index) else []


@rule("Conv")
def conv(n: NodeView) -> Rule:
    weight = n.in_shape(1)
    if not all(is_static(d) for d in weight[:2]):
        raise Barrier("weight shape unknown")
    groups = _groups(n, weight[0])
    out_axis, in_axis = weight_axes(n.node)
    outputs = couple(Out(0, 1), In(1, out_axis, Role.W_OUT), *_bias(n, 2))
    if groups == 1:
        return Rule(couple(In(0, 0), Out(0, 0)), couple(In(0, 1), In(1, in_axis, Role.W_IN)), outputs)
    per_group_out = weight[0] // groups
    if n.tile:
        return Rule(couple(In(0, 0), Out(0, 0)), outputs,
                    *_same_channels_in_every_group(groups, weight[1], per_group_out, in_axis))
    # Grouped (and depthwise) conv: prune whole groups; input and output channels of group g go together. The other
    # reading (groups.analyze switches to it where the groups themselves are frozen) keeps the groups.
    other = Pseudo("group channels", per_group_out) if per_group_out > 1 else None
    return Rule(couple(In(0, 0), Out(0, 0)), outputs,
                expand(In(0, 1), Pseudo("groups", groups), weight[1]),
                expand(Out(0, 1), Pseudo("groups", groups), per_group_out, alternative=other),
                fixup=_set_group)


def _same_channels_in_every_group(groups: int, per_group_in: int, per_group_out: int, in_axis: int) -> list:
    """Channel c of every group at once: the group count stays and each group narrows. A ResNeSt radix conv's groups
    are the radix parts of one set of channels, which the split attention reshapes apart and sums back together.
    The weight's input axis is one group's input channels, shared by all groups. A removed input channel feeds
    kept outputs here, so the input axis is also declared consumed: one that is not zero where it arrives (after a
    Sigmoid) marks its group inexact (zeroflow)."""
    group_in, group_out = Pseudo("group inputs", per_group_in), Pseudo("group channels", per_group_out)
    return [compose(In(0, 1), *[group_in] * groups), couple(group_in, In(1, in_axis, Role.W_IN)), couple(In(0, 1)),
            compose(Out(0, 1), *[group_out] * groups)]


@rule("ConvTranspose")
def conv_transpose(n: NodeView) -> Rule:
    weight = n.in_shape(1)  # (C_in, C_out / group, k...)
    if not all(is_static(d) for d in weight[:2]):
        raise Barrier("weight shape unknown")
    groups = _groups(n, weight[0])
    out_axis, in_axis = weight_axes(n.node)
    inputs = couple(In(0, 1), In(1, in_axis, Role.W_IN))
    if groups == 1:
        return Rule(couple(In(0, 0), Out(0, 0)), inputs, couple(Out(0, 1), In(1, out_axis, Role.W_OUT), *_bias(n, 2)))
    if n.has_input(2):
        raise Barrier("grouped ConvTranspose with bias")
    return Rule(couple(In(0, 0), Out(0, 0)), inputs,
                expand(In(0, 1), Pseudo("groups", groups), weight[0] // groups),
                expand(Out(0, 1), Pseudo("groups", groups), weight[1]),
                fixup=_set_group)


def _groups(n: NodeView, channels: int) -> int:
    """The `group` attribute, frozen where it breaks the spec (below 1, or not dividing the weight's first axis):
    shape inference lets such a node through, and the channel arithmetic would divide by it."""
    groups = int(n.attr("group", 1))
    if groups < 1 or channels % groups:
        raise Barrier(f"group {groups} does not divide the weight's {channels} channels")
    return groups


def _set_group(n: NodeView, ctx: FixContext) -> None:
    ctx.set_attr("group", ctx.new_size(Pseudo("groups")))


@rule("Gemm")
def gemm(n: NodeView) -> Rule:
    if n.attr("transA", 0):
        raise Barrier("transA=1")
    out_axis, in_axis = weight_axes(n.node)
    out = n.out_shape(0)
    relations = [couple(In(0, 0), Out(0, 0)), couple(In(0, 1), In(1, in_axis, Role.W_IN))]
    columns = [Out(0, 1), In(1, out_axis, Role.W_OUT)]
    if n.has_input(2):
        c = n.in_shape(2)
        if len(c) >= 1 and c[-1] == out[1] and out[1] != 1:
            columns.append(In(2, len(c) - 1, Role.BIAS))
        if len(c) == 2 and c[0] == out[0] and out[0] != 1:
            relations.append(couple(Out(0, 0), In(2, 0)))
    return Rule(*relations, couple(*columns))


@rule("MatMul")
def matmul(n: NodeView) -> Rule:
    a, b = n.in_shape(0), n.in_shape(1)
    if len(a) < 2 or len(b) < 2:
        raise Barrier("1-D operand")
    a_const, b_const = n.const(0) is not None, n.const(1) is not None
    rank = len(n.out_shape(0))
    return Rule(
        couple(In(0, len(a) - 1, Role.W_IN if a_const else None), In(1, len(b) - 2, Role.W_IN if b_const else None)),
        couple(Out(0, rank - 2), In(0, len(a) - 2, Role.W_OUT if a_const else None)),
        couple(Out(0, rank - 1), In(1, len(b) - 1, Role.W_OUT if b_const else None)),
        # A batch of matrix products: a removed (zero) slice of either operand gives a zero slice (attention
        # weights of a removed head times its zero values).
        *[replace(c, product=True) for c in broadcast_couples(n, [0, 1], lambda i: None, trailing=2)],
    )


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def pool(n: NodeView) -> Rule:
    if n.used_output(1):
        raise Barrier("MaxPool indices output is used (indices depend on the channel count)")
    return Rule(couple(In(0, 0), Out(0, 0)), couple(In(0, 1), Out(0, 1)))


@rule("Einsum")
def einsum(n: NodeView) -> Rule:
    """Each letter is one index: its axes couple across inputs and output (a contracted letter couples the inputs
    only); an axis of size 1 that broadcasting stretches is left out. Letters repeated within one operand
    (diagonals) are left out, so they stay frozen. A constant operand beside one activation is a weight: the
    letters summed over are its input channels, those only it brings to the output its output channels."""
    inputs = [i for i in range(len(n.node.input)) if n.has_input(i)]
    equation = equation_of(n.node, [len(n.in_shape(i)) for i in inputs])
    if equation is None or len(inputs) != len(n.node.input):
        raise Barrier("equation does not match the inputs")
    roles = _einsum_roles(n, equation)
    refs: dict[str, list[tuple[Ref, object]]] = {}
    for i, term in enumerate(equation.inputs):
        for axis, letter in enumerate(term):
            if term.count(letter) == 1:
                refs.setdefault(letter, []).append((In(i, axis, roles.get((i, letter))), n.in_shape(i)[axis]))
    relations = []
    for letter, sized in refs.items():
        if equation.output.count(letter) > 1:
            continue
        if letter in equation.output:
            sized.append((Out(0, equation.output.index(letter)), n.out_shape(0)[equation.output.index(letter)]))
        relations.append(couple(*_unbroadcast(sized), product=True))  # a zero slice of any operand: a zero slice
    return Rule(*relations)


def _einsum_roles(n: NodeView, equation: Equation) -> dict[tuple[int, str], Role]:
    """(operand, letter) -> role, for the one constant operand of a two-operand Einsum."""
    constant = [i for i in range(len(equation.inputs)) if n.const(i) is not None]
    if len(equation.inputs) != 2 or len(constant) != 1:
        return {}
    contracted, produced = equation.weight_letters(constant[0])
    return {**{(constant[0], c): Role.W_IN for c in contracted}, **{(constant[0], c): Role.W_OUT for c in produced}}


def _unbroadcast(sized: list[tuple[Ref, object]]) -> list[Ref]:
    """The refs of one letter without the size-1 axes broadcast against a longer one."""
    longer = any(size != 1 for _, size in sized)
    return [ref for ref, size in sized if not (longer and size == 1)]
