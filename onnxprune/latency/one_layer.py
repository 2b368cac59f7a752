"""One layer's latency at given widths: the layer alone in a one-node model, timed once and cached by what it
computes (op, attributes, shapes, threads), so that the repeated blocks of a network share entries."""
from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..calibrate import Progress
from ..errors import first_line
from ..layers import ConvLayer, Layer
from ..timing import ModelTimer
from .cache import LatencyCache

log = logging.getLogger("onnxprune")

Shapes = list[list[int]]  # a layer's inputs' shapes, then its output's


class LayerTimer:
    """Milliseconds of single layers, from `cache` or measured with `timer` (and then cached). `measured` counts the
    one-layer models this instance timed; a layer onnxruntime refuses alone costs 0 (it counts as the rest)."""

    def __init__(self, timer: ModelTimer, cache: LatencyCache, original: onnx.ModelProto,
                 progress: Progress | None = None):
        self.timer, self.cache, self.original = timer, cache, original
        self.progress = progress or Progress(enabled=False)
        self.measured = 0

    def ms(self, layer: Layer, constant: list[bool], shapes: Shapes) -> float:
        """`layer` at the widths of `shapes`; `constant[k]`: input k is a weight (built in, not fed)."""
        one = layer.node_at(shapes, [f"x{k}" for k in range(len(shapes) - 1)], "y")
        entry = key(one, shapes, self.timer.threads)
        if entry not in self.cache:
            try:
                self.cache[entry] = self._measure(layer, one, constant, shapes)
            except Exception as err:  # noqa: BLE001 - onnxruntime's errors have no common type; never fatal here
                log.debug("latency of %s not measured: %s", layer.node.name, first_line(err))
                self.cache[entry] = 0.0
            self.measured += 1
            self.progress.show(f"latency table: {self.measured} one-layer models measured")
        return self.cache[entry]

    def _measure(self, layer: Layer, node: onnx.NodeProto, constant: list[bool], shapes: Shapes) -> float:
        """A 2-D convolution is timed between two cheap depthwise 1x1 convolutions standing for its neighbours,
        whose time alone is then subtracted: onnxruntime keeps channel-aligned tensors in its blocked (NCHWc) layout
        from layer to layer, so an aligned layer alone would pay layout conversions that it does not pay in the
        model, and an unaligned one would not pay those it does."""
        if not has_context(layer, shapes):
            return self._timed(layer_model(node, constant, shapes, self.original, context=False), shapes[0])
        total = self._timed(layer_model(node, constant, shapes, self.original, context=True), shapes[0])
        return max(1e-3, total - self._context_ms(shapes[0]) - self._context_ms(shapes[-1]))

    def _context_ms(self, shape: list[int]) -> float:
        entry = key(helper.make_node("Context", [], []), [shape], self.timer.threads)
        if entry not in self.cache:
            self.cache[entry] = self._timed(context_model(shape, self.original), shape)
        return self.cache[entry]

    def _timed(self, model: onnx.ModelProto, input_shape: list[int]) -> float:
        return self.timer.model_ms(model, {"x0": np.full(input_shape, 0.5, np.float32)})


def has_context(layer: Layer, shapes: Shapes) -> bool:
    """Whether the layer is timed between context nodes: a 2-D convolution, whose neighbours share its layout."""
    return isinstance(layer, ConvLayer) and len(shapes[0]) == 4 and len(shapes[-1]) == 4


def key(node: onnx.NodeProto, shapes: Shapes, threads: int) -> str:
    """What a measured model computes: op, attributes, shapes, threads (names left out)."""
    text = node.op_type + node.domain + repr(shapes) + repr(threads) + \
        repr(sorted((a.name, a.SerializeToString()) for a in node.attribute))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def layer_model(node: onnx.NodeProto, constant: list[bool], shapes: Shapes, original: onnx.ModelProto,
                context: bool) -> onnx.ModelProto:
    """The node alone with constant weights (only the first input is fed), or between two context nodes."""
    inputs, weights = [], []
    for k, (shape, is_constant) in enumerate(zip(shapes[:-1], constant)):
        if is_constant:
            weights.append(_constant(f"x{k}", shape))
        else:
            inputs.append(helper.make_tensor_value_info(f"x{k}", onnx.TensorProto.FLOAT, shape))
    nodes = [node]
    if context:
        inner = onnx.NodeProto()
        inner.CopyFrom(node)
        inner.input[0], inner.output[0] = "in", "out"
        nodes = [_context_node("x0", "in", shapes[0][1], "w_in"), inner,
                 _context_node("out", "y", shapes[-1][1], "w_out")]
        weights += [_constant("w_in", [shapes[0][1], 1, 1, 1]), _constant("w_out", [shapes[-1][1], 1, 1, 1])]
    graph = helper.make_graph(nodes, "layer", inputs, [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                                                                       None)], weights)
    return _model(graph, original)


def context_model(shape: list[int], original: onnx.ModelProto) -> onnx.ModelProto:
    """A context node alone, on an input of `shape` (its time is subtracted from a layer timed between two)."""
    graph = helper.make_graph([_context_node("x0", "y", shape[1], "w")], "context",
                              [helper.make_tensor_value_info("x0", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [_constant("w", [shape[1], 1, 1, 1])])
    return _model(graph, original)


def _context_node(source: str, target: str, channels: int, weight: str) -> onnx.NodeProto:
    return helper.make_node("Conv", [source, weight], [target], kernel_shape=[1, 1], group=channels)


def _constant(name: str, shape: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.full(shape, 0.01, np.float32), name)  # the values do not matter here


def _model(graph: onnx.GraphProto, original: onnx.ModelProto) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=list(original.opset_import), ir_version=original.ir_version)
