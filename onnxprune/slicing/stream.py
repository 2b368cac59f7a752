"""The residual stream of a transformer, as slicing sees it.

Stream tensors are of two kinds. A *sum* is what a norm reads: a tree of Adds (the residual connections) over
*terms*: a linear layer's output (its weight and bias can be rotated: `writer`), a row of an embedding table
(`table`), another stream tensor (`stream`: a norm's output on a post-LN skip, or a sum shared with a later sum on a
pre-LN stream), or anything else (`entry`: projected by an extra MatMul). A *norm output* is what a norm writes.
Every stream tensor is read by norms, by the sums' Adds, by linear layers (`layer` readers: the rotation is folded
into their weights) and by anything else (`exits`: the full width is rebuilt there, so the rest of the graph, and
its outputs, see what they saw before).

A sum is *centred* when only LayerNorms (which subtract the mean) read it, directly or through centred sums: its
mean along the hidden axis is then never seen, so it is folded away (the writers write mean-free values).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx

from ..graph import GraphIndex, ai_onnx_opset, node_attr
from ..layers import Layer, MatrixLayer, refittable
from .norms import Norm, find_norms


@dataclass(eq=False)
class Term:
    kind: str  # "writer", "table", "constant", "stream" or "entry"
    tensor: str  # the width-wide tensor the sum adds (the sum itself for a sum of one term)
    reader: tuple[onnx.NodeProto, int] | None  # the Add and its input that read it; None for the sum itself
    layer: Layer | None = None  # writer: the linear layer
    bias: tuple[onnx.NodeProto, int] | None = None  # writer: the Add after a MatMul and its constant input
    gather: onnx.NodeProto | None = None  # table: the Gather of rows
    movers: tuple[onnx.NodeProto, ...] = ()  # writer: Reshapes / Transposes after it that keep the last axis


@dataclass(eq=False)
class Sum:
    tensor: str
    adds: list[onnx.NodeProto] = field(default_factory=list)
    terms: list[Term] = field(default_factory=list)
    centred: bool = True


@dataclass(eq=False)
class Readers:
    """Who reads a stream tensor besides its own norms and sums."""

    layers: list[Layer] = field(default_factory=list)
    moved: list[tuple[list[onnx.NodeProto], list[Layer]]] = field(default_factory=list)  # chains of Reshapes and
    # Transposes that keep the last axis (a Gemm's 2-D rows, a sequence-first layout) ending at linear layers
    shapes: list[onnx.NodeProto] = field(default_factory=list)  # Shape nodes: they read the sliced tensor's shape
    exits: bool = False


@dataclass(eq=False)
class Stream:
    width: int
    norms: list[Norm]
    sums: dict[str, Sum]
    readers: dict[str, Readers]  # by stream tensor: every sum and every norm output

    def norm_reading(self, tensor: str) -> list[Norm]:
        return [n for n in self.norms if n.input == tensor]


class NoStream(Exception):
    """Why a model has no residual stream slicing understands (one line, shown in the summary)."""


def find_stream(index: GraphIndex) -> Stream:
    """The residual stream of the widest-spread hidden width: the width most norms normalise."""
    norms = find_norms(index)
    if not norms:
        raise NoStream("no LayerNormalization (or its decomposed form) over the last axis")
    width = Counter(n.width for n in norms).most_common(1)[0][0]
    norms = [n for n in norms if n.width == width]
    builder = _Builder(index, width, {n.output for n in norms})
    for norm in norms:
        builder.sum_of(norm.input)
    stream = Stream(width, norms, builder.sums, {})
    stream.readers = {t: _stream_readers(t, stream, index) for t in [*builder.sums, *builder.norm_outputs]}
    _mark_uncentred(stream)
    return stream


class _Builder:
    """Builds the sums, each once, from the tensors the norms read."""

    def __init__(self, index: GraphIndex, width: int, norm_outputs: set[str]):
        self.index, self.width, self.norm_outputs = index, width, norm_outputs
        self.sums: dict[str, Sum] = {}

    def sum_of(self, tensor: str) -> Sum:
        if tensor in self.sums:
            return self.sums[tensor]
        if tensor in self.norm_outputs:
            raise NoStream(f"a norm reads another norm's output '{tensor}' directly")
        self.sums[tensor] = found = Sum(tensor)
        self._expand(tensor, found, None)
        return found

    def _expand(self, tensor: str, into: Sum, reader: tuple[onnx.NodeProto, int] | None) -> None:
        """Add `tensor`'s terms to `into`: through Adds read by nothing else, down to the terms."""
        producer = self.index.producer.get(tensor)
        shared = len(self.index.consumers.get(tensor, [])) > 1 or tensor in self.index.graph_outputs
        if tensor != into.tensor and (tensor in self.norm_outputs or tensor in self.sums
                                      or (shared and self._stream_add(producer))):
            if tensor not in self.norm_outputs:
                self.sum_of(tensor)
            into.terms.append(Term("stream", tensor, reader))
        elif self._stream_add(producer) and (tensor == into.tensor or not shared):
            into.adds.append(producer)
            for position, operand in enumerate(producer.input):
                self._expand(operand, into, (producer, position))
        else:
            into.terms.append(self._leaf(tensor, reader, shared and tensor != into.tensor))

    def _stream_add(self, node: onnx.NodeProto | None) -> bool:
        """An Add of two tensors whose last axis is the stream's (broadcasting over the other axes commutes with a
        rotation of the last one) in the main graph."""
        if node is None or node.op_type != "Add" or len(node.input) != 2 or node.input[0] == node.input[1]:
            return False
        shapes = [self.index.shapes.get(name) for name in (*node.input, node.output[0])]
        return all(s and s[-1] == self.width for s in shapes) and node.output[0] not in self.index.body_values

    def _leaf(self, tensor: str, reader: tuple[onnx.NodeProto, int] | None, shared: bool) -> Term:
        producer = self.index.producer.get(tensor)
        value = self.index.array(tensor)
        if value is not None and value.dtype.kind == "f" and value.shape[-1:] == (self.width,):
            return Term("constant", tensor, reader)
        if producer is None or shared:
            return Term("entry", tensor, reader)
        movers = []
        while producer is not None and keeps_last_axis(producer, self.index, self.width) \
                and len(_nodes_reading(self.index, producer.input[0])) == 1:
            movers.insert(0, producer)
            producer = self.index.producer.get(producer.input[0])
        writer = self._writer(producer, movers[0].input[0] if movers else tensor) if producer is not None else None
        if writer is not None:
            return Term("writer", tensor, reader, layer=writer[0], bias=writer[1], movers=tuple(movers))
        producer = self.index.producer.get(tensor)
        if self._table(producer):
            return Term("table", tensor, reader, gather=producer)
        return Term("entry", tensor, reader)

    def _writer(self, node: onnx.NodeProto, tensor: str) -> tuple[Layer, tuple[onnx.NodeProto, int] | None] | None:
        """The linear layer writing `tensor` along its last axis, directly or through an Add of a constant bias."""
        bias = None
        if node.op_type == "Add" and len(node.input) == 2:
            constant = [i for i, name in enumerate(node.input) if self.index.array(name) is not None]
            if len(constant) != 1 or self.index.array(node.input[constant[0]]).shape not in ((self.width,),):
                return None
            inner = node.input[1 - constant[0]]
            if len(self.index.consumers.get(inner, [])) != 1 or inner in self.index.graph_outputs:
                return None
            bias, node = (node, constant[0]), self.index.producer.get(inner)
        layer = _matrix_layer(node, self.index) if node is not None else None
        rank = len(self.index.shapes.get(tensor) or ())
        if layer is None or layer.output_axis != rank - 1 or not self._own_bias_per_output(layer):
            return None
        return layer, bias

    def _own_bias_per_output(self, layer: Layer) -> bool:
        """No bias inside the layer (Gemm's C), or one value per output: what rotating the outputs can rotate."""
        inputs = layer.node.input
        if layer.bias is None or layer.bias.node != layer.node.name or len(inputs) <= 2 or not inputs[2]:
            return True
        value = self.index.array(inputs[2])
        return value is not None and value.size == self.width and value.shape[-1] == self.width

    def _table(self, node: onnx.NodeProto) -> bool:
        """A Gather of whole rows from a constant 2-D table of the stream's width."""
        table = self.index.array(node.input[0]) if node.op_type == "Gather" else None
        return (table is not None and table.ndim == 2 and table.shape[1] == self.width
                and int(node_attr(node, "axis", 0)) == 0 and table.dtype.kind == "f")


def _matrix_layer(node: onnx.NodeProto, index: GraphIndex) -> Layer | None:
    """A float Gemm or MatMul with a constant 2-D weight (what rotations fold into), or None."""
    layer = refittable(node, index)
    if not isinstance(layer, MatrixLayer) or index.array(layer.weight) is None or index.array(layer.weight).ndim != 2:
        return None
    return layer


def _stream_readers(tensor: str, stream: Stream, index: GraphIndex) -> Readers:
    """The linear layers reading `tensor` on its last axis, and whether anything else (an exit) reads it."""
    own = {id(n) for norm in stream.norm_reading(tensor) for n in norm.nodes}
    own |= {id(t.reader[0]) for s in stream.sums.values() for t in s.terms
            if t.kind == "stream" and t.tensor == tensor and t.reader is not None}
    found = Readers(exits=tensor in index.graph_outputs)
    rank = len(index.shapes.get(tensor) or ())
    for node in {id(n): n for n in index.consumers.get(tensor, [])}.values():
        if id(node) in own:
            continue
        layer = _matrix_layer(node, index)
        behind = _layers_behind(node, index, stream.width)
        if layer is not None and list(node.input).count(tensor) == 1 and node.input[0] == tensor \
                and _reads_last_axis(layer, rank):
            found.layers.append(layer)
        elif behind[1]:
            found.moved.append(behind)
        elif node.op_type == "Shape" and not node.attribute and (ai_onnx_opset(index.model) or 0) >= 10:
            found.shapes.append(node)
        else:
            found.exits = True
    return found


def keeps_last_axis(node: onnx.NodeProto, index: GraphIndex, width: int) -> bool:
    """A Transpose that leaves the last axis last, or a Reshape to a constant shape that ends in it: rows of the
    hidden axis moved or regrouped (a sequence-first layout, a Gemm's 2-D input), which commutes with rotating it."""
    before = index.shapes.get(node.input[0]) if node.input else None
    if not before or before[-1] != width or node.output[0] in index.graph_outputs:
        return False
    if node.op_type == "Transpose":
        perm = node_attr(node, "perm")
        return perm is not None and list(perm)[-1] == len(before) - 1
    if node.op_type != "Reshape" or int(node_attr(node, "allowzero", 0)):
        return False
    shape = index.array(node.input[1])
    return shape is not None and shape.size > 0 and int(shape.reshape(-1)[-1]) == width


def _layers_behind(node: onnx.NodeProto, index: GraphIndex, width: int) -> tuple[list[onnx.NodeProto], list[Layer]]:
    """From a node reading the stream: a chain of last-axis-keeping Reshapes and Transposes, each read by the next
    alone, and the linear layers that alone read its end; nothing where it ends elsewhere."""
    chain = []
    while keeps_last_axis(node, index, width):
        chain.append(node)
        readers = _nodes_reading(index, node.output[0])
        rank = len(index.shapes.get(node.output[0]) or ())
        layers = [_matrix_layer(n, index) for n in readers]
        if readers and all(layer is not None and layer.node.input[0] == node.output[0] and _reads_last_axis(layer, rank)
                           and list(layer.node.input).count(node.output[0]) == 1 for layer in layers):
            return chain, layers
        if len(readers) != 1:
            break
        node = readers[0]
    return [], []


def _nodes_reading(index: GraphIndex, tensor: str) -> list[onnx.NodeProto]:
    return list({id(n): n for n in index.consumers.get(tensor, [])}.values())


def _reads_last_axis(layer: Layer, rank: int) -> bool:
    """The layer contracts its input's last axis: a MatMul always, a Gemm without transA on a 2-D input."""
    return layer.output_axis == rank - 1


def _mark_uncentred(stream: Stream) -> None:
    """A sum keeps its mean where something but a LayerNorm reads it, or a sum that keeps its mean adds it."""
    for name, found in stream.sums.items():
        readers = stream.readers[name]
        found.centred = not (readers.layers or readers.exits or any(not n.centers for n in stream.norm_reading(name)))
    changed = True
    while changed:
        changed = False
        for found in stream.sums.values():
            for term in found.terms:
                source = stream.sums.get(term.tensor) if term.kind == "stream" else None
                if source is not None and source.centred and not found.centred:
                    source.centred, changed = False, True
