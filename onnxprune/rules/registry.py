"""The op registry: one entry per op declares how channels flow through it and what to fix after pruning.

A rule function receives a `NodeView` and returns a `Rule`: relations between the node's dimensions (`In(i, axis)`,
`Out(i, axis)`, node-local `Pseudo` spaces) and an optional fixup run during surgery. Constant inputs are dimensions
like any other: coupling a weight's axis to an activation's channel axis is what makes surgery slice it.

Every axis of every tensor a node touches that its rule does not mention is frozen; an op with no entry, or whose
rule raises `Barrier`, freezes everything it touches. Nothing is ever assumed element-wise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import onnx
from onnx import helper

from ..graph import Dims, GraphIndex
from ..roles import Role


@dataclass(frozen=True)
class Ref:
    """A dimension seen from a node: input/output `index` at `axis` (negative counts from the end), or a
    node-local pseudo space named `index` (e.g. a grouped conv's groups)."""

    side: str  # "in" | "out" | "pseudo" | "body_in" | "body_out"
    index: int | str
    axis: int = 0
    role: Role | None = None  # what a constant tensor on this axis is to this node
    size: int | None = None  # pseudo spaces only
    graph: str | None = None  # body_in / body_out: the subgraph attribute ("body", "then_branch", ...)


def In(index: int, axis: int, role: Role | None = None) -> Ref:  # noqa: N802 - reads like the DESIGN notation
    return Ref("in", index, axis, role)


def Out(index: int, axis: int) -> Ref:  # noqa: N802
    return Ref("out", index, axis)


def Pseudo(name: str, size: int | None = None) -> Ref:  # noqa: N802
    return Ref("pseudo", name, 0, None, size)


def BodyIn(graph: str, index: int, axis: int) -> Ref:  # noqa: N802
    """Input `index` of the node's subgraph `graph` (a Loop or Scan body's carried state or scan element)."""
    return Ref("body_in", index, axis, graph=graph)


def BodyOut(graph: str, index: int, axis: int) -> Ref:  # noqa: N802
    """Output `index` of the node's subgraph `graph` (an If branch's result, a body's next state or scan element)."""
    return Ref("body_out", index, axis, graph=graph)


@dataclass(frozen=True)
class Couple:
    """The same channels, index for index. `inexact` says why removing them changes the result even when the
    channels are zero (a LayerNorm over the axis).

    What the op makes of a removed channel, zero in its inputs: by default zero where every coupled activation input
    is (or where a zeroed weight or norm scale multiplies it); `product`: zero where any is (Mul); `at_zero`: not
    zero, with what it is ("Sigmoid(0) = 0.5"), `finite` False when that is inf or NaN. A removed channel that is
    not zero where a layer consumes it makes its group inexact (groups.ZeroFlow)."""

    refs: tuple[Ref, ...]
    inexact: str | None = None
    at_zero: str | None = None
    finite: bool = True
    product: bool = False


@dataclass(frozen=True)
class Compose:
    """`whole` is the concatenation of `parts` (Concat output, Split input, Slice input)."""

    whole: Ref
    parts: tuple[Ref, ...]


@dataclass(frozen=True)
class Expand:
    """Each index c of `coarse` is the block [c*inner, (c+1)*inner) of `fine` (Flatten into a linear layer,
    heads reshaped out of a hidden dimension, channels of a grouped conv's group)."""

    fine: Ref
    coarse: Ref
    inner: int
    alternative: Ref | None = None  # for a split axis: the inner part, which the other reading would keep


Relation = Couple | Compose | Expand


def couple(*refs: Ref, inexact: str | None = None, at_zero: str | None = None, finite: bool = True,
           product: bool = False) -> Couple:
    return Couple(tuple(refs), inexact, at_zero, finite, product)


def compose(whole: Ref, *parts: Ref) -> Compose:
    return Compose(whole, tuple(parts))


def expand(fine: Ref, coarse: Ref, inner: int, alternative: Ref | None = None) -> Expand:
    return Expand(fine, coarse, int(inner), alternative)


class FixContext(Protocol):
    """What surgery offers a fixup (see surgery.py)."""

    def new_size(self, ref: Ref) -> int: ...  # the size after pruning (the old one where nothing changed)
    def set_attr(self, name: str, value: object) -> None: ...
    def set_const_input(self, index: int, value: np.ndarray, node: onnx.NodeProto | None = None) -> None: ...
    def remove_attr(self, name: str) -> None: ...


Fixup = Callable[["NodeView", FixContext], None]


class Rule:
    def __init__(self, *relations: Relation, fixup: Fixup | None = None):
        self.relations = list(relations)
        self.fixup = fixup


class Barrier(Exception):
    """Raised by a rule for a configuration it does not handle: the node freezes everything it touches."""


RuleFn = Callable[["NodeView"], Rule]
REGISTRY: dict[str, RuleFn] = {}


def rule(*ops: str) -> Callable[[RuleFn], RuleFn]:
    def register(fn: RuleFn) -> RuleFn:
        for op in ops:
            if op in REGISTRY:
                raise ValueError(f"duplicate rule for {op}")
            REGISTRY[op] = fn
        return fn
    return register


def rule_for(node: onnx.NodeProto) -> RuleFn | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    return REGISTRY.get(node.op_type)


class NodeView:
    """A node with its shapes and constant inputs, as rules and fixups see it."""

    def __init__(self, node: onnx.NodeProto, index: GraphIndex, opset: int, tile: int = 0):
        self.node = node
        self.index = index
        self.opset = opset
        self.tile = tile  # read split axes as the inner part repeated, nested `tile` levels deep (see groups.analyze)
        self._attrs = {a.name: a for a in node.attribute}

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def name(self) -> str:
        return self.node.name

    def attr(self, name: str, default: object = None) -> object:
        a = self._attrs.get(name)
        return default if a is None else helper.get_attribute_value(a)

    def has_input(self, i: int) -> bool:
        return i < len(self.node.input) and bool(self.node.input[i])

    def has_output(self, i: int) -> bool:
        return i < len(self.node.output) and bool(self.node.output[i])

    def used_output(self, i: int) -> bool:
        """An optional output that something reads (a consumer or the graph output)."""
        if not self.has_output(i):
            return False
        name = self.node.output[i]
        return name in self.index.consumers or name in self.index.graph_outputs

    def in_shape(self, i: int) -> Dims:
        return self._shape(self.node.input[i] if self.has_input(i) else None, f"input {i}")

    def out_shape(self, i: int) -> Dims:
        return self._shape(self.node.output[i] if self.has_output(i) else None, f"output {i}")

    def subgraph(self, attr: str) -> onnx.GraphProto:
        """The node's subgraph held in attribute `attr` ("body", "then_branch", "else_branch")."""
        graph = self.attr(attr)
        if not isinstance(graph, onnx.GraphProto):
            raise Barrier(f"no subgraph '{attr}'")
        return graph

    def body_value(self, ref: Ref) -> str:
        """The name of the subgraph input or output a body_in / body_out ref names."""
        values = self.subgraph(ref.graph).input if ref.side == "body_in" else self.subgraph(ref.graph).output
        if not 0 <= ref.index < len(values):
            raise Barrier(f"subgraph '{ref.graph}' has no {'input' if ref.side == 'body_in' else 'output'} {ref.index}")
        return values[ref.index].name

    def body_shape(self, ref: Ref) -> Dims:
        return self._shape(self.body_value(ref), f"{ref.graph} {'input' if ref.side == 'body_in' else 'output'} "
                                                 f"{ref.index}")

    def _shape(self, name: str | None, what: str) -> Dims:
        shape = self.index.shapes.get(name) if name else None
        if shape is None:
            raise Barrier(f"shape of {what} unknown")
        return shape

    def refine_out_shape(self, i: int, shape: Dims) -> None:
        """Record sizes a rule worked out that shape inference left unknown (later nodes and surgery read them)."""
        name = self.node.output[i]
        old = self.index.shapes.get(name)
        if old is not None and len(old) == len(shape) and all(
                not is_static(o) or o == s for o, s in zip(old, shape)):
            self.index.shapes[name] = tuple(shape)

    def const(self, i: int) -> np.ndarray | None:
        return self.index.array(self.node.input[i]) if self.has_input(i) else None

    def ints(self, attr: str, input_index: int) -> list[int] | None:
        """An int list given as an attribute (older opsets) or as a constant input (newer ones).

        Raises Barrier when the input exists but is computed at run time."""
        value = self.attr(attr)
        if value is not None:
            return [int(v) for v in value]
        if not self.has_input(input_index):
            return None
        array = self.const(input_index)
        if array is None:
            raise Barrier(f"'{attr}' computed at run time")
        return [int(v) for v in array.reshape(-1)]


def is_static(dim: object) -> bool:
    return isinstance(dim, int)


def identity_couples(view: NodeView, in_index: int = 0, out_index: int = 0, skip: tuple[int, ...] = (),
                     at_zero: str | None = None, finite: bool = True) -> list[Couple]:
    """Couple every axis of an input with the same axis of an output (element-wise and per-channel ops); `at_zero`
    and `finite` as in Couple."""
    rank = len(view.in_shape(in_index))
    if len(view.out_shape(out_index)) != rank:
        raise Barrier("input and output ranks differ")
    return [couple(In(in_index, a), Out(out_index, a), at_zero=at_zero, finite=finite)
            for a in range(rank) if a not in skip]
