"""Packed storage of sparse layer weights: the kept values plus their positions, rebuilt by standard ONNX nodes.

`--sparse-storage dense` (the default) leaves the zeros in the dense tensors, where TensorRT finds 2:4 weights.
`packed` replaces each sparse constant weight of a Conv, ConvTranspose, Gemm or MatMul (`layers.describe`) by
initializers holding only its kept values and where they go, and a small subgraph that rebuilds the dense weight
under its original name, so its readers do not change:

    N:M      the weight's input-channel axis split into blocks of M; per block the N kept values and their positions
             (2 bits each for M = 4, 4 per byte; 1 bit for M = 2, 4 bits for M = 8 or 16)
             positions: BitShift, Mod, Reshape (Slice) -> Cast -> ScatterElements into ConstantOfShape zeros -> Reshape
    bitmask  one bit per weight (np.packbits order) and the non-zeros in order
             bits: BitShift, Mod, Reshape (Slice) -> Cast -> CumSum, Mul -> Gather from (0, values) -> Reshape

Every input of those nodes is an initializer, so onnxruntime folds them into the dense weight once, when the session
is created: inference runs on the same weights, as fast, with bit-for-bit the same outputs. The nodes are all in the
ai.onnx domain from opset 11 (BitShift and Mod, not BitwiseAnd, which needs 18). For each weight the smaller of its
N:M (M in 2, 4, 8, 16, N the largest count of non-zeros in a block) and bitmask encodings is built, and kept only
if its serialised bytes (values, positions, nodes and their small constants) are fewer than the dense tensor's; a
weight that does not follow an N:M pattern is therefore stored as a bitmask, or left dense.

Zeros are +0.0: a -0.0 is a value like any other and is stored, so the rebuilt weight equals the dense one bit for
bit (a sparsifier should write np.where(mask, w, 0), not w * mask, whose zeros keep the sign of w).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph import GraphIndex, subgraph_references
from ..layers import Layer, describe
from .pattern import blocks, input_axis

SPARSE_STORAGES = ("dense", "packed")
BLOCK_SIZES = (2, 4, 8, 16)  # the M an N:M encoding may use
_PACKABLE_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


@dataclass
class StoredWeight:
    """How one layer weight is stored: `storage` is 'N:M', 'bitmask' or 'dense' (with the `reason`)."""

    weight: str
    node: str
    storage: str
    dense_bytes: int
    stored_bytes: int
    reason: str = ""


@dataclass
class PackReport:
    weights: list[StoredWeight] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"weights": [asdict(w) for w in self.weights], "dense_bytes": self.dense_bytes,
                "stored_bytes": self.stored_bytes, "summary": self.summary_lines()}

    @property
    def dense_bytes(self) -> int:
        return sum(w.dense_bytes for w in self.weights)

    @property
    def stored_bytes(self) -> int:
        return sum(w.stored_bytes for w in self.weights)

    def summary_lines(self) -> list[str]:
        packed = [w for w in self.weights if w.storage != "dense"]
        kinds = sorted({w.storage for w in packed})
        counts = ", ".join(f"{sum(w.storage == k for w in packed)} as {k}" for k in kinds)
        ratio = self.stored_bytes / max(self.dense_bytes, 1)
        return [f"sparse storage packed: {len(packed)} of {len(self.weights)} layer weights"
                f"{f' ({counts})' if counts else ''}, the rest left dense; their bytes "
                f"{self.dense_bytes:,} -> {self.stored_bytes:,} ({ratio:.2f}x); onnxruntime rebuilds them once "
                "when it loads the model"]


@dataclass
class Encoding:
    """A weight's packed form: the initializers and the nodes that rebuild it."""

    storage: str
    initializers: list[TensorProto]
    nodes: list[onnx.NodeProto]

    @property
    def bytes(self) -> int:
        return sum(t.ByteSize() for t in self.initializers) + sum(n.ByteSize() for n in self.nodes)


# ------------------------------------------------------------------------------------------------ the model

def pack_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PackReport]:
    """A copy of `model` with every layer weight that is smaller packed stored packed (see the module docstring)."""
    packed = copy.deepcopy(model)
    graph = packed.graph
    index = GraphIndex.build(packed, shapes={})
    fresh = _namer(packed)
    report, nodes, replaced = PackReport(), [], {}
    for layer in _layers_by_weight(packed, index):
        entry, encoding = _store(layer, index.initializers.get(layer.weight), {i.name for i in graph.input}, fresh)
        report.weights.append(entry)
        if encoding is not None:
            nodes += encoding.nodes
            replaced[layer.weight] = encoding.initializers
    kept = [i for i in graph.initializer if i.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept + [t for tensors in replaced.values() for t in tensors])
    nodes += graph.node  # the rebuilds read initializers only: they can run first
    del graph.node[:]
    graph.node.extend(nodes)
    return packed, report


def _layers_by_weight(model: onnx.ModelProto, index: GraphIndex) -> list[Layer]:
    """One description per distinct layer weight (the first layer that reads a shared one)."""
    found: dict[str, Layer] = {}
    for node in model.graph.node:
        layer = describe(node, index)
        if layer is not None and layer.weight not in found:
            found[layer.weight] = layer
    return list(found.values())


def _store(layer: Layer, init: TensorProto | None, graph_inputs: set[str],
           fresh: Callable[[str], str]) -> tuple[StoredWeight, Encoding | None]:
    """The weight's entry in the report, and its encoding where packing saves bytes."""
    dense = init.ByteSize() if init is not None else 0
    entry = StoredWeight(layer.weight, layer.node.name, "dense", dense, dense)
    entry.reason = _not_packable(init, graph_inputs)
    if entry.reason:
        return entry, None
    weight = numpy_helper.to_array(init)
    encoding = best_encoding(weight, input_axis(layer, weight) if weight.ndim >= 2 else 0, layer.weight, fresh)
    if encoding.bytes >= dense:
        entry.reason = f"packed as {encoding.storage} it would take {encoding.bytes:,} bytes"
        return entry, None
    entry.storage, entry.stored_bytes = encoding.storage, encoding.bytes
    return entry, encoding


def _not_packable(init: TensorProto | None, graph_inputs: set[str]) -> str:
    if init is None:
        return "computed from a stored tensor (a quantized weight's DequantizeLinear): left as it is"
    if init.data_type not in _PACKABLE_TYPES:
        return f"element type {TensorProto.DataType.Name(init.data_type)} is not packed"
    if init.data_location == TensorProto.EXTERNAL:
        return "its external data is not loaded"
    if init.name in graph_inputs:
        return "it is also a graph input, which a caller may override"
    return ""


def _namer(model: onnx.ModelProto) -> Callable[[str], str]:
    """A function giving names no tensor or node of the model (its subgraphs included) has, nor an earlier call
    gave."""
    graph = model.graph
    used = {n.name for n in graph.node} | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    used |= {i.name for i in graph.initializer} | {o.name for o in graph.output} | {v.name for v in graph.value_info}
    used |= subgraph_references(graph)

    def fresh(base: str) -> str:
        name = base
        while name in used:
            name += "_"
        used.add(name)
        return name
    return fresh


# ------------------------------------------------------------------------------------------------ encodings

def stored(values: np.ndarray) -> np.ndarray:
    """Where a value must be stored: everything but +0.0 (a -0.0 differs from the zeros a rebuild fills in)."""
    return (values != 0) | np.signbit(values)


def best_encoding(weight: np.ndarray, axis: int, name: str, fresh: Callable[[str], str]) -> Encoding:
    """The encoding of `weight` (input channels on `axis`) whose values and positions take the fewest bytes: N:M
    with the best M that divides the channels, or a bitmask."""
    keep = stored(weight)
    options = []
    for m in BLOCK_SIZES:
        if weight.ndim >= 2 and weight.shape[axis] % m == 0:
            n = max(1, int(np.count_nonzero(blocks(keep, axis, m), axis=axis + 1).max(initial=0)))
            if n < m:
                options.append((_nm_bytes(weight, axis, n, m), (n, m)))
    options.append((_bitmask_bytes(weight, keep), None))  # last: a tie goes to N:M, the layout TensorRT reads
    best = min(options, key=lambda option: option[0])[1]
    if best is None:
        return bitmask_encoding(weight, name, fresh)
    return nm_encoding(weight, axis, *best, name, fresh)


def field_bits(m: int) -> int:
    """Bits per stored position in a block of m: a power of two, so that whole fields fill each byte."""
    need = max(1, math.ceil(math.log2(m)))
    return next(bits for bits in (1, 2, 4, 8) if bits >= need)


def _bitmask_bytes(weight: np.ndarray, keep: np.ndarray) -> int:
    return (int(np.count_nonzero(keep)) + 1) * weight.itemsize + math.ceil(weight.size / 8)


def _nm_bytes(weight: np.ndarray, axis: int, n: int, m: int) -> int:
    kept = weight.size // m * n
    return kept * weight.itemsize + math.ceil(kept * field_bits(m) / 8)


def nm_encoding(weight: np.ndarray, axis: int, n: int, m: int, name: str, fresh: Callable[[str], str]) -> Encoding:
    """Per block of m input channels, n values and their positions (the non-zeros first, then zeros to fill n)."""
    grouped = blocks(weight, axis, m)
    block_axis = axis + 1
    order = np.argsort(~stored(grouped), axis=block_axis, kind="stable")  # stored values first, in order
    positions = np.sort(np.take(order, np.arange(n), axis=block_axis), axis=block_axis)
    values = np.take_along_axis(grouped, positions, axis=block_axis)
    parts = _Parts(name, fresh)
    index = parts.cast(parts.unpack_fields(positions.astype(np.uint8).ravel(), field_bits(m), values.shape),
                       TensorProto.INT64)
    zeros = parts.zeros(grouped.shape, weight.dtype)
    scattered = parts.node("ScatterElements", [zeros, index, parts.constant(values, "values")], axis=block_axis)
    parts.node("Reshape", [scattered, parts.shape(weight.shape)], output=name)
    return parts.encoding(f"{n}:{m}")


def bitmask_encoding(weight: np.ndarray, name: str, fresh: Callable[[str], str]) -> Encoding:
    """One bit per weight (set where a value is stored) and the stored values in order after one +0.0: the running
    count of set bits, times the bit, is each weight's index into them (0, the zero, where the bit is clear). No
    NonZero / ScatterND: onnxruntime does not fold NonZero, whose output size depends on the data."""
    flat = weight.reshape(-1)
    keep = stored(flat)
    parts = _Parts(name, fresh)
    bits = parts.cast(parts.unpack_fields(keep.astype(np.uint8), 1, flat.shape), TensorProto.INT64)
    ranks = parts.node("CumSum", [bits, parts.constant(np.array(0, np.int64), "axis")])
    values = parts.constant(np.concatenate([np.zeros(1, weight.dtype), flat[keep]]), "values")
    rebuilt = parts.node("Gather", [values, parts.node("Mul", [ranks, bits])])
    parts.node("Reshape", [rebuilt, parts.shape(weight.shape)], output=name)
    return parts.encoding("bitmask")


def pack_fields(fields: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned fields of `bits` bits each, `8 // bits` to a byte, the first in the high bits (np.packbits' order
    for 1 bit), as a (bytes, 1) uint8 column, the last byte padded with zeros."""
    per = 8 // bits
    padded = np.zeros(math.ceil(len(fields) / per) * per, np.uint8)
    padded[:len(fields)] = fields
    shifts = (bits * np.arange(per - 1, -1, -1)).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(np.uint8)[:, None]


class _Parts:
    """Collects one weight's rebuild nodes and initializers, named after the weight."""

    def __init__(self, weight: str, fresh: Callable[[str], str]):
        self.weight, self.fresh = weight, fresh
        self.initializers: list[TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []

    def constant(self, value: np.ndarray, what: str) -> str:
        name = self.fresh(f"{self.weight}/{what}")
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def shape(self, dims: tuple[int, ...]) -> str:
        return self.constant(np.array(dims, np.int64), "shape")

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        """A node named as its output (short names: the nodes' bytes count against what packing saves)."""
        name = self.fresh(f"{self.weight}/{len(self.nodes)}")  # unique among tensor and node names alike
        self.nodes.append(helper.make_node(op, inputs, [output or name], name=name, **attrs))
        return output or name

    def cast(self, value: str, to: int) -> str:
        return self.node("Cast", [value], to=to)

    def zeros(self, dims: tuple[int, ...], dtype: np.dtype) -> str:
        return self.node("ConstantOfShape", [self.shape(dims)], value=numpy_helper.from_array(np.zeros(1, dtype)))

    def unpack_fields(self, fields: np.ndarray, bits: int, shape: tuple[int, ...]) -> str:
        """The uint8 `fields`, stored packed (pack_fields), rebuilt as a uint8 tensor of `shape`."""
        packed = self.constant(pack_fields(fields, bits), "positions" if bits > 1 else "mask")
        per = 8 // bits
        shifts = self.constant((bits * np.arange(per - 1, -1, -1)).astype(np.uint8), "shifts")
        shifted = self.node("BitShift", [packed, shifts], direction="RIGHT")  # (bytes, per)
        unpacked = self.node("Mod", [shifted, self.constant(np.array([1 << bits], np.uint8), "modulus")])
        if len(fields) % per:
            flat = self.node("Reshape", [unpacked, self.shape((-1,))])
            unpacked = self.node("Slice", [flat, self.constant(np.array([0], np.int64), "start"),
                                           self.constant(np.array([len(fields)], np.int64), "end")])
        return self.node("Reshape", [unpacked, self.shape(shape)])

    def encoding(self, storage: str) -> Encoding:
        return Encoding(storage, self.initializers, self.nodes)
