"""Quantization ops: QDQ models (QuantizeLinear / DequantizeLinear around weights and activations, as onnxruntime's
`quantize_static(..., quant_format=QuantFormat.QDQ)` writes them) prune like their float graph; QOperator and
dynamically quantized ops freeze with the reason.

Quantizing and dequantizing are element-wise, so every axis flows from input to output. A per-axis scale and zero
point hold one value per index of the quantized axis: they are sliced with it. A per-tensor one (a scalar, or a
one-element vector) applies to every channel and is kept. A removed channel stays zero through a pair: 0 quantizes
to the zero point, which a DequantizeLinear with the same zero point turns back into 0, so the float graph's
exactness carries over to the quantized domain. A non-zero zero point read otherwise (a Cast of the integers, a
DequantizeLinear of other integers) is what a removed channel becomes, and the zero flow is told so.

A constant's integer data gets the roles its readers give the dequantized value: a layer's weight or bias roles
(`layers.weight_roles`), else the role the reader's rule gives that operand (a bias Add's constant). Criteria then
find the layer's kernels behind the DequantizeLinear, and the exactness harness zeroes a removed channel where a float
model's would be, to the zero point (`layers.stored_zero`); the zero flow stays true.
"""
from __future__ import annotations

import numpy as np

from ..layers import weight_roles
from ..roles import Role
from .registry import Barrier, Couple, In, NodeView, Out, Rule, couple, rule, rule_for


@rule("QuantizeLinear", "DequantizeLinear")
def quantize_linear(n: NodeView) -> Rule:
    rank = len(n.in_shape(0))
    if len(n.out_shape(0)) != rank:
        raise Barrier("input and output ranks differ")
    axis = _quantized_axis(n, rank)
    params = [In(i, 0) for i in (1, 2) if n.has_input(i)] if axis is not None else []
    roles = _reader_roles(n, rank) if _from_constant(n) else {}
    at_zero = _at_zero(n)
    return Rule(*[couple(In(0, a, roles.get(a)), Out(0, a), *(params if a == axis else ()), at_zero=at_zero)
                  for a in range(rank)])


def _from_constant(n: NodeView) -> bool:
    """The node quantizes or dequantizes a constant (directly, or the quantized float constant of a Q -> DQ pair)."""
    producer = n.index.producer.get(n.node.input[0])
    return n.const(0) is not None or (producer is not None and producer.op_type == "QuantizeLinear"
                                      and producer.input[0] in n.index.initializers)


def _at_zero(n: NodeView) -> str | None:
    """What a removed (zero) channel becomes where that is not 0 to the nodes that read it: see the module notes.
    A dequantized constant is zeroed to its zero point (layers.stored_zero), so it stays zero."""
    zero_point = _zero_point(n.node, n)
    if zero_point is not None and not np.any(zero_point):
        return None
    if n.op == "QuantizeLinear":
        readers = n.index.consumers.get(n.node.output[0], [])
        if readers and all(r.op_type == "DequantizeLinear" and _same_zero_point(n.node, r, n) for r in readers):
            return None
        return "QuantizeLinear(0) is its zero point, which a reader takes as it is"
    producer = n.index.producer.get(n.node.input[0])
    if _from_constant(n) or (producer is not None and producer.op_type == "QuantizeLinear"
                             and _same_zero_point(producer, n.node, n)):
        return None
    return "DequantizeLinear(0) is -(zero point) * scale"


def _zero_point(node, n: NodeView) -> np.ndarray | None:
    """A Q or DQ node's zero point as stored (absent: 0); None where it is computed at run time."""
    if len(node.input) < 3 or not node.input[2]:
        return np.zeros(())
    return n.index.array(node.input[2])


def _same_zero_point(a, b, n: NodeView) -> bool:
    first, second = _zero_point(a, n), _zero_point(b, n)
    return (first is not None and second is not None and first.size == second.size
            and np.array_equal(first.reshape(-1), second.reshape(-1)))


def _quantized_axis(n: NodeView, rank: int) -> int | None:
    """The data axis a per-axis scale runs along; None for a per-tensor scale (one value for every channel)."""
    if int(n.attr("block_size", 0)):
        raise Barrier("blocked quantization (block_size): a scale covers a block of channels")
    scale = n.in_shape(1)
    if len(scale) == 0 or (len(scale) == 1 and scale[0] == 1):
        return None
    if len(scale) > 1:
        raise Barrier(f"scale of rank {len(scale)} (blocked quantization)")
    axis = int(n.attr("axis", 1))
    if not -rank <= axis < rank:
        raise Barrier(f"axis {axis} out of range")
    if n.has_input(2) and tuple(n.in_shape(2)) != tuple(scale):
        raise Barrier("zero point and scale shapes differ")
    return axis % rank


def _reader_roles(n: NodeView, rank: int) -> dict[int, Role]:
    """By axis, the roles the readers of a dequantized (or quantized) constant give it: what they would give the
    constant in the float model. A layer's description decides for its weight and bias (a MatMul's rule tags only
    constant operands)."""
    output, roles = n.node.output[0], {}
    for reader in n.index.consumers.get(output, []):
        for ref in _reader_refs(reader, n):
            if ref.side == "in" and ref.role is not None and reader.input[ref.index] == output:
                roles.setdefault(ref.axis % rank, ref.role)
    return {**roles, **weight_roles(output, n.index)}


def _reader_refs(reader, n: NodeView) -> list:
    """The refs of a reader's couples, by its own rule; none where it has no rule or freezes."""
    fn = rule_for(reader)
    try:
        relations = fn(NodeView(reader, n.index, n.opset)).relations if fn is not None else []
    except Barrier:
        return []
    return [ref for rel in relations if isinstance(rel, Couple) for ref in rel.refs]


@rule("QLinearConv", "QLinearMatMul")
def qoperator(n: NodeView) -> Rule:
    raise Barrier(f"{n.op} (QOperator format) is not pruned: quantize with QuantFormat.QDQ, whose DequantizeLinear "
                  "weights prune like float ones")


@rule("ConvInteger", "MatMulInteger")
def integer_layer(n: NodeView) -> Rule:
    raise Barrier(f"{n.op} (dynamic quantization) is not pruned: prune the float model, then quantize it")
