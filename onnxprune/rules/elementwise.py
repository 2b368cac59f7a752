"""Element-wise ops: unary ops keep every axis; n-ary ops couple the axes that broadcasting lines up."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..roles import Role
from .registry import Couple, In, NodeView, Out, Rule, couple, identity_couples, rule

# Unary ops with f(0) = 0: a removed (zero) channel stays zero.
UNARY = (
    "Relu", "LeakyRelu", "HardSwish", "Tanh", "Erf", "Gelu", "Softsign", "Elu", "Selu", "Celu", "ThresholdedRelu",
    "Mish", "Identity", "Cast", "Abs", "Neg", "Sqrt", "Floor", "Ceil", "Round", "Sign", "Sin", "IsNaN", "IsInf",
)


@rule(*UNARY)
def unary(n: NodeView) -> Rule:
    return Rule(*identity_couples(n))


# Unary ops with f(0) != 0: what a removed channel becomes, and whether that is finite.
AT_ZERO = {"Sigmoid": ("0.5", True), "Softplus": ("ln 2", True), "Exp": ("1", True), "Cos": ("1", True),
           "Not": ("true", True), "Log": ("-inf", False), "Reciprocal": ("inf", False)}


@rule(*AT_ZERO)
def unary_not_zero_at_zero(n: NodeView) -> Rule:
    value, finite = AT_ZERO[n.op]
    return Rule(*identity_couples(n, at_zero=f"{n.op}(0) = {value}", finite=finite))


@rule("HardSigmoid")
def hard_sigmoid(n: NodeView) -> Rule:
    value = min(max(float(n.attr("beta", 0.5)), 0.0), 1.0)  # max(0, min(1, alpha * 0 + beta))
    return Rule(*identity_couples(n, at_zero=f"HardSigmoid(0) = {value:g}" if value else None))


@rule("Clip")
def clip(n: NodeView) -> Rule:
    # The bounds are scalars (no axes to couple); Clip(0) is not 0 when min > 0 or max < 0.
    bounds = [_bound(n, "min", 1), _bound(n, "max", 2)]
    if None in bounds:
        return Rule(*identity_couples(n, at_zero="Clip(0) with a bound computed at run time may not be 0"))
    value = min(max(0.0, bounds[0]), bounds[1])
    return Rule(*identity_couples(n, at_zero=f"Clip(0) = {value:g}" if value else None))


def _bound(n: NodeView, name: str, index: int) -> float | None:
    """A Clip bound (an attribute before opset 11, an optional input after); +-inf when absent, None at run time."""
    default = float("-inf") if name == "min" else float("inf")
    if n.opset < 11:
        return float(n.attr(name, default))
    if not n.has_input(index):
        return default
    value = n.const(index)
    return None if value is None else float(np.asarray(value).reshape(-1)[0])


@rule("Dropout")
def dropout(n: NodeView) -> Rule:
    relations = identity_couples(n)
    if n.has_output(1):  # the mask has the data's shape
        relations += identity_couples(n, 0, 1)
    return Rule(*relations)


# Role of a constant operand, for criteria and for the exactness harness (see verify.zero_removed_channels):
# CONST operands can be zeroed with the channel, a divisor, exponent or slope cannot.
_ROLES = {
    "Div": {1: Role.DIVISOR},
    "Pow": {1: Role.EXPONENT},
    "PRelu": {1: Role.SLOPE},
    "Where": {0: Role.CONDITION},
}


@rule("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu", "Where",
      "And", "Or", "Xor", "BitShift", "Mod")  # comparisons: rules/compare.py
def broadcast(n: NodeView) -> Rule:
    roles = _ROLES.get(n.op, {})
    inputs = [i for i in range(len(n.node.input)) if n.has_input(i)]
    couples = broadcast_couples(n, inputs, lambda i: roles.get(i, Role.CONST))
    return Rule(*[_at_zero(n, c, inputs) for c in couples])


_PRODUCTS = ("Mul", "And")  # zero where any operand is zero
_ZERO_PRESERVING = ("PRelu", "Mod", "BitShift")  # op(0, y) = 0
_ALWAYS_TRUE_AT_ZERO = ("Equal", "GreaterOrEqual", "LessOrEqual")


def _at_zero(n: NodeView, c: Couple, inputs: list[int]) -> Couple:
    """What the op makes of a removed channel: zero in the coupled operands, the broadcast ones as they are."""
    if n.op in _PRODUCTS:
        return replace(c, product=True)
    coupled = {r.index for r in c.refs if r.side == "in"}
    broadcast_over = [i for i in inputs if i not in coupled and not (n.op == "Where" and i == 0)]
    if n.op == "Div" and 1 in coupled and n.const(1) is None:
        return replace(c, at_zero="Div by a removed (zero) channel is not finite", finite=False)
    if n.op == "Pow":
        exponent = n.const(1)
        if exponent is None or np.any(exponent <= 0):
            return replace(c, at_zero="Pow(0, e) is not 0 for an exponent e <= 0",
                           finite=exponent is not None and not np.any(exponent < 0))
        return c
    if n.op in _ZERO_PRESERVING:
        return c
    if n.op in _ALWAYS_TRUE_AT_ZERO:
        return replace(c, at_zero=f"{n.op}(0, 0) is true")
    hit = next((i for i in broadcast_over if not _harmless(n.op, i, n.const(i))), None)
    if hit is None:
        return c
    return replace(c, at_zero=f"{n.op} with input {hit} ('{n.node.input[hit]}') broadcast over the removed channels "
                              f"gives them its value")


def _harmless(op: str, index: int, value: np.ndarray | None) -> bool:
    """An operand broadcast over the channels that leaves op(0, value) at 0: any divisor (0 / d = 0, the
    normalisation of a LayerNorm or an L2 norm), or a constant that does."""
    if op == "Div" and index == 1:
        return True
    if value is None:
        return False
    if op == "Max":
        return bool(np.all(value <= 0))
    if op == "Min":
        return bool(np.all(value >= 0))
    return bool(np.all(value == 0))


def broadcast_couples(n: NodeView, inputs: list[int], role_of, trailing: int = 0) -> list:
    """Numpy broadcasting, right-aligned: an operand axis of size 1 under a longer output axis is left out (it stays
    size 1); an axis whose broadcasting cannot be told (unknown sizes) is left out for every operand, so frozen.
    `trailing` axes at the end are not broadcast (MatMul's matrix axes)."""
    out = n.out_shape(0)
    rank = len(out)
    relations = []
    for a in range(rank - trailing):
        refs = [Out(0, a)]
        for i in inputs:
            shape = n.in_shape(i)
            k = a - (rank - len(shape))
            if k < 0:
                continue
            if shape[k] == out[a]:
                refs.append(In(i, k, role_of(i)))
            elif shape[k] == 1:
                continue
            else:
                refs = []  # unknown or inconsistent: leave the whole axis frozen
                break
        if refs:
            relations.append(couple(*refs))
    return relations
