"""Comparisons: broadcast like the other element-wise ops, except where they turn the graph input into a one-hot
(the input compared with a constant range, as a byte-level model embeds its bytes): the axis the range spreads
holds data, not learned channels, and pruning it would change what the model reads."""
from __future__ import annotations

from ..graph import GraphIndex
from ..layers import describe
from .elementwise import broadcast
from .registry import Barrier, NodeView, Rule, rule

COMPARISONS = ("Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual")
ONE_HOT = "one-hot of the input: data, not a learned channel"


@rule(*COMPARISONS)
def comparison(n: NodeView) -> Rule:
    if _one_hot_of_input(n):
        raise Barrier(ONE_HOT)
    return broadcast(n)


@rule("OneHot")
def one_hot(n: NodeView) -> Rule:
    raise Barrier(ONE_HOT if from_graph_input(n.index, n.node.input[0]) else
                  "one-hot of a computed index: data, not a learned channel")


def _one_hot_of_input(n: NodeView) -> bool:
    """One operand computed from a graph input, the other a constant that spreads it over an axis where the input
    has size 1 (x[..., None] == range(257))."""
    computed = [i for i in range(2) if n.has_input(i) and n.const(i) is None]
    if len(computed) != 1 or n.const(1 - computed[0]) is None:
        return False
    data, constant = n.in_shape(computed[0]), n.in_shape(1 - computed[0])
    if not from_graph_input(n.index, n.node.input[computed[0]]):
        return False
    rank = len(n.out_shape(0))
    return any(_size(constant, a, rank) > 1 and _size(data, a, rank) == 1 for a in range(rank))


def _size(shape: tuple, axis: int, rank: int) -> int:
    """The size an operand has at output axis `axis` under right-aligned broadcasting (1 where it has no such
    axis); 0 where it is known only at run time."""
    k = axis - (rank - len(shape))
    return 1 if k < 0 else shape[k] if isinstance(shape[k], int) else 0


def from_graph_input(index: GraphIndex, name: str) -> bool:
    """Whether `name` is computed from a graph input without passing a weight layer: the data itself (cast,
    reshaped, offset), not an activation."""
    seen, todo = set(), [name]
    while todo:
        tensor = todo.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        if tensor in index.graph_inputs:
            return True
        node = index.producer.get(tensor)
        if node is not None and describe(node, index) is None:
            todo += [t for t in node.input if t and t not in index.initializers]
    return False
