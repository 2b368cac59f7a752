"""Training-free recovery after pruning.

`bias`: a removed channel still carried a mean value into each consumer layer; add that mean contribution to the
consumer's bias, so the layer's output keeps its mean (exact when the removed channels were constant).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from .allocate import Plan
from .criteria import probes
from .groups import Analysis, Group, Member

log = logging.getLogger("onnxprune")

RECOVERY = ("none", "bias")


def recover_bias(pruned: onnx.ModelProto, analysis: Analysis, plan: Plan, stats) -> int:
    """Fold the removed channels' mean contributions into the consumers' biases; returns the layers changed."""
    deltas: dict[str, np.ndarray] = {}
    for gid, keep in plan.keep.items():
        group = analysis.groups[gid]
        removed = np.setdiff1d(np.arange(group.size), keep)
        for node, data in _consumers(group, analysis):
            delta = _mean_contribution(node, data, group, removed, analysis, stats)
            if delta is not None:
                deltas[node.name] = deltas.get(node.name, 0) + delta
    nodes = {n.name: n for n in pruned.graph.node}
    changed = 0
    for name, delta in deltas.items():
        output = nodes[name].output[0]
        kept = analysis.kept_indices((output, len(analysis.index.shapes[output]) - 1 if nodes[name].op_type == "MatMul"
                                      else 1), plan.keep)
        changed += _add_bias(pruned, nodes[name], delta if kept is None else delta[kept])
    return changed


def _consumers(group: Group, analysis: Analysis) -> list[tuple[onnx.NodeProto, Member]]:
    """(consumer node, the group member that is its data input) for every layer whose weights read the group."""
    index = analysis.index
    data = {m.space[0]: m for m in probes(group, index)}
    found = []
    for m in group.members:
        if m.constant and m.role == "w_in":
            for node in index.consumers.get(m.space[0], []):
                member = next((data[i] for i in node.input if i in data), None)
                if member is not None and (node, member) not in found:
                    found.append((node, member))
    return found


def _mean_contribution(node: onnx.NodeProto, data: Member, group: Group, removed: np.ndarray,
                       analysis: Analysis, stats) -> np.ndarray | None:
    index = analysis.index
    idx = data.offset + (removed[:, None] * data.inner + np.arange(data.inner)).ravel()
    mean = stats.channels[data.space].mean[idx]
    weight = index.array(node.input[1])
    if node.op_type == "Conv" and _attr(node, "group", 1) == 1:
        return weight[:, idx].reshape(weight.shape[0], len(idx), -1).sum(2) @ mean
    if node.op_type == "Gemm" and not _attr(node, "transA", 0):
        return weight[:, idx] @ mean if _attr(node, "transB", 0) else mean @ weight[idx, :]
    if node.op_type == "MatMul" and weight is not None and weight.ndim == 2 and data.space[0] == node.input[0]:
        return mean @ weight[idx, :]
    return None


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _add_bias(model: onnx.ModelProto, node: onnx.NodeProto, delta: np.ndarray) -> int:
    """Add `delta` to the bias the node's outputs get: Conv and Gemm inputs, or the Add that follows a MatMul."""
    if node.op_type == "Conv":
        return _add_to_input(model, node, 2, delta)
    if node.op_type == "Gemm":
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
        return _add_to_input(model, node, 2, delta / beta) if beta else 0
    follower = [n for n in model.graph.node if node.output[0] in n.input]
    if len(follower) == 1 and follower[0].op_type == "Add":
        other = 1 - list(follower[0].input).index(node.output[0])
        return _add_to_input(model, follower[0], other, delta, create=False)
    log.warning("bias recovery skipped for %s '%s': no bias to adjust", node.op_type, node.name)
    return 0


def _add_to_input(model: onnx.ModelProto, node: onnx.NodeProto, index: int, delta: np.ndarray,
                  create: bool = True) -> int:
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    name = node.input[index] if index < len(node.input) else ""
    if name and name not in inits:
        return 0  # a bias computed at run time
    if name:
        bias = numpy_helper.to_array(inits[name])
        if bias.shape[-1:] != delta.shape:
            return 0
        users = sum(list(n.input).count(name) for n in graph.node)
        new_name = name if users == 1 else f"{name}_recovered_{node.name}"
        updated = numpy_helper.from_array((bias + delta).astype(bias.dtype), new_name)
        if users == 1:
            inits[name].CopyFrom(updated)
        else:
            graph.initializer.append(updated)
            node.input[index] = updated.name
        return 1
    if not create:
        return 0
    bias = numpy_helper.from_array(delta.astype(np.float32), f"{node.name}_recovered_bias")
    graph.initializer.append(bias)
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = bias.name
    return 1
