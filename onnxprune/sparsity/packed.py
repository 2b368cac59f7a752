"""Packed storage of sparse layer weights: the kept values plus their positions, rebuilt by standard ONNX nodes.

`--sparse-storage dense` (the default) leaves the zeros in the dense tensors, where TensorRT finds 2:4 weights.
`packed` replaces each sparse constant weight of a Conv, ConvTranspose, Gemm or MatMul (`layers.describe`) by
initializers holding only its kept values and where they go, and a small subgraph that rebuilds the dense weight
under its original name, so its readers do not change:

    N:M      the weight's input-channel axis split into blocks of M; per block the N kept values, and which N
             positions they take as the index of that combination among the C(M, N): 2:4 has 6, so 3 blocks share
             a byte (2.7 bits a block where two 2-bit positions take 4); 1:4 has 4, 4 to a byte
             codes: Cast, Gather from the table, Reshape (Slice) [Transpose] -> ScatterElements into
             ConstantOfShape zeros -> Reshape
    bitmask  one bit per weight (np.packbits' order) and the non-zeros in order
             bits: Cast, Gather from the table, Reshape (or Slice) -> CumSum, Mul -> Gather from (0, values)
             -> Reshape

A code byte is decoded by one lookup in a 256-row table that every weight of the model with the same codes shares
(computed by a few nodes from the codes, as int32: the indices ScatterElements and Gather take): onnxruntime's
Gather runs about 4x faster than the BitShift and Mod that would decode the same bits, and int32 halves the time
of int64 arithmetic. onnxruntime's folding copies every tensor a node makes, so the chains are kept short.
Every input of those nodes is an initializer, so onnxruntime folds them into the dense weight once, when the
session is created: inference runs on the same weights, as fast, with bit-for-bit the same outputs. All nodes are
ai.onnx from opset 11. For each weight the smallest of its N:M (M in 2, 4, 8, 16, N the largest count of non-zeros
in a block, where C(M, N) <= 256) and bitmask encodings is built, and kept only if its serialised bytes (values,
codes, nodes, their small constants, and a table the model does not hold yet) are fewer than the dense tensor's;
a weight that does not follow an N:M pattern is therefore stored as a bitmask, or left dense.

Zeros are +0.0: a -0.0 is a value like any other and is stored, so the rebuilt weight equals the dense one bit for
bit (a sparsifier should write np.where(mask, w, 0), not w * mask, whose zeros keep the sign of w).
"""
from __future__ import annotations

import copy
import itertools
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
class Table:
    """A lookup table the rebuilds of one model share, computed by its own nodes from the few codes it lists."""

    name: str  # the table tensor, (256, codes per byte * code width) uint8
    initializers: list[TensorProto]
    nodes: list[onnx.NodeProto]

    @property
    def bytes(self) -> int:
        return sum(t.ByteSize() for t in self.initializers) + sum(n.ByteSize() for n in self.nodes)


@dataclass
class Encoding:
    """A weight's packed form: its initializers and the nodes that rebuild it, and the lookup tables those read
    (shared by every weight of a model that uses the same codes)."""

    storage: str
    initializers: list[TensorProto]
    nodes: list[onnx.NodeProto]
    tables: list[Table]

    def bytes(self, present: set[str] = frozenset()) -> int:
        """Serialised bytes of its initializers and nodes, and of the tables it reads that are not `present` yet."""
        own = sum(t.ByteSize() for t in self.initializers) + sum(n.ByteSize() for n in self.nodes)
        return own + sum(t.bytes for t in self.tables if t.name not in present)


class Tables:
    """The lookup tables of one model's rebuilds: one per set of codes, made and named when first asked for."""

    def __init__(self, fresh: Callable[[str], str]):
        self.fresh = fresh
        self.made: dict[bytes, Table] = {}

    def get(self, codes: np.ndarray) -> Table:
        key = codes.tobytes() + str(codes.shape).encode()
        if key not in self.made:
            parts = Rebuild(f"unpack_{len(codes)}x{codes.shape[1]}", self.fresh, self)
            self.made[key] = Table(parts.table(codes), parts.initializers, parts.nodes)
        return self.made[key]


# ------------------------------------------------------------------------------------------------ the model

def pack_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PackReport]:
    """A copy of `model` with every layer weight that is smaller packed stored packed (see the module docstring)."""
    packed = copy.deepcopy(model)
    graph = packed.graph
    index = GraphIndex.build(packed, shapes={})
    fresh = _namer(packed)
    layers = _layers_by_weight(packed, index)
    inits = [index.initializers.get(layer.weight) for layer in layers]
    report, tables, present = PackReport([None] * len(layers)), Tables(fresh), set()
    nodes, replaced = [], {}
    for k in sorted(range(len(layers)), key=lambda k: -_dense_bytes(inits[k])):  # biggest first: the first weight
        report.weights[k], encoding = _store(layers[k], inits[k], {i.name for i in graph.input}, fresh, tables,
                                             present)  # that needs a table pays for it, and gains most
        if encoding is not None:
            new_tables = [t for t in encoding.tables if t.name not in present]
            nodes += [node for t in new_tables for node in t.nodes] + encoding.nodes
            replaced[layers[k].weight] = encoding.initializers + [i for t in new_tables for i in t.initializers]
            present |= {t.name for t in encoding.tables}
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


def _store(layer: Layer, init: TensorProto | None, graph_inputs: set[str], fresh: Callable[[str], str],
           tables: Tables, present: set[str]) -> tuple[StoredWeight, Encoding | None]:
    """The weight's entry in the report, and its encoding where packing saves bytes (a table the model does not
    hold yet counts against the first weight that needs it)."""
    dense = _dense_bytes(init)
    entry = StoredWeight(layer.weight, layer.node.name, "dense", dense, dense)
    entry.reason = _not_packable(init, graph_inputs)
    if entry.reason:
        return entry, None
    weight = numpy_helper.to_array(init)
    axis = input_axis(layer, weight) if weight.ndim >= 2 else 0
    encoding = best_encoding(weight, axis, Rebuild(layer.weight, fresh, tables))
    cost = encoding.bytes(present)
    if cost >= dense:
        entry.reason = f"packed as {encoding.storage} it would take {cost:,} bytes"
        return entry, None
    entry.storage, entry.stored_bytes = encoding.storage, cost
    return entry, encoding


def _dense_bytes(init: TensorProto | None) -> int:
    return init.ByteSize() if init is not None else 0


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


def best_encoding(weight: np.ndarray, axis: int, parts: Rebuild) -> Encoding:
    """The encoding of `weight` (input channels on `axis`) whose values and codes take the fewest bytes: N:M with
    the best M that divides the channels, or a bitmask."""
    keep = stored(weight)
    options = []
    for m in BLOCK_SIZES:
        if weight.ndim >= 2 and weight.shape[axis] % m == 0:
            n = max(1, int(np.count_nonzero(blocks(keep, axis, m), axis=axis + 1).max(initial=0)))
            if n < m and codes_per_byte(math.comb(m, n)):
                options.append((_nm_bytes(weight, n, m), (n, m)))
    options.append((_bitmask_bytes(weight, keep), None))  # last: a tie goes to N:M, the layout TensorRT reads
    best = min(options, key=lambda option: option[0])[1]
    return bitmask_encoding(weight, parts) if best is None else nm_encoding(weight, axis, *best, parts)


def _bitmask_bytes(weight: np.ndarray, keep: np.ndarray) -> int:
    return (int(np.count_nonzero(keep)) + 1) * weight.itemsize + math.ceil(weight.size / 8)


def _nm_bytes(weight: np.ndarray, n: int, m: int) -> int:
    blocks_count = weight.size // m
    return blocks_count * n * weight.itemsize + math.ceil(blocks_count / codes_per_byte(math.comb(m, n)))


def nm_encoding(weight: np.ndarray, axis: int, n: int, m: int, parts: Rebuild) -> Encoding:
    """Per block of m input channels, n values and which n positions they take (the non-zeros, then zeros to make
    n), as the index of that combination among the C(m, n), as many to a byte as fit (2:4: 6 combinations, 3
    blocks to a byte)."""
    grouped = blocks(weight, axis, m)
    block_axis = axis + 1
    order = np.argsort(~stored(grouped), axis=block_axis, kind="stable")  # stored values first, in order
    positions = np.sort(np.take(order, np.arange(n), axis=block_axis), axis=block_axis)
    values = np.take_along_axis(grouped, positions, axis=block_axis)
    per_block = np.moveaxis(positions, block_axis, -1)  # (blocks..., n)
    combos = combinations(n, m)
    decoded = parts.unpack(combination_index(per_block, combos, m), combos, per_block.shape)
    if block_axis != values.ndim - 1:  # back to the values' layout, n on the block axis
        axes = list(range(values.ndim - 1))
        decoded = parts.node("Transpose", [decoded], perm=axes[:block_axis] + [values.ndim - 1] + axes[block_axis:])
    zeros = parts.zeros(grouped.shape, weight.dtype)
    scattered = parts.node("ScatterElements", [zeros, decoded, parts.constant(values, "values")], axis=block_axis)
    parts.node("Reshape", [scattered, parts.shape(weight.shape)], output=parts.weight)
    return parts.encoding(f"{n}:{m}")


def bitmask_encoding(weight: np.ndarray, parts: Rebuild) -> Encoding:
    """One bit per weight (set where a value is stored) and the stored values in order after one +0.0: the running
    count of set bits, times the bit, is each weight's index into them (0, the zero, where the bit is clear). No
    NonZero / ScatterND: onnxruntime does not fold NonZero, whose output size depends on the data."""
    flat = weight.reshape(-1)
    keep = stored(flat)
    bits = parts.unpack(keep.astype(np.int64), MASK_BITS, flat.shape)
    ranks = parts.node("CumSum", [bits, parts.constant(np.array(0, np.int32), "axis")])
    values = parts.constant(np.concatenate([np.zeros(1, weight.dtype), flat[keep]]), "values")
    rebuilt = parts.node("Gather", [values, parts.node("Mul", [ranks, bits])])
    parts.node("Reshape", [rebuilt, parts.shape(weight.shape)], output=parts.weight)
    return parts.encoding("bitmask")


# ------------------------------------------------------------------------------------------------ codes

MASK_BITS = np.array([[0], [1]], np.uint8)  # the two codes of a bitmask: np.packbits' order, 8 to a byte


def combinations(n: int, m: int) -> np.ndarray:
    """(C(m, n), n) uint8: every choice of n positions among m, ascending, in lexicographic order."""
    return np.array(list(itertools.combinations(range(m), n)), np.uint8)


def combination_index(positions: np.ndarray, combos: np.ndarray, m: int) -> np.ndarray:
    """The row of `combos` that each block's ascending `positions` (..., n) are, flattened over the blocks."""
    lookup = np.zeros(1 << m, np.int64)
    lookup[(1 << combos.astype(np.int64)).sum(1)] = np.arange(len(combos))
    return lookup[(1 << positions.astype(np.int64)).sum(-1)].reshape(-1)


def codes_per_byte(count: int) -> int:
    """How many codes out of `count` one byte holds (count ** k <= 256); 0 where not even one does."""
    per = 0
    while count ** (per + 1) <= 256:
        per += 1
    return per


def pack_codes(indices: np.ndarray, count: int) -> np.ndarray:
    """Indices of codes (each below `count`), codes_per_byte of them to a byte, the first most significant (base
    `count`; for bits, np.packbits); the last byte padded with index 0."""
    per = codes_per_byte(count)
    padded = np.zeros(math.ceil(len(indices) / per) * per, np.int64)
    padded[:len(indices)] = indices
    return (padded.reshape(-1, per) @ (count ** np.arange(per - 1, -1, -1))).astype(np.uint8)


def unpack_table(codes: np.ndarray) -> np.ndarray:
    """(256, per * width) uint8: the rows of `codes` (count, width) that each byte value stands for, its digits in
    base `count` (pack_codes' inverse; byte values no packing writes wrap around). Rebuild.table computes the
    same with nodes."""
    count, per = len(codes), codes_per_byte(len(codes))
    digits = (np.arange(256)[:, None] // count ** np.arange(per - 1, -1, -1)) % count
    return codes[digits].reshape(256, -1)


class Rebuild:
    """Collects one weight's rebuild nodes and initializers, named after the weight, and the tables they read."""

    def __init__(self, weight: str, fresh: Callable[[str], str], tables: Tables):
        self.weight, self.fresh, self.tables = weight, fresh, tables
        self.initializers: list[TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self.read: list[TensorProto] = []

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

    def unpack(self, indices: np.ndarray, codes: np.ndarray, shape: tuple[int, ...]) -> str:
        """The rows of `codes` that `indices` name, stored packed (pack_codes) and looked up in the model's table
        for those codes (Gather: one row of the table per byte), as an int32 tensor of `shape`. Every node here
        makes a tensor of the weight's size, which onnxruntime's folding copies: there are as few as can be."""
        table = self.tables.get(codes)
        self.read.append(table)
        packed = self.constant(pack_codes(indices, len(codes)), "codes")
        rows = self.node("Gather", [table.name, self.cast(packed, TensorProto.INT32)])  # (bytes, per * width)
        count, per_byte = len(indices) * codes.shape[1], codes_per_byte(len(codes)) * codes.shape[1]
        if count % per_byte:
            flat = self.node("Reshape", [rows, self.shape((-1,))])
            rows = self.node("Slice", [flat, self.constant(np.array([0], np.int64), "start"),
                                       self.constant(np.array([count], np.int64), "end")])
            if len(shape) == 1:
                return rows
        return self.node("Reshape", [rows, self.shape(shape)])

    def table(self, codes: np.ndarray) -> str:
        """unpack_table(codes) as int32 (the indices the rebuild needs), computed by nodes from `codes` alone (a few
        bytes, where the table takes 256 rows): the digits of 0..255 in base len(codes), each looked up in `codes`."""
        count, per = len(codes), codes_per_byte(len(codes))
        scalar = lambda value, what: self.constant(np.array(value, np.int32), what)  # noqa: E731
        values = self.node("Range", [scalar(0, "start"), scalar(256, "limit"), scalar(1, "delta")])
        column = self.node("Reshape", [values, self.shape((256, 1))])
        powers = self.constant((count ** np.arange(per - 1, -1, -1)).astype(np.int32), "powers")
        digits = self.node("Mod", [self.node("Div", [column, powers]), scalar(count, "count")])  # (256, per)
        rows = self.node("Gather", [self.constant(codes, "codes"), digits])  # (256, per, width)
        return self.cast(self.node("Reshape", [rows, self.shape((256, -1))]), TensorProto.INT32)

    def encoding(self, storage: str) -> Encoding:
        return Encoding(storage, self.initializers, self.nodes, self.read)
