"""Apply a Plan: slice every constant along its pruned axes, run the rules' fixups, re-infer shapes."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import files, lazy_tensors
from .allocate import Plan
from .bias_folding import carried_contributions, fold_into_biases
from .errors import OnnxPruneError, first_line
from .graph import all_nodes, inferred_value_infos, nested_graphs
from .groups import Analysis, resolve
from .rules.registry import NodeView, Ref


def apply_plan(model: onnx.ModelProto, analysis: Analysis, plan: Plan) -> onnx.ModelProto:
    """Prune `model` in place (the model the analysis was made on, or a copy of it) and return it. Initializers and
    nodes inside If branches and Loop and Scan bodies are pruned as the main graph's are. A lazily opened model's
    weights stay on disk: see _spill_external."""
    carried = carried_contributions(analysis, plan)  # read before the weights are sliced
    lazy = lazy_tensors.weights_folder(model) is not None
    moved = _spill_external(model, analysis, plan) if lazy else []
    for graph in [model.graph, *nested_graphs(model.graph)]:
        for position, init in enumerate(graph.initializer):
            sliced = None if lazy and lazy_tensors.is_external(init) else _sliced(analysis, plan, init)
            if sliced is not None:
                graph.initializer[position].CopyFrom(numpy_helper.from_array(sliced, init.name))
    replaced: set[str] = set()
    nodes = {node.name: node for node in all_nodes(model.graph)}
    for view, fixup in analysis.fixups:
        # The analysed model may be another copy (sensitivity, latency probes): fix this model's node.
        target = NodeView(nodes[view.name], analysis.index, view.opset, view.tile)
        fixup(target, _FixContext(target, analysis, plan, model, replaced))
    _remove_orphans(model, replaced)
    fold_into_biases(model, analysis, plan, carried)
    if moved:
        _point_at(model, moved)
    _resize_subgraph_boundaries(model, analysis, plan)
    _refresh_value_info(model)
    return model


_Moved = list[tuple[onnx.TensorProto, dict[str, str], tuple[int, ...] | None]]  # tensor, new entries, new dims


def _spill_external(model: onnx.ModelProto, analysis: Analysis, plan: Plan) -> _Moved:
    """Every external tensor of a lazily opened model, sliced (read memory-mapped, one at a time) or as it is, goes
    into one new data file in the run's scratch folder, never the input's. The protos are pointed at it only after
    the fixups (_point_at), which read the analysed values where they were."""
    moved, folder = [], lazy_tensors.weights_folder(model)
    with lazy_tensors.DataFile.in_folder(files.run_scratch_folder(), "pruned") as out:
        for graph in [model.graph, *nested_graphs(model.graph)]:
            for init in filter(lazy_tensors.is_external, graph.initializer):
                sliced = _sliced(analysis, plan, init)
                entries = out.add_copy(init, folder) if sliced is None else out.add_array(init, sliced)
                moved.append((init, entries, None if sliced is None else sliced.shape))
                del sliced  # its memory map and copy go before the next tensor is read
    return moved


def _point_at(model: onnx.ModelProto, moved: _Moved) -> None:
    """The moved tensors now read from the new data file, in the scratch folder."""
    for tensor, entries, dims in moved:
        lazy_tensors.point_at(tensor, entries, dims)
    lazy_tensors.set_weights_folder(model, files.run_scratch_folder())


def _remove_orphans(model: onnx.ModelProto, names: set[str]) -> None:
    """Drop the nodes that only computed an input a fixup replaced by a constant (folded shape arithmetic)."""
    graphs = [model.graph, *nested_graphs(model.graph)]
    while names:
        used = {i for n in all_nodes(model.graph) for i in n.input} | {o.name for g in graphs for o in g.output}
        found = [(g, n) for g in graphs for n in g.node
                 if any(o in names for o in n.output) and not any(o in used for o in n.output)]
        if not found:
            return
        names = {i for _, n in found for i in n.input if i}
        for graph, node in found:
            graph.node.remove(node)


def _resize_subgraph_boundaries(model: onnx.ModelProto, analysis: Analysis, plan: Plan) -> None:
    """A subgraph's inputs and outputs declare their shapes: set the sizes of the pruned axes. Its intermediate
    shapes are dropped (they are optional, and stale)."""
    for graph in nested_graphs(model.graph):
        del graph.value_info[:]
        for vi in list(graph.input) + list(graph.output):
            for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
                kept = analysis.kept_indices((vi.name, axis), plan.keep)
                if kept is not None:
                    dim.Clear()
                    dim.dim_value = int(kept.size)


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
    computed = {o for n in graph.node for o in n.output}  # inference also reports the subgraphs' values
    graph.value_info.extend(vi for name, vi in infos.items() if name not in declared and name in computed)


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
            _replace_initializer(self.model, node.input[index], value)
            return
        # Otherwise (shared, absent, or computed from static shapes): a new constant for this input only, in the
        # main graph, which every subgraph sees.
        name = _unique_name(self.model, f"{node.name}_input{index}")
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


def _replace_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for graph in [model.graph, *nested_graphs(model.graph)]:
        for init in graph.initializer:
            if init.name == name:
                init.CopyFrom(numpy_helper.from_array(value, name))
                return


def _unique_name(model: onnx.ModelProto, base: str) -> str:
    graphs = [model.graph, *nested_graphs(model.graph)]
    taken = {i.name for g in graphs for i in g.initializer} | {o for n in all_nodes(model.graph) for o in n.output}
    taken |= {i.name for g in graphs for i in g.input}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name
