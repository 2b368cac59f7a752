"""Fold the constants that removed channels carry into the layers that sum them (issue 10).

zeroflow.py finds where a channel the plan removes is not zero but a known constant v_c when it reaches a layer that
sums it the same way at every output (`Analysis.folds`): that layer's outputs lost v_c times its summed kernels for
channel c, which its bias takes instead, so the pruned model equals the original with the channels zeroed.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .allocate import Plan
from .errors import OnnxPruneError
from .groups import Analysis
from .layers import Layer, MatrixLayer, StoredTensors, constant_values, describe


def carried_contributions(analysis: Analysis, plan: Plan) -> dict[str, tuple[Layer, np.ndarray]]:
    """Per layer, what the channels the plan removes add to each of its outputs (all of them, before pruning): the
    constants they carry times the summed kernels. Read before surgery slices the weights."""
    index, found = analysis.index, {}
    nodes = {n.name: n for n in index.nodes}
    for fold in analysis.folds:
        kept = analysis.kept_indices(fold.space, plan.keep)
        removed = np.setdiff1d(np.arange(len(fold.value)), kept) if kept is not None else []
        if not len(removed):
            continue
        layer = describe(nodes[fold.layer], index)
        delta = layer.mean_contribution(constant_values(layer.weight, index), removed, fold.value[removed])
        found[fold.layer] = (layer, found.get(fold.layer, (layer, 0))[1] + delta)
    return found


def folded_values(analysis: Analysis, space: tuple[str, int], size: int) -> np.ndarray:
    """What surgery puts in a layer's bias for each index of its input `space` when that channel is removed: the
    constant it carries there (0 where none is folded). Bias recovery adds only the removed channels' means beyond
    it."""
    fold = next((f for f in analysis.folds if f.space == space), None)
    return np.zeros(size) if fold is None else fold.value.astype(np.float64)


def fold_into_biases(model: onnx.ModelProto, analysis: Analysis, plan: Plan,
                     contributions: dict[str, tuple[Layer, np.ndarray]]) -> None:
    """Add each layer's contribution (its kept outputs) to its bias in the pruned `model`; a matrix layer without
    a bias that can take it (a MatMul without an Add of a constant) gets an Add after it."""
    tensors, missing = StoredTensors(model), []
    for layer, delta in contributions.values():
        kept = analysis.kept_indices((layer.node.output[0], layer.output_axis), plan.keep)
        delta = delta if kept is None else delta[kept]
        if not tensors.add_to_bias(layer, delta):
            missing.append((layer, delta))
    for layer, delta in missing:
        _add_after(model, layer, delta.astype(tensors.weight_dtype(layer)))


def _add_after(model: onnx.ModelProto, layer: Layer, bias: np.ndarray) -> None:
    """Insert `output = Add(layer's output, bias)` right after a matrix layer (outputs on the last axis), the output
    keeping its name. The layer's node is replaced by a renamed copy: the analysis may hold the node itself."""
    if not isinstance(layer, MatrixLayer):
        raise OnnxPruneError(f"internal error: no bias to take a removed channel's constant at '{layer.node.name}'")
    graph, names = model.graph, _names(model)
    nodes = list(graph.node)
    position = next(k for k, n in enumerate(nodes) if n.name == layer.node.name)
    renamed = onnx.NodeProto()
    renamed.CopyFrom(nodes[position])
    output, renamed.output[0] = renamed.output[0], _fresh(names, f"{renamed.output[0]}_before_folded_bias")
    bias_name = _fresh(names, f"{renamed.name}_folded_bias")
    graph.initializer.append(numpy_helper.from_array(bias, bias_name))
    add = helper.make_node("Add", [renamed.output[0], bias_name], [output],
                           name=_fresh(names, f"{renamed.name}_folded_bias_add"))
    nodes[position:position + 1] = [renamed, add]
    del graph.node[:]
    graph.node.extend(nodes)


def _names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    return ({i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
            | {n.name for n in graph.node} | {i.name for i in graph.input})


def _fresh(taken: set[str], base: str) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name
