"""Element-wise ops: unary ops keep every axis; n-ary ops couple the axes that broadcasting lines up."""
from __future__ import annotations

from ..roles import Role
from .registry import In, NodeView, Out, Rule, couple, identity_couples, rule

UNARY = (
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Softplus", "Softsign",
    "Elu", "Selu", "Celu", "ThresholdedRelu", "Mish", "Identity", "Cast", "Abs", "Neg", "Sqrt", "Exp", "Log",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Not", "IsNaN", "IsInf",
)


@rule(*UNARY)
def unary(n: NodeView) -> Rule:
    # Clip's min/max inputs are scalars: no axes to couple.
    return Rule(*identity_couples(n))


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
      "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "BitShift", "Mod")
def broadcast(n: NodeView) -> Rule:
    roles = _ROLES.get(n.op, {})
    inputs = [i for i in range(len(n.node.input)) if n.has_input(i)]
    return Rule(*broadcast_couples(n, inputs, lambda i: roles.get(i, Role.CONST)))


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
