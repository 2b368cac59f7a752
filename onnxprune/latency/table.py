"""Latency as a cost: a table of onnxruntime latencies, per layer and per width, measured on this machine.

Every Conv, ConvTranspose, Gemm and MatMul with a constant weight is a layer. Its latency at given input and output
widths is measured alone (a one-node model, on demand, cached by what the node computes, so the repeated blocks of a
network share entries). The model's latency is the sum over its layers plus the rest (norms,
activations, pools, copies), taken from one measurement of the whole model and scaled with the layers' output sizes.

The table sees what MACs miss: onnxruntime's NCHWc kernels work on blocks of 8 or 16 channels, so a depthwise conv
with 143 channels can take 4x as long as one with 144. `prefer` uses this: a group whose count can grow to an aligned
width at no more latency keeps the extra channels. A few whole-model measurements at the end correct the level.
A layer whose one-node model onnxruntime refuses counts as part of the rest.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .allocate import Plan, step_for
from .calibrate import Progress
from .check import measure_latency
from .errors import UsageError, first_line
from .groups import Analysis, Space
from .surgery import apply_plan
from .verify import random_feeds, session

log = logging.getLogger("onnxprune")

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ALIGNMENTS = (8, 16)  # widths above a count worth trying: SIMD lanes and onnxruntime's channel blocks
TIE = 0.02  # latencies within 2% count as equal (measurement noise): the wider choice wins
CORRECTIONS = 4  # searches, each followed by a whole-model measurement that corrects the table's level
WHOLE_RUNS = 11  # interleaved runs of the original and the pruned model per whole-model measurement


def median_ms(sess, feed: dict[str, np.ndarray], runs: int = 5, min_total_ms: float = 3.0) -> float:
    """Median milliseconds of `sess.run` after a warm-up; runs more than `runs` times when a run is short."""
    sess.run(None, feed)
    times: list[float] = []
    while len(times) < runs or (sum(times) < min_total_ms and len(times) < 200):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@dataclass
class _Layer:
    node: onnx.NodeProto
    tensors: list[str]  # inputs then the output
    constant: list[bool]
    shapes: list[list[int]]
    groups: set[int]


class LatencyTable:
    """Cost model for `allocate.counts_for_target`: predicted milliseconds when group g keeps counts[g] channels.

    `store` is a dict of measurements kept between runs (key: what the one-node model computes, value: ms); it is
    filled as layers are measured. `feed` (default: random, run-time sizes 1) is what the whole model runs on, and
    `shapes` (default: the analysis's) the sizes its layers are timed at."""

    steps = 8  # bisection steps; each measures only the (layer, width) pairs not in the table yet

    def __init__(self, model: onnx.ModelProto, analysis: Analysis, round_to: int = 1, threads: int = 1,
                 store: dict[str, float] | None = None, progress: bool = False,
                 feed: dict[str, np.ndarray] | None = None, shapes: dict | None = None):
        self.model, self.analysis, self.round_to, self.threads = model, analysis, round_to, threads
        self.table: dict[str, float] = store if store is not None else {}
        self.measured = 0  # one-layer models measured by this instance (the rest came from `store`)
        self.progress, self.outcome = Progress(enabled=progress), None
        self.feed = feed or random_feeds(model)
        self.shapes = shapes or analysis.index.shapes
        self.layers = [layer for node in model.graph.node if (layer := self._layer(node))]
        self.by_group: dict[int, list[_Layer]] = defaultdict(list)
        for layer in self.layers:
            for gid in layer.groups:
                self.by_group[gid].append(layer)
        self.whole_ms = median_ms(session(model, threads=threads), self.feed)
        self.layers_ms = self._layers_ms({})
        self.rest_ms = max(0.0, self.whole_ms - self.layers_ms)
        self.output_size = self._output_size({})

    # -- the cost model ------------------------------------------------------------------------------------------

    def cost(self, counts: dict[int, int]) -> float:
        """Predicted milliseconds of the model when group g keeps counts[g] channels."""
        rest = self.rest_ms * self._output_size(counts) / self.output_size if self.output_size else self.rest_ms
        return self._layers_ms(counts) + rest

    def prefer(self, counts: dict[int, int]) -> dict[int, int]:
        """`counts` with each group grown to the aligned width (within `ALIGNMENTS`, never past the group's size)
        whose layers run fastest, given the other groups; the widest of equally fast widths wins. Every group
        starts at its widest option: a layer is fast only when both its widths are aligned, so a group deciding among
        unaligned neighbours would never see the gain."""
        options = {g.id: self._aligned_widths(g, counts.get(g.id, g.size)) for g in self.analysis.prunable}
        counts = dict(counts) | {gid: widths[-1] for gid, widths in options.items()}
        for group in self.analysis.prunable:
            if len(options[group.id]) < 2 or not self.by_group.get(group.id):
                continue
            times = {}
            for width in options[group.id]:
                counts[group.id] = width
                times[width] = sum(self._layer_ms(layer, counts) for layer in self.by_group[group.id])
            fastest = min(times.values())
            counts[group.id] = max(w for w, t in times.items() if t <= fastest * (1 + TIE))
        return counts

    def fit(self, search: Callable[[tuple], dict[int, int]], target: float) -> dict[int, int]:
        """Counts that keep `target` of the measured latency: `search((self, goal))` bisects on the table; the
        whole pruned model is then measured against the original (check.measure_latency) and the goal corrected by what
        the table missed: scaled until one measurement falls on each side of the target, then interpolated between
        them. Returns the tried counts closest to the target from below, or the fastest; `outcome` says what was
        predicted and measured."""
        goal, tried, below, above = target, {}, None, None
        for _ in range(CORRECTIONS):
            counts = search((self, goal))
            key = tuple(sorted(counts.items()))
            if key not in tried:
                tried[key] = (self.measure_kept(counts), counts)
            kept = tried[key][0]
            log.debug("latency: table goal %.3f predicts %.3f, measured %.3f", goal,
                      self.cost(counts) / self.cost({}), kept)
            if abs(kept - target) <= TIE * target:
                break
            if kept < target:
                below = (goal, kept)
            else:
                above = (goal, kept)
            if below and above:
                (g0, k0), (g1, k1) = below, above
                goal = g0 + (g1 - g0) * (target - k0) / (k1 - k0) if k1 > k0 else (g0 + g1) / 2
            else:
                goal = min(1.0, goal * target / kept)
        under = [t for t in tried.values() if t[0] <= target * (1 + TIE)]
        kept, counts = max(under, key=lambda t: t[0]) if under else min(tried.values(), key=lambda t: t[0])
        self.progress.close()
        self.outcome = {"target": target, "threads": self.threads, "predicted_kept": self.cost(counts) / self.cost({}),
                        "measured_kept": kept, "layers": len(self.layers), "one_layer_models": self.measured,
                        "table_entries": len(self.table)}
        return counts

    def measure_kept(self, counts: dict[int, int]) -> float:
        """Measured latency of the whole model pruned to `counts` (which channels does not matter), as a fraction of
        the original's, both timed by `onnxprune check`'s timer (interleaved, so that the machine's drift cancels)."""
        keep = {g: np.arange(n) for g, n in counts.items() if n < self.analysis.groups[g].size}
        pruned = apply_plan(copy.deepcopy(self.model), self.analysis, Plan(keep)) if keep else self.model
        timing = measure_latency(self.model, pruned, self.feed, self.threads, runs=WHOLE_RUNS)
        return timing["after_ms"]["median"] / timing["before_ms"]["median"]

    # -- layers ----------------------------------------------------------------------------------------------------

    def _aligned_widths(self, group, n: int) -> list[int]:
        widths = {n}
        base = step_for(group, self.round_to)
        for alignment in ALIGNMENTS:
            step = math.lcm(base, step_for(group, alignment))
            width = -(-n // step) * step
            if width <= group.size:
                widths.add(width)
        return sorted(widths)

    def _layer(self, node: onnx.NodeProto) -> _Layer | None:
        index = self.analysis.index
        if node.op_type not in LAYER_OPS or len(node.input) < 2 or node.input[1] not in index.initializers:
            return None
        tensors = [t for t in node.input if t] + [node.output[0]]
        shapes = [[d if isinstance(d, int) else 1 for d in self.shapes.get(t) or []] for t in tensors]
        if any(not s for s in shapes):
            return None
        groups = {gid for t, s in zip(tensors, shapes) for a in range(len(s))
                  for gid, _, _ in self.analysis.layouts.get((t, a), [])}
        return _Layer(node, tensors, [t in index.initializers for t in tensors], shapes, groups)

    def _dim(self, space: Space, size: int, counts: dict[int, int]) -> int:
        segments = self.analysis.layouts.get(space)
        if not segments:
            return size
        return sum(counts.get(gid, self.analysis.groups[gid].size) * inner for gid, _, inner in segments)

    def _shapes(self, layer: _Layer, counts: dict[int, int]) -> list[list[int]]:
        return [[self._dim((t, a), d, counts) for a, d in enumerate(s)] for t, s in zip(layer.tensors, layer.shapes)]

    def _layers_ms(self, counts: dict[int, int]) -> float:
        return sum(self._layer_ms(layer, counts) for layer in self.layers)

    def _output_size(self, counts: dict[int, int]) -> float:
        return float(sum(math.prod(self._shapes(layer, counts)[-1]) for layer in self.layers))

    def _layer_ms(self, layer: _Layer, counts: dict[int, int]) -> float:
        shapes = self._shapes(layer, counts)
        node = _one_node(layer.node, shapes)
        key = _key(node, shapes, self.threads)
        if key not in self.table:
            try:
                self.table[key] = self._measure(node, layer, shapes)
            except Exception as err:  # noqa: BLE001 - onnxruntime's errors have no common type; never fatal here
                log.debug("latency of %s not measured: %s", layer.node.name, first_line(err))
                self.table[key] = 0.0
            self.measured += 1
            self.progress.show(f"latency table: {self.measured} one-layer models measured")
        return self.table[key]

    def _measure(self, node: onnx.NodeProto, layer: _Layer, shapes: list[list[int]]) -> float:
        """A 2-D convolution is timed between two cheap depthwise 1x1 convolutions standing for its neighbours,
        whose time alone is then subtracted: onnxruntime keeps channel-aligned tensors in its blocked (NCHWc) layout
        from layer to layer, so an aligned layer alone would pay layout conversions that it does not pay in the
        model, and an unaligned one would not pay those it does."""
        if not _has_context(node, shapes):
            return self._timed(_layer_model(node, layer.constant, shapes, self.model, context=False), shapes[0])
        total = self._timed(_layer_model(node, layer.constant, shapes, self.model, context=True), shapes[0])
        return max(1e-3, total - self._context_ms(shapes[0]) - self._context_ms(shapes[-1]))

    def _context_ms(self, shape: list[int]) -> float:
        key = _key(helper.make_node("Context", [], []), [shape], self.threads)
        if key not in self.table:
            graph = helper.make_graph([_context_node("x0", "y", shape[1], "w")], "context",
                                      [helper.make_tensor_value_info("x0", onnx.TensorProto.FLOAT, shape)],
                                      [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                                      [_constant("w", [shape[1], 1, 1, 1])])
            self.table[key] = self._timed(_model(graph, self.model), shape)
        return self.table[key]

    def _timed(self, model: onnx.ModelProto, input_shape: list[int]) -> float:
        return median_ms(session(model, threads=self.threads), {"x0": np.full(input_shape, 0.5, np.float32)})


def _has_context(node: onnx.NodeProto, shapes: list[list[int]]) -> bool:
    return node.op_type == "Conv" and len(shapes[0]) == 4 and len(shapes[-1]) == 4


def _context_node(source: str, target: str, channels: int, weight: str) -> onnx.NodeProto:
    return helper.make_node("Conv", [source, weight], [target], kernel_shape=[1, 1], group=channels)


def _constant(name: str, shape: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.full(shape, 0.01, np.float32), name)  # the values do not matter here


def _model(graph: onnx.GraphProto, original: onnx.ModelProto) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=list(original.opset_import), ir_version=original.ir_version)


def _one_node(node: onnx.NodeProto, shapes: list[list[int]]) -> onnx.NodeProto:
    """The layer's node at pruned widths, inputs renamed x0, x1, ...; a (de)convolution's group follows its widths."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type in ("Conv", "ConvTranspose") and attrs.get("group", 1) != 1:
        per_group = shapes[1][1]  # Conv: W is (O, I/g, k...); ConvTranspose: W is (I, O/g, k...)
        attrs["group"] = max(1, (shapes[0][1] if node.op_type == "Conv" else shapes[-1][1]) // per_group)
    inputs = [f"x{k}" for k in range(len(shapes) - 1)]
    return helper.make_node(node.op_type, inputs, ["y"], domain=node.domain, **attrs)


def _key(node: onnx.NodeProto, shapes: list[list[int]], threads: int) -> str:
    """What a measured model computes: op, attributes, shapes, threads (names left out)."""
    text = node.op_type + node.domain + repr(shapes) + repr(threads) + \
        repr(sorted((a.name, a.SerializeToString()) for a in node.attribute))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _layer_model(node: onnx.NodeProto, constant: list[bool], shapes: list[list[int]], original: onnx.ModelProto,
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


def load_table(path: str | os.PathLike) -> dict[str, float]:
    """Measurements saved by an earlier run (`save_table`), when it ran on this machine with this onnxruntime;
    otherwise none (a table from elsewhere would mislead), with a warning."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        entries = {str(k): float(v) for k, v in data["entries"].items()}
        origin = data["machine"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UsageError(f"cannot read latency table {path}: {first_line(err)}") from None
    if origin != _machine():
        log.warning("latency table %s was measured on another machine or onnxruntime (%s); measuring afresh",
                    path, origin)
        return {}
    return entries


def save_table(path: str | os.PathLike, table: dict[str, float]) -> None:
    """Write the measurements (atomically), to be reused by later runs on this machine."""
    data = {"machine": _machine(), "entries": dict(sorted(table.items()))}
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=0)
        os.replace(tmp, path)
    except OSError as err:
        raise UsageError(f"cannot write latency table {path}: {err.strerror or err}") from None


def _machine() -> str:
    import onnxruntime
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}; {os.cpu_count()} cpus; onnxruntime {onnxruntime.__version__}"
