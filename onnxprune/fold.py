"""Constant folding in normalisation: nodes whose inputs are all constants become initializers.

Exporters leave arithmetic on constants in the graph: pads and Reshape targets built with ConstantOfShape / Concat /
Slice / Cast, and weights computed from other weights (weight standardisation `W' = (W - mean(W)) / std(W)` before a
Conv). Every rule reads constants, so a computed one freezes what it touches. The nodes are evaluated with
`onnx.reference.ReferenceEvaluator` (no op semantics are re-implemented here).

Folding must not duplicate weights: nodes are folded by connected region, and a region is folded only when every
tensor it leaves behind is small, or when what it leaves behind takes no more bytes than the constants that die with
it (W' replaces W). Quantize/Dequantize nodes stay: a QDQ model keeps its quantized weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from . import lazy_tensors

log = logging.getLogger("onnxprune")

SMALL = 4096  # elements: a folded tensor this small is always worth a constant (shapes, pads, scales)
_EVALUATE_AT_MOST = 1 << 24  # input elements of one node the reference evaluator is asked to compute
# Not folded: random ops are not constants, and quantized formats keep their quantized weights.
_NEVER = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
          "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


@dataclass
class _Region:
    """Foldable nodes connected through the tensors they share."""

    nodes: list[int] = field(default_factory=list)  # positions in graph.node
    tensors: set[str] = field(default_factory=set)  # every input and output name of its nodes


def fold_constants(model: onnx.ModelProto, protected: set[str]) -> int:
    """Fold, in place, every region of constant-only nodes that is worth it. `protected` names (graph outputs,
    names read inside subgraphs) are never dropped; a graph output stays a node's output. Returns how many nodes
    were folded."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    values = _evaluate(graph, _opset(model), outputs, lazy_tensors.weights_folder(model))
    if not values:
        return 0
    folded: set[int] = set()
    frontiers: list[str] = []
    dead: list[str] = []
    readers, sizes = _readers(graph), {init.name: _bytes(init) for init in graph.initializer}
    for region in _regions(graph, values):
        frontier, dying = _frontier(graph, region, readers, protected), _dying(region, readers, sizes, protected)
        if _worth_folding(frontier, dying, values, sizes):
            frontiers += frontier
            dead += dying
            folded.update(region.nodes)
    if folded:
        _materialise(graph, frontiers, dead, values)
        _drop_nodes(graph, folded)
        log.info("folded %d constant nodes into initializers", len(folded))
    return len(folded)


def _opset(model: onnx.ModelProto) -> dict[str, int]:
    return {"": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 11)}


def _evaluate(graph: onnx.GraphProto, opsets: dict[str, int], outputs: set[str],
              folder: Path | None) -> dict[str, np.ndarray]:
    """The outputs of every foldable node, in graph order (graphs are topologically sorted). `folder`: where a
    lazily opened model's external tensors are read from (lazy_tensors)."""
    from onnx.reference import ReferenceEvaluator

    constants = {init.name: init for init in graph.initializer}
    values: dict[str, np.ndarray] = {}
    read: dict[str, np.ndarray] = {}  # initializers converted once
    for node in graph.node:
        if not _foldable(node, constants, values, outputs):
            continue
        inputs = {name: values[name] if name in values else read.setdefault(name, lazy_tensors.read(
            constants[name], folder)) for name in node.input if name}
        if sum(v.size for v in inputs.values()) > _EVALUATE_AT_MOST:
            continue
        try:
            results = ReferenceEvaluator(node, opsets=opsets).run(None, inputs)
            results = _as_declared(node, opsets[""], inputs, [np.asarray(r) for r in results])
        except Exception as exc:  # an op or type the reference evaluator lacks: the node stays
            log.debug("not folding %s '%s': %s", node.op_type, node.name, exc)
            continue
        values.update((name, v) for name, v in zip(node.output, results) if name)
    return values


def _as_declared(node: onnx.NodeProto, opset: int, inputs: dict[str, np.ndarray],
                 results: list[np.ndarray]) -> list[np.ndarray]:
    """The results in the element types ONNX type inference gives the node's outputs: the reference evaluator
    computes some ops in a wider type, and a folded constant of another type would break the graph."""
    schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    types = {name: onnx.helper.make_tensor_type_proto(onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
             for name, v in inputs.items()}
    declared = onnx.shape_inference.infer_node_outputs(schema, node, types)
    typed = []
    for name, value in zip(node.output, results):
        elem_type = declared[name].tensor_type.elem_type if name in declared else 0
        typed.append(value.astype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)) if elem_type else value)
    return typed


def _foldable(node: onnx.NodeProto, constants: dict, values: dict, graph_outputs: set[str]) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type in _NEVER or node.op_type == "Constant":
        return False
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return False
    inputs = [name for name in node.input if name]
    return (bool(inputs) and all(n in constants or n in values for n in inputs)
            and not any(o in graph_outputs for o in node.output))


def _regions(graph: onnx.GraphProto, values: dict[str, np.ndarray]) -> list[_Region]:
    """Connected groups of evaluated nodes: two nodes are connected when one reads what the other computes or both
    read the same constant (a weight dies only when all its readers fold together). Union-find over positions."""
    parent: dict[int, int] = {}
    first_seen: dict[str, int] = {}  # tensor -> the first evaluated node that touches it

    def find(p: int) -> int:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for position, node in enumerate(graph.node):
        if not node.output or not all(o in values for o in node.output if o):
            continue
        parent[position] = position
        for name in (n for n in list(node.input) + list(node.output) if n):
            parent[find(first_seen.setdefault(name, position))] = find(position)
    regions: dict[int, _Region] = {}
    for position in parent:  # in graph order
        region = regions.setdefault(find(position), _Region())
        region.nodes.append(position)
        region.tensors.update(n for n in list(graph.node[position].input) + list(graph.node[position].output) if n)
    return list(regions.values())


def _readers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    readers: dict[str, list[int]] = {}
    for position, node in enumerate(graph.node):
        for name in node.input:
            if name:
                readers.setdefault(name, []).append(position)
    return readers


def _frontier(graph: onnx.GraphProto, region: _Region, readers: dict[str, list[int]],
              protected: set[str]) -> list[str]:
    """What the region computes that something outside it (a subgraph too) reads: the initializers it leaves."""
    inside = set(region.nodes)
    outputs = [o for p in region.nodes for o in graph.node[p].output if o]
    return [o for o in outputs if o in protected or any(r not in inside for r in readers.get(o, []))]


def _dying(region: _Region, readers: dict[str, list[int]], sizes: dict[str, int], protected: set[str]) -> list[str]:
    """Initializers that only the region reads: they go when it folds."""
    inside = set(region.nodes)
    return [n for n in region.tensors if n in sizes and n not in protected
            and all(r in inside for r in readers.get(n, []))]


def _worth_folding(frontier: list[str], dying: list[str], values: dict[str, np.ndarray], sizes: dict[str, int]) -> bool:
    if all(values[name].size <= SMALL for name in frontier):
        return True
    return sum(values[name].nbytes for name in frontier) <= sum(sizes[name] for name in dying)


def _bytes(init: onnx.TensorProto) -> int:
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    return int(np.prod(init.dims, dtype=np.int64)) * itemsize


def _materialise(graph: onnx.GraphProto, frontier: list[str], dying: list[str], values: dict) -> None:
    """Drop the dying initializers in place (rebuilding the list would copy every weight) and add the results."""
    gone = set(dying)
    for position in reversed([p for p, init in enumerate(graph.initializer) if init.name in gone]):
        del graph.initializer[position]
    for position in reversed([p for p, vi in enumerate(graph.input) if vi.name in gone]):
        del graph.input[position]  # IR < 4 lists every initializer as an input
    graph.initializer.extend(numpy_helper.from_array(values[name], name) for name in frontier)


def _drop_nodes(graph: onnx.GraphProto, positions: set[int]) -> None:
    keep = [node for p, node in enumerate(graph.node) if p not in positions]
    del graph.node[:]
    graph.node.extend(keep)
