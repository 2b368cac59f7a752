"""The per-layer latency table as a cost model (`cost.CostModel`): predicted milliseconds of the model at given
widths, from its layers' latencies measured alone (`one_layer`).

Every layer `layers.describe` knows (Conv, ConvTranspose, Gemm and MatMul with a constant weight) is timed. The model's latency is the sum over its
layers plus the rest (norms, activations, pools, copies), taken from one measurement of the whole model and scaled
with the layers' output sizes.

The table sees what MACs miss: onnxruntime's NCHWc kernels work on blocks of 8 or 16 channels, so a depthwise conv
with 143 channels can take 4x as long as one with 144. `prefer` uses this: a group whose count can grow to an aligned
width at no more latency keeps the extra channels. A few whole-model measurements correct the level (`correction`).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx

from ..allocate import step_for
from ..cost import Counts
from ..groups import Analysis, Group, Space
from ..layers import Layer, describe
from ..verify import random_feeds
from .one_layer import LayerTimer

ALIGNMENTS = (8, 16)  # widths above a count worth trying: SIMD lanes and onnxruntime's channel blocks
TIE = 0.02  # latencies within 2% count as equal (measurement noise): the wider choice wins


@dataclass
class TableLayer:
    layer: Layer
    tensors: list[str]  # inputs then the output
    constant: list[bool]
    shapes: list[list[int]]
    groups: set[int]


class LatencyModel:
    """Predicted milliseconds when group g keeps counts[g] channels, for `allocate.counts_for_target`.

    `layer_timer` times single layers (on demand, cached); `timer` times the whole model once on `feed` (default:
    random, run-time sizes 1) for the rest; `shapes` (default: the analysis's) are the sizes layers are timed at."""

    steps = 8  # bisection steps; each measures only the (layer, width) pairs not in the table yet
    fill_gaps = True  # groups of equal size switch alignment together: the cost jumps

    def __init__(self, model: onnx.ModelProto, analysis: Analysis, layer_timer: LayerTimer, round_to: int = 1,
                 feed: dict[str, np.ndarray] | None = None, shapes: dict | None = None):
        self.analysis, self.round_to, self.layer_timer = analysis, round_to, layer_timer
        self.layers = [layer for node in analysis.index.nodes  # layers inside If branches, Loop and Scan bodies too
                       if (layer := _layer(node, analysis, shapes or analysis.index.shapes))]
        self.by_group: dict[int, list[TableLayer]] = defaultdict(list)
        for layer in self.layers:
            for gid in layer.groups:
                self.by_group[gid].append(layer)
        whole_ms = layer_timer.timer.model_ms(model, feed or random_feeds(model))
        self.rest_ms = max(0.0, whole_ms - self._layers_ms({}))
        self.output_size = self._output_size({})

    @property
    def measured(self) -> int:
        """One-layer models measured for this table (the others came from the cache)."""
        return self.layer_timer.measured

    def cost(self, counts: Counts) -> float:
        """Predicted milliseconds of the model when group g keeps counts[g] channels."""
        rest = self.rest_ms * self._output_size(counts) / self.output_size if self.output_size else self.rest_ms
        return self._layers_ms(counts) + rest

    def prefer(self, counts: Counts) -> Counts:
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

    def _aligned_widths(self, group: Group, n: int) -> list[int]:
        widths = {n}
        base = step_for(group, self.round_to)
        for alignment in ALIGNMENTS:
            step = math.lcm(base, step_for(group, alignment))
            width = -(-n // step) * step
            if width <= group.size:
                widths.add(width)
        return sorted(widths)

    def _dim(self, space: Space, size: int, counts: Counts) -> int:
        segments = self.analysis.layouts.get(space)
        if not segments:
            return size
        return sum(counts.get(gid, self.analysis.groups[gid].size) * inner for gid, _, inner in segments)

    def _shapes(self, layer: TableLayer, counts: Counts) -> list[list[int]]:
        return [[self._dim((t, a), d, counts) for a, d in enumerate(s)] for t, s in zip(layer.tensors, layer.shapes)]

    def _layers_ms(self, counts: Counts) -> float:
        return sum(self._layer_ms(layer, counts) for layer in self.layers)

    def _output_size(self, counts: Counts) -> float:
        return float(sum(math.prod(self._shapes(layer, counts)[-1]) for layer in self.layers))

    def _layer_ms(self, layer: TableLayer, counts: Counts) -> float:
        return self.layer_timer.ms(layer.layer, layer.constant, self._shapes(layer, counts))


def _layer(node: onnx.NodeProto, analysis: Analysis, sizes: dict) -> TableLayer | None:
    """The node as a layer of the table: a weight layer with a constant weight and known shapes."""
    index = analysis.index
    layer = describe(node, index)
    if layer is None:
        return None
    tensors = [t for t in node.input if t] + [node.output[0]]
    shapes = [[d if isinstance(d, int) else 1 for d in sizes.get(t) or []] for t in tensors]
    if any(not s for s in shapes):
        return None
    groups = {gid for t, s in zip(tensors, shapes) for a in range(len(s))
              for gid, _, _ in analysis.layouts.get((t, a), [])}
    return TableLayer(layer, tensors, [t in index.initializers for t in tensors], shapes, groups)
