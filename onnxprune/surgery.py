"""Apply a Plan: slice every constant along its pruned axes, run the rules' fixups, re-infer shapes."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .allocate import Plan
from .errors import OnnxPruneError, first_line
from .graph import inferred_value_infos
from .groups import Analysis, resolve
from .rules.registry import NodeView, Ref


def apply_plan(model: onnx.ModelProto, analysis: Analysis, plan: Plan) -> onnx.ModelProto:
    """Prune `model` in place (the model the analysis was made on, or a copy of it) and return it."""
    graph = model.graph
    for position, init in enumerate(graph.initializer):
        sliced = _sliced(analysis, plan, init)
        if sliced is not None:
            graph.initializer[position].CopyFrom(numpy_helper.from_array(sliced, init.name))
    replaced: set[str] = set()
    nodes = {node.name: node for node in graph.node}
    for view, fixup in analysis.fixups:
        # The analysed model may be another copy (sensitivity, latency probes): fix this model's node.
        target = NodeView(nodes[view.name], analysis.index, view.opset, view.tile)
        fixup(target, _FixContext(target, analysis, plan, model, replaced))
    _remove_orphans(model, replaced)
    _refresh_value_info(model)
    return model


def _remove_orphans(model: onnx.ModelProto, names: set[str]) -> None:
    """Drop the nodes that only computed an input a fixup replaced by a constant (folded shape arithmetic)."""
    graph = model.graph
    while names:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        orphans = [n for n in graph.node if any(o in names for o in n.output) and not any(o in used for o in n.output)]
        if not orphans:
            return
        names = {i for n in orphans for i in n.input if i}
        for node in orphans:
            graph.node.remove(node)


def _sliced(analysis: Analysis, plan: Plan, init: onnx.TensorProto) -> np.ndarray | None:
    array = None
    for axis in range(len(init.dims)):
        kept = analysis.kept_indices((init.name, axis), plan.keep)
        if kept is not None:
            array = analysis.index.array(init.name) if array is None else array
            array = np.take(array, kept, axis=axis)
    return array


def _refresh_value_info(model: onnx.ModelProto) -> None:
    """Drop every stale intermediate shape and store the re-inferred ones; strict, so an inconsistency is caught."""
    graph = model.graph
    del graph.value_info[:]
    declared = {vi.name for vi in list(graph.input) + list(graph.output)} | {i.name for i in graph.initializer}
    try:
        infos = inferred_value_infos(model, strict=True)
    except Exception as exc:
        raise OnnxPruneError(f"internal error: pruned graph fails shape inference: {first_line(exc)}") from None
    graph.value_info.extend(vi for name, vi in infos.items() if name not in declared)


class _FixContext:
    """What a rule's fixup may do to its node (see rules.registry.FixContext)."""

    def __init__(self, view: NodeView, analysis: Analysis, plan: Plan, model: onnx.ModelProto, replaced: set[str]):
        self.view, self.analysis, self.plan, self.model = view, analysis, plan, model
        self.replaced = replaced  # inputs swapped for new constants; their producers may now be dead

    def new_size(self, ref: Ref) -> int:
        space, size = resolve(self.view, ref)
        kept = self.analysis.kept_indices(space, self.plan.keep)
        if kept is not None:
            return int(kept.size)
        size = self.analysis.sizes.get(space, size)
        if size is None:
            raise OnnxPruneError(f"internal error: size of {space} unknown in fixup of '{self.view.name}'")
        return size

    def set_attr(self, name: str, value: object) -> None:
        self.remove_attr(name)
        self.view.node.attribute.append(helper.make_attribute(name, value))

    def remove_attr(self, name: str) -> None:
        node = self.view.node
        for position, attr in enumerate(node.attribute):
            if attr.name == name:
                del node.attribute[position]
                return

    def set_const_input(self, index: int, value: np.ndarray, node: onnx.NodeProto | None = None) -> None:
        """Set a constant input of this node (or of `node`, e.g. the Concat that builds a Reshape target); a
        constant shared with other nodes is copied under a new name, not changed."""
        node, graph = node or self.view.node, self.model.graph
        current = self.analysis.index.array(node.input[index]) if index < len(node.input) else None
        if current is not None and current.dtype == value.dtype and np.array_equal(current, value):
            return
        if current is not None and self._owned(node.input[index]):
            _replace_initializer(graph, node.input[index], value)
            return
        # Otherwise (shared, absent, or computed from static shapes): a new constant for this input only.
        name = _unique_name(graph, f"{node.name}_input{index}")
        graph.initializer.append(numpy_helper.from_array(value, name))
        while len(node.input) <= index:
            node.input.append("")
        if node.input[index]:
            self.replaced.add(node.input[index])
        node.input[index] = name

    def _owned(self, name: str) -> bool:
        """Only this node's input reads the constant, so it can change in place."""
        index = self.analysis.index
        users = index.consumers.get(name, [])
        return (name in index.initializers and len(users) == 1 and list(users[0].input).count(name) == 1
                and name not in index.graph_outputs)


def _replace_initializer(graph: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    for init in graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(value, name))
            return


def _unique_name(graph: onnx.GraphProto, base: str) -> str:
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name
