"""Where each channel group sits in a network, read from the graph and its shapes alone (never from node names), so
that a sensitivity report can say which kind of group the damage comes from (issue 14: dense-prediction models).

Kinds, the first that applies:
- `head`: the group's channels reach a graph output through at most HEAD_LAYERS more layers (a detector's
  probability-map convs, a classifier's last features);
- `upsample`: the group's channels pass through a node that enlarges the spatial size (Resize, Upsample, a strided
  ConvTranspose, DepthToSpace: any node whose output has more positions than each of its inputs);
- `neck`: the group's channels run after an upsampling node, or enter a merge (a node reading two or more
  activations of rank >= 3: Add, Concat, Sum) that also reads an upsampled activation, within MERGE_REACH
  single-input nodes of the upsampling: an FPN's top-down path and its output convs, a U-Net's skip concats; and a
  group enclosed by such channels (its layers read and write only upsample, neck or head activations: a
  squeeze-and-excitation branch inside the neck);
- `backbone`: every other group.
`stride` is the input's height over the height of the group's activation (a backbone stage), where sizes are known.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .graph import GraphIndex
from .groups import Analysis, Group
from .layers import is_layer, weight_readers
from .roles import Role

GROUP_TYPES = ("head", "upsample", "neck", "backbone")
HEAD_LAYERS = 2  # layers between a head group's consumers and the output: a DB head's conv + 2 ConvTranspose
MERGE_REACH = 3  # single-input nodes (norm, activation) walked up from a merge's input to its upsampling


@dataclass(frozen=True)
class Placement:
    """Where one group sits: its kind, its stride and the fewest layers between it and an output."""

    kind: str
    stride: float | None
    layers_to_output: int | None

    def to_dict(self) -> dict:
        return {"type": self.kind, "stride": self.stride, "layers_to_output": self.layers_to_output}


def place_groups(analysis: Analysis, shapes: dict) -> dict[int, Placement]:
    """The placement of every prunable group; `shapes` are the tensors' shapes at one sample (sizes known)."""
    index = analysis.index
    graph = _GraphFacts.of(index, shapes)
    placed = {g.id: graph.place(_activations(g, index)) for g in analysis.prunable}
    region = {t for g in analysis.prunable if placed[g.id].kind != "backbone" for t in _activations(g, index)}
    for group in analysis.prunable:
        ends = _layer_ends(group, index)
        if placed[group.id].kind == "backbone" and ends and ends <= region:
            placed[group.id] = Placement("neck", placed[group.id].stride, placed[group.id].layers_to_output)
    return placed


def _activations(group: Group, index: GraphIndex) -> set[str]:
    """The run-time tensors the group's channels run through (not weights, not node-local pseudo spaces)."""
    return {m.space[0] for m in group.members if not m.constant and "#" not in m.space[0]
            and m.space[0] not in index.initializers}


def _layer_ends(group: Group, index: GraphIndex) -> set[str]:
    """The activations the group's producing layers read and its consuming layers write."""
    ends = set()
    for member in group.members:
        if member.constant and member.role in (Role.W_OUT, Role.W_IN):
            for layer in (n for n in weight_readers(member.space[0], index) if is_layer(n, index)):
                ends.add(layer.input[0] if member.role == Role.W_OUT else layer.output[0])
    return ends


@dataclass
class _GraphFacts:
    """What placing a group reads: layers to an output per tensor, the upsampling nodes' inputs and outputs, and
    the tensors that enter a merge with an upsampled path."""

    depth: dict[str, int]
    upsampled: set[str]
    merged: set[str]
    stride_of: dict[str, float]

    @classmethod
    def of(cls, index: GraphIndex, shapes: dict) -> "_GraphFacts":
        nodes = list(index.model.graph.node)
        upsamplers = [n for n in nodes if _enlarges(n, index, shapes)]
        upsampled = {name for n in upsamplers for name in (*_activation_inputs(n, index, shapes), *n.output)}
        outputs = {n.output[0] for n in upsamplers}
        merged = _merged_with_upsampling(nodes, index, shapes, outputs) | _downstream(nodes, outputs)
        return cls(layers_to_output(index), upsampled, merged, _strides(index, shapes))

    def place(self, tensors: set[str]) -> Placement:
        depths = [self.depth[t] for t in tensors if t in self.depth]
        depth = min(depths) if depths else None
        strides = sorted(self.stride_of[t] for t in tensors if t in self.stride_of)
        stride = strides[0] if strides else None
        if depth is not None and depth <= HEAD_LAYERS:
            return Placement("head", stride, depth)
        kind = "upsample" if tensors & self.upsampled else "neck" if tensors & self.merged else "backbone"
        return Placement(kind, stride, depth)


def layers_to_output(index: GraphIndex) -> dict[str, int]:
    """Per tensor of the main graph, the fewest layers (Conv, Gemm, MatMul...) the data still passes through on its
    way to a graph output; tensors that reach no output are left out."""
    depth = {name: 0 for name in index.graph_outputs}
    for node in reversed(index.model.graph.node):
        below = [depth[o] for o in node.output if o in depth]
        if not below:
            continue
        here = min(below) + int(is_layer(node, index))
        for name in node.input:
            if name and here < depth.get(name, here + 1):
                depth[name] = here
    return depth


def _positions(name: str, shapes: dict) -> int | None:
    """The number of spatial positions of an activation of rank >= 3 (axes after batch and channels)."""
    dims = shapes.get(name)
    if dims is None or len(dims) < 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims[2:]):
        return None
    return int(np.prod(dims[2:]))


def _activation_inputs(node: onnx.NodeProto, index: GraphIndex, shapes: dict) -> list[str]:
    """The node's run-time inputs of rank >= 3 with known sizes."""
    return [name for name in node.input if name and name not in index.initializers
            and name not in index.known_values and _positions(name, shapes) is not None]


def _enlarges(node: onnx.NodeProto, index: GraphIndex, shapes: dict) -> bool:
    inputs = _activation_inputs(node, index, shapes)
    out = _positions(node.output[0], shapes) if node.output else None
    return bool(inputs) and out is not None and out > max(_positions(name, shapes) for name in inputs)


def _merged_with_upsampling(nodes: list[onnx.NodeProto], index: GraphIndex, shapes: dict,
                            upsampled_outputs: set[str]) -> set[str]:
    """Inputs of merges (two or more activations) of which one comes from an upsampling node nearby."""
    merged: set[str] = set()
    for node in nodes:
        inputs = _activation_inputs(node, index, shapes)
        if len(inputs) >= 2 and any(_comes_from(name, upsampled_outputs, index, shapes) for name in inputs):
            merged.update(inputs)
    return merged


def _downstream(nodes: list[onnx.NodeProto], sources: set[str]) -> set[str]:
    """Every tensor computed from `sources` (nodes in topological order)."""
    reached = set(sources)
    for node in nodes:
        if any(name in reached for name in node.input):
            reached.update(name for name in node.output if name)
    return reached


def _comes_from(name: str, sources: set[str], index: GraphIndex, shapes: dict) -> bool:
    """Whether `name` is one of `sources` or follows one through at most MERGE_REACH single-activation nodes."""
    for _ in range(MERGE_REACH + 1):
        if name in sources:
            return True
        producer = index.producer.get(name)
        inputs = _activation_inputs(producer, index, shapes) if producer is not None else []
        if len(inputs) != 1:
            return False
        name = inputs[0]
    return False


def _strides(index: GraphIndex, shapes: dict) -> dict[str, float]:
    """Per activation, the first graph input's height over its height."""
    heights = [shapes[name][2] for name in sorted(index.graph_inputs) if _positions(name, shapes) is not None]
    if not heights:
        return {}
    return {name: heights[0] / dims[2] for name, dims in shapes.items()
            if name not in index.initializers and _positions(name, shapes) is not None}


def protect_groups(analysis: Analysis, shapes: dict, kinds: tuple[str, ...]) -> int:
    """Freeze every prunable group placed in one of `kinds` (--protect), with the reason; the allocation then
    meets a MAC target on the other groups. For a head whose consumers least squares cannot re-fit (an overlapping
    ConvTranspose, a grouped conv): a DB detector's head costs more output per MAC saved than any other type
    (BENCHMARKS.md, Detectors). Returns the number of groups frozen."""
    placements = place_groups(analysis, shapes)
    frozen = 0
    for group in analysis.prunable:
        kind = placements[group.id].kind
        if kind in kinds:
            group.frozen.append(f"protected: a {kind} group (--protect {kind})")
            frozen += 1
    return frozen
