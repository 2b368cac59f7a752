"""Writing the sliced model: each sum of the stream in its own basis (its leading principal directions), folded
into the weights that write it and read it.

A sum s is kept as z = E^T s (E = Q, or C Q for a centred sum, C the mean-removing projection), so its writers get
W E and b E, its embedding tables T E; a LayerNorm reading it becomes an RMS norm of z whose mean square divides by
the ORIGINAL width (the norm of z is the norm of the mean-free sum when nothing is sliced), and its output is
`gamma * Q n + beta` for the normalised n: the layers reading it take Q^T diag(gamma) W and b + beta W. A stream
tensor one sum adds to another (a post-LN skip, or a pre-LN sum read by the next sum) enters that sum through a
small (k x k) matrix and a bias; anything else that reads a stream tensor gets it rebuilt at full width under its
own name, so the graph's outputs keep their names and shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import GraphIndex, outer_scope_names, subgraphs_of
from ..groups import SLICED
from ..layers import Layer, StoredTensors
from .stream import Stream, Sum, Term




@dataclass(frozen=True)
class Basis:
    q: np.ndarray  # (width, kept), orthonormal columns
    centred: bool

    @property
    def encoder(self) -> np.ndarray:
        """E with z = E^T s: the mean along the hidden axis removed first for a centred sum."""
        return self.q - self.q.mean(axis=0, keepdims=True) if self.centred else self.q


@dataclass(frozen=True)
class Coordinates:
    """A stream tensor (the mean-free part of a centred sum) is `a @ z + c` for its sliced values z."""

    a: np.ndarray  # (width, kept)
    c: np.ndarray  # (width,)


@dataclass
class Counts:
    skips: int = 0  # k x k matrices between stream tensors
    entries: int = 0  # projections of tensors slicing does not know how to rotate
    exits: int = 0  # rebuilds of the full width
    folded: int = 0  # layers and tables with a rotation folded in


class Rewriter:
    """Rewrites `model` in place (its `stream`, found on `index`) with a basis per sum; `run` once."""

    def __init__(self, model: onnx.ModelProto, index: GraphIndex, stream: Stream, bases: dict[str, Basis]):
        self.model, self.index, self.stream, self.bases = model, index, stream, bases
        self.inits = {i.name: i for i in model.graph.initializer}
        self.new_nodes: list[onnx.NodeProto] = []
        self.used = {n for node in index.nodes for n in (*node.input, *node.output)} | set(self.inits)
        self.coordinates = {name: Coordinates(b.q, np.zeros(len(b.q))) for name, b in bases.items()}
        self.counts = Counts()
        self.removed: set[int] = set()  # the norms' nodes (ids), dropped when the graph is rebuilt at the end
        self.projected: list[tuple[str, str, np.ndarray]] = []  # writers and projections in: (sliced output,
        # original output, E), what the reference for least squares computes (see slicing._reference)

    def run(self) -> Counts:
        for norm in self.stream.norms:
            basis = self.bases[norm.input]
            self.coordinates[norm.output] = Coordinates(norm.gamma[:, None] * basis.q, norm.beta)
        for found in self.stream.sums.values():
            self._write_sum(found)
        for norm in self.stream.norms:
            self._write_norm(norm)
        for tensor, readers in self.stream.readers.items():
            for layer in readers.layers:
                self._fold_reader(layer, tensor)
            for chain, layers in readers.moved:
                chain[0].input[0] = self.sliced(tensor)
                self._narrow(chain, self.coordinates[tensor].a.shape[1])
                for layer in layers:
                    self._fold_reader(layer, tensor, rewire=False)
            for shape in readers.shapes:
                self._full_shape(shape, tensor)
            if readers.exits:
                self._rebuild(tensor)
        self._finish()
        return self.counts

    # ------------------------------------------------------------------------------------------------ sums

    def _write_sum(self, found: Sum) -> None:
        for term in found.terms:
            made = getattr(self, f"_{term.kind}")(term, found.tensor)
            if term.reader is not None and made is not None:
                term.reader[0].input[term.reader[1]] = made
        if found.adds:
            self.index.producer[found.tensor].output[0] = self.sliced(found.tensor)

    def _writer(self, term: Term, into: str) -> None:
        encoder = self.bases[into].encoder
        layer = term.layer
        kernels = layer.kernels(self.value(layer.weight))  # (width, features)
        self.replace_input(layer.node, 1, _from_kernels(layer, encoder.T @ kernels))
        if term.bias is not None:
            self.replace_input(term.bias[0], term.bias[1], self.value(term.bias[0].input[term.bias[1]]) @ encoder)
        elif layer.bias is not None and layer.bias.node == layer.node.name and len(layer.node.input) > 2 \
                and layer.node.input[2]:
            self.replace_input(layer.node, 2, self.value(layer.node.input[2]).reshape(-1) @ encoder)
        self.counts.folded += 1
        original = layer.node.output[0]
        self._narrow(term.movers, encoder.shape[1])
        if term.reader is None:
            last = term.movers[-1] if term.movers else term.bias[0] if term.bias is not None else layer.node
            last.output[0] = self.sliced(term.tensor)
        self.projected.append((layer.node.output[0], original, encoder))

    def _table(self, term: Term, into: str) -> None:
        encoder = self.bases[into].encoder
        self.replace_input(term.gather, 0, self.value(term.gather.input[0]) @ encoder)
        self.counts.folded += 1
        if term.reader is None:
            term.gather.output[0] = self.sliced(term.tensor)

    def _constant(self, term: Term, into: str) -> str:
        """A constant added to the stream (a position embedding), rotated; a sum of one constant stays one."""
        encoder = self.bases[into].encoder
        self.counts.folded += 1
        if term.reader is not None:
            return self.constant(self.value(term.tensor) @ encoder, "constant")
        return self.node("Identity", [self.constant(self.value(term.tensor) @ encoder, "constant")], "constant",
                         self.sliced(term.tensor))

    def _stream(self, term: Term, into: str) -> str:
        """The source's sliced values in this sum's basis: z_source (A^T E) + c E."""
        encoder = self.bases[into].encoder
        source = self.coordinates[term.tensor]
        self.counts.skips += 1
        return self.affine(self.sliced(term.tensor), source.a.T @ encoder, source.c @ encoder, "skip")

    def _entry(self, term: Term, into: str) -> str:
        encoder = self.bases[into].encoder
        self.counts.entries += 1
        out = self.sliced(term.tensor) if term.reader is None else None
        made = self.affine(term.tensor, encoder, None, "entry", out)
        self.projected.append((made, term.tensor, encoder))  # a layer: recovery may re-fit it
        return made

    # ------------------------------------------------------------------------------------------------ norms

    def _write_norm(self, norm) -> None:
        """The RMS norm of the sliced sum, over the original width; a LayerNorm reading a sum that keeps its mean
        removes it first (a k x k projection)."""
        found, basis = self.stream.sums[norm.input], self.bases[norm.input]
        values = self.sliced(norm.input)
        if norm.centers and not found.centred:
            q = basis.q
            values = self.affine(values, q.T @ (q - q.mean(axis=0, keepdims=True)), None, "centre")
        kept, width = basis.q.shape[1], norm.width
        squares = self.node("Mul", [values, values], "square")
        mean = self.node("MatMul", [squares, self.constant(np.full((kept, 1), 1.0 / width), "mean")], "mean")
        shifted = self.node("Add", [mean, self.constant(np.array(norm.epsilon), "epsilon")], "variance")
        root = self.node("Sqrt", [shifted], "root")
        self.node("Div", [values, root], "normalised", self.sliced(norm.output))
        self.removed.update(id(n) for n in norm.nodes)

    # ------------------------------------------------------------------------------------------------ readers

    def _narrow(self, movers, kept: int) -> None:
        """Reshapes and Transposes that keep the hidden axis last, made to keep the `kept` sliced ones."""
        for reshape in (n for n in movers if n.op_type == "Reshape"):
            shape = numpy_helper.to_array(self.inits[reshape.input[1]]).copy()
            shape.reshape(-1)[-1] = kept
            reshape.input[1] = self.constant(shape, "shape")

    def _fold_reader(self, layer: Layer, tensor: str, rewire: bool = True) -> None:
        """W' = A^T W on the input axis; what the constant c adds goes to the layer's bias (an Add if none).
        `rewire`: the layer reads the sliced tensor itself (not through a Reshape)."""
        where = self.coordinates[tensor]
        kernels = layer.kernels(self.value(layer.weight))  # (outputs, width)
        delta = layer.alpha * (kernels.astype(np.float64) @ where.c)
        self.replace_input(layer.node, 1, _from_kernels(layer, kernels @ where.a))
        if rewire:
            layer.node.input[0] = self.sliced(tensor)
        self.counts.folded += 1
        if not np.any(delta) or StoredTensors(self.model).add_to_bias(layer, delta.astype(np.float32)):
            return
        output = layer.node.output[0]
        layer.node.output[0] = self.fresh(f"{output}_unbiased")
        self.node("Add", [layer.node.output[0], self.constant(delta, "bias")], "bias", output)

    def _rebuild(self, tensor: str) -> None:
        """The full width again, under the tensor's own name, for what else reads it; nothing where the tensor is
        still there as it was (a graph input, or a sum of one term projected in: its readers read the original)."""
        producer = self.index.producer.get(tensor)
        if tensor in self.index.graph_inputs or (producer is not None and tensor in producer.output
                                                  and id(producer) not in self.removed):
            return
        where = self.coordinates[tensor]
        self.counts.exits += 1
        self.affine(self.sliced(tensor), where.a.T, where.c if np.any(where.c) else None, "exit", tensor)

    def _full_shape(self, node: onnx.NodeProto, tensor: str) -> None:
        """Shape of the sliced tensor with its last size put back: Concat(Slice(Shape(z), 0, -1), [width])."""
        output = node.output[0]
        node.input[0], node.output[0] = self.sliced(tensor), self.fresh(f"{output}_sliced")
        ints = [self.constant(np.array([v], np.int64), "index") for v in (0, -1, 0, self.stream.width)]
        leading = self.node("Slice", [node.output[0], *ints[:3]], "leading_sizes")
        self.node("Concat", [leading, ints[3]], "full_shape", output, axis=0)

    # ------------------------------------------------------------------------------------------------ graph edits

    def sliced(self, tensor: str) -> str:
        return f"{tensor}{SLICED}"

    def fresh(self, base: str) -> str:
        name, count = base, 0
        while name in self.used:
            count += 1
            name = f"{base}_{count}"
        self.used.add(name)
        return name

    def constant(self, value: np.ndarray, base: str) -> str:
        """A new initializer: float32, or the integers given."""
        value = np.asarray(value)
        value = value if value.dtype.kind in "iu" else value.astype(np.float32)
        tensor = numpy_helper.from_array(value, self.fresh(f"slicing/{base}"))
        self.model.graph.initializer.append(tensor)
        self.inits[tensor.name] = tensor
        return tensor.name

    def value(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name]).astype(np.float64)

    def replace_input(self, node: onnx.NodeProto, position: int, value: np.ndarray) -> None:
        node.input[position] = self.constant(value, f"{node.name}/{position}")

    def node(self, op: str, inputs: list[str], base: str, output: str | None = None, **attrs) -> str:
        output = output or self.fresh(f"slicing/{base}")
        self.new_nodes.append(helper.make_node(op, inputs, [output], name=self.fresh(f"slicing/{base}_node"), **attrs))
        return output

    def affine(self, tensor: str, matrix: np.ndarray, bias: np.ndarray | None, base: str,
               output: str | None = None) -> str:
        """tensor @ matrix (+ bias): the one kind of node slicing adds besides the RMS norms."""
        product = self.node("MatMul", [tensor, self.constant(matrix, base)], base, None if bias is not None else output)
        return product if bias is None else self.node("Add", [product, self.constant(bias, f"{base}_bias")], base,
                                                      output)

    def _finish(self) -> None:
        graph = self.model.graph
        nodes = [n for n in graph.node if id(n) not in self.removed] + self.new_nodes
        nodes = _topological(nodes, {i.name for i in graph.input} | set(self.inits))
        del graph.node[:]
        graph.node.extend(nodes)
        read = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
        read |= {name for node in nodes for sub in subgraphs_of(node) for name in outer_scope_names(sub)}
        kept = [i for i in graph.initializer if i.name in read]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        del graph.value_info[:]


def _from_kernels(layer: Layer, kernels: np.ndarray) -> np.ndarray:
    """(outputs, inputs) kernels back into the layer's weight layout."""
    return np.moveaxis(kernels, (0, 1), (layer.out_axis, layer.in_axis))


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """The nodes in an order where each comes after what it reads (stable: the original order where it can)."""
    ready, done, pending = set(available) | {""}, [], list(nodes)
    needs = {id(n): set(n.input) | {x for sub in subgraphs_of(n) for x in outer_scope_names(sub)} for n in nodes}
    while pending:
        left = []
        for node in pending:
            if needs[id(node)] <= ready:
                done.append(node)
                ready.update(node.output)
            else:
                left.append(node)
        if len(left) == len(pending):
            raise ValueError(f"slicing left a cycle or a missing input at '{left[0].name}'")
        pending = left
    return done
