"""Slicing the hidden width of a transformer (SliceGPT, Ashkboos et al. 2024), on ONNX graphs.

Each norm of the residual stream becomes an RMS norm: a LayerNorm's affine parameters are folded into the layers
that read it, and its mean subtraction into the values that are written to the stream (where something other than
a LayerNorm reads a sum, its mean is kept and removed by a small projection before the norm). RMS norms commute with
an orthogonal rotation, so each sum of the stream is rotated onto its principal directions on the calibration data
and only the leading `k` are kept: every weight that writes or reads the stream loses rows or columns. With every
direction kept, the sliced model computes what the original did (up to float rounding).

`slice_hidden(model, feeds, fraction)` is the whole transform; see stream.py (what is recognised), bases.py (the
principal directions) and rewrite.py (the sliced weights and the few nodes added).
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import onnx
from onnx import helper, numpy_helper

from .. import graph as graph_mod, lazy_tensors
from ..calibrate import other_floats
from ..errors import OnnxPruneError
from ..graph import GraphIndex
from ..verify import count_macs, count_params, first_sample, sample_shapes
from .bases import principal_directions, stream_grams
from .rewrite import SLICED, Basis, Rewriter
from .stream import NoStream, Stream, find_stream

log = logging.getLogger("onnxprune")
Feeds = Callable[[], Iterable[dict]]


@dataclass
class Sliced:
    """The sliced model and what was done (or why nothing was: `sliced` False, the model unchanged). `reference`:
    the original model that also computes, under the sliced model's names, the outputs of the layers writing the
    stream in the sliced basis (E^T y), so that least-squares recovery can fit the pruned sliced model to the
    original."""

    model: onnx.ModelProto
    description: str
    sliced: bool
    reference: onnx.ModelProto | None = None
    width: int = 0
    kept: int = 0
    params_before: int = 0
    macs_before: int = 0  # of the original, at one calibration sample's sizes (batch 1), as the report counts
    macs_after: int = 0

    @property
    def macs_kept(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0


def slice_hidden(model: onnx.ModelProto | str | os.PathLike, feeds: Feeds, fraction: float) -> Sliced:
    """Remove `fraction` of the hidden width of `model`'s residual stream, using the calibration batches
    `feeds()` yields (feed dicts). A model without a stream slicing recognises comes back unchanged, with the
    reason as its description. The input is never modified."""
    original = normalised(model)
    try:
        stream = _float_stream(original)
    except NoStream as reason:
        return Sliced(original, f"not sliced: {reason}", False)
    kept = max(1, stream.width - int(round(fraction * stream.width)))
    grams = stream_grams(original, stream, feeds())
    bases = {name: Basis(principal_directions(gram, kept), stream.sums[name].centred) for name, gram in grams.items()}
    try:
        sliced, rewriter = _rewritten(original, bases)
    except OnnxPruneError as exc:  # a shape slicing did not foresee: say so and keep the model whole
        log.warning("%s; the hidden width is not sliced", exc)
        return Sliced(original, f"not sliced: {exc}", False)
    counts = rewriter.counts
    text = (f"hidden width {stream.width} -> {kept} at {len(stream.norms)} norms ({len(bases)} bases, "
            f"{counts.folded} weights rotated, {counts.skips} skip matrices, {counts.entries} projections in, "
            f"{counts.exits} rebuilds out)")
    result = Sliced(sliced, text, True, _reference(original, rewriter.projected), stream.width, kept)
    feed = next(iter(feeds()))
    result.params_before, result.macs_before, result.macs_after = (
        count_params(original), _macs(original, feed), _macs(sliced, feed))
    if kept < stream.width and result.macs_after >= result.macs_before:
        return Sliced(original, f"not sliced: {text} would keep {result.macs_kept:.0%} of the MACs (the k x k skips, "
                      "projections and rebuilds cost more than the narrower layers save)", False)
    return result


def _rewritten(original: onnx.ModelProto, bases: dict[str, Basis]) -> tuple[onnx.ModelProto, Rewriter]:
    """A sliced copy of the model with these bases, validated (checker and strict shape inference)."""
    sliced = copy.deepcopy(original)
    index = GraphIndex.build(sliced)
    rewriter = Rewriter(sliced, index, find_stream(index), bases)
    rewriter.run()
    graph_mod.validate(sliced, "the sliced model")
    return sliced, rewriter


def _macs(model: onnx.ModelProto, feed: dict) -> int:
    """MACs at batch 1, at the sizes of the first sample of `feed` where the model's sizes are known at run time."""
    return count_macs(model, sample_shapes(model, first_sample(model, feed)))


def normalised(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """A normalised copy with its weights in memory (constants as initializers, every node named)."""
    if isinstance(model, onnx.ModelProto):
        graph_mod.check_loadable(model)
        copied = copy.deepcopy(model)
    else:
        copied = graph_mod.load_model(model, lazy=True)
    lazy_tensors.load_weights(copied)
    graph_mod.node_names(copied)
    graph_mod.normalize(copied)
    return copied


def has_stream(model: onnx.ModelProto) -> bool:
    """Whether slice_hidden would find a residual stream to slice in this normalised model: the graph alone, no
    data read (the accurate recipe tries slicing only there)."""
    try:
        _float_stream(model)
    except NoStream:
        return False
    return True


def _float_stream(model: onnx.ModelProto) -> Stream:
    if other_floats(model):
        raise NoStream("slicing handles float32 models")
    return find_stream(GraphIndex.build(model))


def _reference(original: onnx.ModelProto, projected: list[tuple[str, str, "object"]]) -> onnx.ModelProto:
    """The original with each stream writer's output also projected, E^T y, under its name in the sliced model;
    where the names are the same, the original's own readers read the full output under a new name."""
    reference = copy.deepcopy(original)
    graph = reference.graph
    for sliced_name, name, encoder in projected:
        source = name
        if sliced_name == name:
            source = f"{name}__full"
            for node in graph.node:
                node.output[:] = [source if o == name else o for o in node.output]
                node.input[:] = [source if i == name else i for i in node.input]
        weight = numpy_helper.from_array(encoder.astype("float32"), f"{sliced_name}__encoder")
        graph.initializer.append(weight)
        graph.node.append(helper.make_node("MatMul", [source, weight.name], [sliced_name],
                                           name=f"{sliced_name}__projection"))
    del graph.value_info[:]
    return reference


__all__ = ["SLICED", "Sliced", "has_stream", "normalised", "slice_hidden"]
