"""Sparsity of a model's layer weights, read and verified independently of the code that made it.

For every Conv, ConvTranspose, Gemm and MatMul with a constant weight (`layers.describe`): the fraction of zeros,
whether an N:M pattern holds along the input-channel axis (for every output channel and kernel position, every M
consecutive input channels hold at most N non-zeros: the layout NVIDIA's sparse tensor cores and TensorRT read), and
the MACs a 2:4 engine could skip (half of a layer's MACs where 2:4 holds: it computes 2 of every 4 products).

A weight stored packed (`sparsity.packed`) is not an initializer but the output of a small constant subgraph; it is
read back by evaluating that subgraph in onnxruntime (`fold_constant_weights`), so a packed model is verified on the
very values onnxruntime computes with.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OnnxPruneError, UsageError, first_line
from ..graph import GraphIndex, subgraphs_of
from ..layers import Layer, describe
from ..verify import layer_macs, session
from .spec import SPEED_NOTE, Pattern, parse_pattern

log = logging.getLogger("onnxprune")

_NONDETERMINISTIC = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout")


def nm_pattern(text: str) -> Pattern:
    """An N:M pattern from its text ('2:4'); a usage error for anything else."""
    try:
        pattern = parse_pattern(text)
    except UsageError:
        pattern = None
    if pattern is None or pattern.unstructured:
        raise UsageError(f"--pattern must be N:M with 0 < N < M (2:4, 4:8, 1:4), got '{text}'")
    return pattern


ENGINE = Pattern(2, 4)  # what NVIDIA's sparse tensor cores execute


def input_axis(layer: Layer, weight: np.ndarray) -> int:
    """The weight's input-channel axis, counted from the front."""
    return layer.in_axis % weight.ndim


def blocks(weight: np.ndarray, axis: int, m: int) -> np.ndarray:
    """The weight with its `axis` split into (channels / m, m): a view whose axis `axis + 1` runs over one block of
    m consecutive channels. The caller checks that m divides the channels."""
    shape = weight.shape
    return weight.reshape(shape[:axis] + (shape[axis] // m, m) + shape[axis + 1:])


def block_nonzeros(weight: np.ndarray, axis: int, m: int) -> np.ndarray:
    """Non-zeros in every block of m consecutive channels along `axis` (-0.0 counts as zero, NaN does not)."""
    return np.count_nonzero(blocks(weight, axis, m), axis=axis + 1)


def pattern_holds(weight: np.ndarray, axis: int, pattern: Pattern) -> bool | None:
    """Whether every block of `pattern.m` channels along `axis` holds at most `pattern.n` non-zeros; None where m
    does not divide the channels (such a layer is left dense by N:M sparsification)."""
    if weight.ndim < 2 or weight.shape[axis] % pattern.m:
        return None
    return bool((block_nonzeros(weight, axis, pattern.m) <= pattern.n).all())


# ------------------------------------------------------------------------------------------------ reading weights

def fold_constant_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every weight (input 1 of a node) that ai.onnx nodes compute from initializers alone (a packed
    weight's rebuild subgraph, a DequantizeLinear) evaluated once in onnxruntime and stored as an initializer under
    its own name; the nodes only those weights needed are dropped. A model without such weights comes back as it
    is, not copied."""
    constant = _constant_nodes(model.graph)
    weights = list(dict.fromkeys(n.input[1] for n in model.graph.node if len(n.input) > 1
                                 and len(constant.get(n.input[1], _NO_NODE).output) == 1))
    values = _values(model, weights, constant) if weights else {}
    if not values:
        return model
    folded = copy.deepcopy(model)
    nodes = [n for n in folded.graph.node if not (len(n.output) == 1 and n.output[0] in values)]
    computed = set(_constant_nodes(folded.graph))
    del folded.graph.node[:]
    folded.graph.node.extend(_without_unread(nodes, computed, {o.name for o in folded.graph.output}))
    folded.graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in values.items())
    _drop_unused_initializers(folded.graph)
    return folded


_NO_NODE = onnx.NodeProto()


def _without_unread(nodes: list[onnx.NodeProto], constant: set[str], outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` less the constant ones whose outputs nothing reads any more (what fed only a folded weight)."""
    while True:
        read = outputs | {i for n in nodes for i in n.input} | {i for n in nodes for s in subgraphs_of(n)
                                                                 for i in _names_read(s)}
        alive = [n for n in nodes if not set(n.output) <= constant or set(n.output) & read]
        if len(alive) == len(nodes):
            return alive
        nodes = alive


def _constant_nodes(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Output name -> node, for ai.onnx nodes that compute from initializers (and other such nodes) only,
    deterministically and without subgraphs."""
    known = {i.name for i in graph.initializer} - {i.name for i in graph.input}
    found: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        inputs = [i for i in node.input if i]
        foreign = node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC or subgraphs_of(node)
        if foreign or not all(i in known for i in inputs):
            continue
        for name in node.output:
            if name:
                found[name] = node
                known.add(name)
    return found


def _cone(targets: list[str], constant: dict[str, onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The constant nodes `targets` depend on, in graph order."""
    needed: dict[int, onnx.NodeProto] = {}
    stack = list(targets)
    while stack:
        node = constant.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed[id(node)] = node
            stack.extend(i for i in node.input if i)
    order = {id(n): k for k, n in enumerate(constant.values())}
    return sorted(needed.values(), key=lambda n: order[id(n)])


def _values(model: onnx.ModelProto, weights: list[str], constant: dict[str, onnx.NodeProto]) -> dict[str, np.ndarray]:
    """The weights' values from one onnxruntime run; where that fails (an op onnxruntime lacks), one weight at a
    time, without those that fail: they stay computed, so no layer reads them as a constant."""
    try:
        return _evaluate(model, _cone(weights, constant), weights)
    except OnnxPruneError:
        found = {}
        for weight in weights:
            try:
                found.update(_evaluate(model, _cone([weight], constant), [weight]))
            except OnnxPruneError as exc:
                log.info("'%s' stays computed: %s", weight, exc)
        return found


def _evaluate(model: onnx.ModelProto, cone: list[onnx.NodeProto], outputs: list[str]) -> dict[str, np.ndarray]:
    """The values of `outputs`, computed by the `cone` nodes in onnxruntime."""
    graph = model.graph
    reads = {i for n in cone for i in n.input}
    inits = [i for i in graph.initializer if i.name in reads]
    small = onnx.helper.make_graph(cone, "weights", [], [onnx.ValueInfoProto(name=o) for o in outputs], inits)
    small = onnx.helper.make_model(small, opset_imports=list(model.opset_import))
    small.ir_version = model.ir_version
    try:
        typed = onnx.shape_inference.infer_shapes(small)
        small.graph.ClearField("output")
        small.graph.output.extend(_typed_outputs(typed, outputs))
        return dict(zip(outputs, session(small).run(outputs, {})))
    except Exception as exc:
        raise OnnxPruneError(f"onnxruntime cannot compute {', '.join(outputs)}: {first_line(exc)}") from None


def _typed_outputs(typed: onnx.ModelProto, outputs: list[str]) -> list[onnx.ValueInfoProto]:
    infos = {vi.name: vi for vi in list(typed.graph.value_info) + list(typed.graph.output)}
    return [infos[o] if infos.get(o) and infos[o].type.tensor_type.elem_type else onnx.ValueInfoProto(name=o)
            for o in outputs]


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    read = _names_read(graph) | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    names = {i for n in graph.node for i in n.input}
    for node in graph.node:
        for sub in subgraphs_of(node):
            names |= _names_read(sub)
    return names


# ------------------------------------------------------------------------------------------------ the report

@dataclass
class LayerSparsity:
    """One layer's weight: `zero_count` of its values are zero (-0.0 too), `zeros` as a fraction; `holds` whether
    the checked N:M pattern holds (None where M does not divide its input channels), `violations` the blocks with
    more than N non-zeros; `skippable_macs` what a 2:4 engine would not compute."""

    node: str
    op: str
    weight: str
    shape: list[int]
    zero_count: int
    zeros: float
    holds: bool | None
    violations: int
    macs: int | None
    skippable_macs: int


@dataclass
class SparsityReport:
    pattern: str
    layers: list[LayerSparsity] = field(default_factory=list)

    @property
    def failures(self) -> list[LayerSparsity]:
        return [layer for layer in self.layers if layer.holds is False]

    @property
    def passed(self) -> bool:
        return not self.failures

    def failure_lines(self) -> list[str]:
        """One line naming the layers where the pattern does not hold; none where it holds everywhere."""
        bad = self.failures
        if not bad:
            return []
        names = ", ".join(layer.node for layer in bad[:4]) + (", ..." if len(bad) > 4 else "")
        return [f"pattern {self.pattern} does not hold on {len(bad)} of {len(self.layers)} layers ({names})"]

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "layers": [asdict(layer) for layer in self.layers], "totals": self.totals(),
                "failures": [layer.node for layer in self.failures], "passed": self.passed}

    def totals(self) -> dict:
        weights = sum(int(np.prod(layer.shape)) for layer in self.layers)
        return {"weights": weights, "zeros": sum(layer.zero_count for layer in self.layers), "layers": len(self.layers),
                "holds": sum(layer.holds is True for layer in self.layers),
                "not_applicable": sum(layer.holds is None for layer in self.layers),
                "macs": sum(layer.macs or 0 for layer in self.layers),
                "skippable_macs": sum(layer.skippable_macs for layer in self.layers)}

    def summary_lines(self) -> list[str]:
        lines = [_layer_line(layer, self.pattern) for layer in self.layers]
        t = self.totals()
        share = t['zeros'] / max(t['weights'], 1)
        lines.append(f"{t['zeros']:,} of {t['weights']:,} layer weights are zero ({share:.1%});"
                     f" {self.pattern} holds on {t['holds']} of {t['layers']} layers"
                     f" ({t['not_applicable']} not applicable: input channels not a multiple of M)")
        lines.append(f"a {ENGINE} engine (TensorRT on sparse tensor cores) could skip {t['skippable_macs']:,} of "
                     f"{t['macs']:,} MACs ({t['skippable_macs'] / max(t['macs'], 1):.1%}); {SPEED_NOTE}")
        return lines


def _layer_line(layer: LayerSparsity, pattern: str) -> str:
    shape = "x".join(map(str, layer.shape))
    state = ("n/a (input channels not a multiple of M)" if layer.holds is None else "holds" if layer.holds
             else f"FAILS ({layer.violations:,} blocks over the limit)")
    return f"{layer.node} ({layer.op} {shape}): {layer.zeros:.1%} zeros, {pattern} {state}"


def sparsity_report(model: onnx.ModelProto, pattern: Pattern) -> SparsityReport:
    """Every layer weight of `model` (packed ones evaluated back to dense) checked against `pattern`."""
    folded = fold_constant_weights(model)
    index = GraphIndex.build(folded)
    macs = layer_macs(folded, index.shapes)
    report = SparsityReport(str(pattern))
    for node in folded.graph.node:
        layer = describe(node, index)
        weight = index.array(layer.weight) if layer is not None else None
        if weight is not None:  # None: computed by nodes that could not be evaluated (a custom domain's)
            report.layers.append(_layer_sparsity(layer, weight, pattern, macs.get(node.name)))
    return report


def _layer_sparsity(layer: Layer, weight: np.ndarray, pattern: Pattern, macs: int | None) -> LayerSparsity:
    axis = input_axis(layer, weight) if weight.ndim >= 2 else 0
    holds = pattern_holds(weight, axis, pattern)
    violations = int((block_nonzeros(weight, axis, pattern.m) > pattern.n).sum()) if holds is False else 0
    engine = pattern_holds(weight, axis, ENGINE)
    zeros = weight.size - np.count_nonzero(weight)
    return LayerSparsity(layer.node.name, layer.node.op_type, layer.weight, list(weight.shape), int(zeros),
                         zeros / max(weight.size, 1), holds, violations, macs, (macs or 0) // 2 if engine else 0)
