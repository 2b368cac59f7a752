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

import numpy as np
import onnx
from onnx import numpy_helper

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
    values = _evaluate(graph, _opset(model), outputs)
    if not values:
        return 0
    folded: set[int] = set()
    readers = _readers(graph)
    for region in _regions(graph, values):
        frontier, dying = _frontier(graph, region, readers, protected), _dying(graph, region, readers, protected)
        if _worth_folding(frontier, dying, values, graph):
            _materialise(graph, frontier, dying, values)
            folded.update(region.nodes)
    if folded:
        _drop_nodes(graph, folded)
        log.info("folded %d constant nodes into initializers", len(folded))
    return len(folded)


def _opset(model: onnx.ModelProto) -> dict[str, int]:
    return {"": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 11)}


def _evaluate(graph: onnx.GraphProto, opsets: dict[str, int], outputs: set[str]) -> dict[str, np.ndarray]:
    """The outputs of every foldable node, in graph order (graphs are topologically sorted)."""
    from onnx.reference import ReferenceEvaluator

    constants = {init.name: init for init in graph.initializer}
    values: dict[str, np.ndarray] = {}
    for node in graph.node:
        if not _foldable(node, constants, values, outputs):
            continue
        inputs = {name: values[name] if name in values else numpy_helper.to_array(constants[name])
                  for name in node.input if name}
        if sum(v.size for v in inputs.values()) > _EVALUATE_AT_MOST:
            continue
        try:
            results = ReferenceEvaluator(node, opsets=opsets).run(None, inputs)
        except Exception as exc:  # an op or type the reference evaluator lacks: the node stays
            log.debug("not folding %s '%s': %s", node.op_type, node.name, exc)
            continue
        values.update((name, np.asarray(v)) for name, v in zip(node.output, results) if name)
    return values


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
    read the same constant (a weight dies only when all its readers fold together)."""
    regions: list[_Region] = []
    owner: dict[str, _Region] = {}
    for position, node in enumerate(graph.node):
        if not node.output or not all(o in values for o in node.output if o):
            continue
        names = {n for n in list(node.input) + list(node.output) if n}
        touching = {id(owner[n]): owner[n] for n in names if n in owner}
        region = _merge(list(touching.values()), regions) if touching else _new_region(regions)
        region.nodes.append(position)
        region.tensors |= names
        for name in region.tensors:
            owner[name] = region
    return regions


def _new_region(regions: list[_Region]) -> _Region:
    regions.append(_Region())
    return regions[-1]


def _merge(parts: list[_Region], regions: list[_Region]) -> _Region:
    first = parts[0]
    for other in parts[1:]:
        first.nodes += other.nodes
        first.tensors |= other.tensors
        regions.remove(other)
    first.nodes.sort()
    return first


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


def _dying(graph: onnx.GraphProto, region: _Region, readers: dict[str, list[int]],
           protected: set[str]) -> list[str]:
    """Initializers that only the region reads: they go when it folds."""
    inside = set(region.nodes)
    initializers = {init.name for init in graph.initializer}
    return [n for n in region.tensors if n in initializers and n not in protected
            and all(r in inside for r in readers.get(n, []))]


def _worth_folding(frontier: list[str], dying: list[str], values: dict[str, np.ndarray],
                   graph: onnx.GraphProto) -> bool:
    if all(values[name].size <= SMALL for name in frontier):
        return True
    sizes = {init.name: _bytes(init) for init in graph.initializer}
    return sum(values[name].nbytes for name in frontier) <= sum(sizes[name] for name in dying)


def _bytes(init: onnx.TensorProto) -> int:
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    return int(np.prod(init.dims, dtype=np.int64)) * itemsize


def _materialise(graph: onnx.GraphProto, frontier: list[str], dying: list[str], values: dict) -> None:
    gone = set(dying)
    keep = [init for init in graph.initializer if init.name not in gone]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [vi for vi in graph.input if vi.name not in gone]  # IR < 4 lists every initializer as an input
    if len(inputs) != len(graph.input):
        del graph.input[:]
        graph.input.extend(inputs)
    graph.initializer.extend(numpy_helper.from_array(values[name], name) for name in frontier)


def _drop_nodes(graph: onnx.GraphProto, positions: set[int]) -> None:
    keep = [node for p, node in enumerate(graph.node) if p not in positions]
    del graph.node[:]
    graph.node.extend(keep)
