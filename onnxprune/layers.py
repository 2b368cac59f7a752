"""One description per weight-bearing op: Conv, ConvTranspose, Gemm, MatMul and Einsum whose weight (input 1) is a
constant.

Everything that depends on how such a layer stores its weight lives here, and only here: which weight axes hold its
output and input channels, its group count, Gemm's transposition, alpha and beta, where its bias is (an input, or the
Add right after a MatMul), its MACs, how its input activation is cut into rows for least squares (N-d im2col patches
for a convolution at sampled output positions, rows of the input for a matrix layer), and how a re-fitted
(features, outputs) matrix goes back into its weight and bias.

The common currency is the weight seen as *kernels*: (output channels, input channels, kernel positions...), the
layout of a Conv's weight; a matrix layer's kernels are (outputs, inputs). A layer's *rows* are its kernels
flattened to (features, outputs), features input-channel-major, the order in which its patches flatten.

An Einsum is a layer where its equation is matmul-like (einsum.py reads it): two operands, the weight second, weight
letters summed over (input channels) and letters only the weight brings to the output (output channels); the first
of each are the layout's channel axes, other weight letters (heads, "bhid,hdk->bhik"; Keras' "abc,cde->abde") are
kernel positions to it. Where it is a plain matrix product ("...j,jk->...k", "bij,kj->bik") it is a matrix
layer, re-fitted like MatMul. Any Einsum's MACs are counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .einsum import equation_of
from .graph import GraphIndex, node_attr
from .roles import Role

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ROWS_PER_POSITION = 16  # a matrix layer samples this many input rows where a convolution samples one position

ShapeOf = Callable[[str], Sequence[int]]


# ------------------------------------------------------------------------------------------------ MACs

def _conv_macs(node: onnx.NodeProto, shape: ShapeOf) -> int:
    weight = shape(node.input[1])  # (O, I/g, k...)
    return int(np.prod(shape(node.output[0]), dtype=np.int64) * np.prod(weight[1:], dtype=np.int64))


def _conv_transpose_macs(node: onnx.NodeProto, shape: ShapeOf) -> int:
    weight = shape(node.input[1])  # (I, O/g, k...)
    return int(np.prod(shape(node.input[0]), dtype=np.int64) * np.prod(weight[1:], dtype=np.int64))


def _gemm_macs(node: onnx.NodeProto, shape: ShapeOf) -> int:
    b = shape(node.input[1])  # the weight's shape is known even where a run-time reshape hides the input's
    return int(np.prod(shape(node.output[0]), dtype=np.int64) * b[weight_axes(node)[1]])


def _matmul_macs(node: onnx.NodeProto, shape: ShapeOf) -> int:
    b = shape(node.input[1])
    k = b[-2] if len(b) >= 2 else b[0]
    return int(np.prod(shape(node.output[0]), dtype=np.int64) * k)


def _einsum_macs(node: onnx.NodeProto, shape: ShapeOf) -> int:
    """One multiply-accumulate per combination of the equation's letters."""
    shapes = [shape(name) for name in node.input]
    equation = equation_of(node, [len(s) for s in shapes])
    if equation is None:
        raise TypeError("equation does not match the inputs")
    sizes: dict[str, int] = {}
    for term, dims in zip(equation.inputs, shapes):
        for letter, size in zip(term, dims):
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    return int(np.prod(list(sizes.values()), dtype=np.int64))


_MACS = {"Conv": _conv_macs, "ConvTranspose": _conv_transpose_macs, "Gemm": _gemm_macs, "MatMul": _matmul_macs,
         "Einsum": _einsum_macs}


def macs(node: onnx.NodeProto, shape: ShapeOf) -> int | None:
    """Multiply-accumulates of a Conv, ConvTranspose, Gemm or MatMul node (constant weight or not, an attention
    MatMul counts too) from the shapes `shape(name)` gives; None for any other op. Raises KeyError, TypeError or
    IndexError where `shape` does not know a size."""
    counter = _MACS.get(node.op_type)
    return None if counter is None else counter(node, shape)


def weight_axes(node: onnx.NodeProto) -> tuple[int, int]:
    """(output-channel axis, input-channel axis) of a layer's weight; a MatMul's count from the end."""
    if node.op_type == "ConvTranspose":
        return 1, 0  # (I, O/g, k...)
    if node.op_type == "Gemm":
        return (0, 1) if node_attr(node, "transB", 0) else (1, 0)
    if node.op_type == "MatMul":
        return -1, -2
    return 0, 1  # Conv: (O, I/g, k...)


# ------------------------------------------------------------------------------------------------ descriptions

@dataclass(frozen=True)
class BiasSite:
    """Where the bias of a layer's outputs lives: input `input` of node `node` (the layer itself, or the Add after a
    MatMul); the outputs get `scale` times it (Gemm's beta). A layer `create`s a missing bias as a new input; an
    Add's operand must already be there."""

    node: str
    input: int
    scale: float = 1.0
    create: bool = True


@dataclass(frozen=True)
class Sample:
    """A layer's inputs at sampled positions: `patches` (rows, C, kernel...) for a convolution, (rows, C) for a
    matrix layer; `where` picks the outputs those rows produce; `real` marks the real (not padded) positions."""

    patches: np.ndarray
    where: tuple | np.ndarray
    real: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class Layer:
    """A weight-bearing node. Descriptions hold no arrays: they apply to the node before and after pruning (node
    names, attributes and the meaning of every axis stay; only sizes change)."""

    node: onnx.NodeProto
    out_axis: int  # weight axis of the output channels
    in_axis: int  # weight axis of the input channels
    output_axis: int  # channel axis of the layer's output (MatMul: the last; others: 1)
    groups: int = 1
    alpha: float = 1.0  # the weight is used as alpha * W (Gemm)
    refittable: bool = False  # outputs are rows times kernels, so least squares can re-fit the weight
    bias: BiasSite | None = None
    quantized: bool = False  # the weight is integer data a DequantizeLinear turns into floats (a QDQ model)

    @property
    def weight(self) -> str:
        return self.node.input[1]

    def kernels(self, weight: np.ndarray) -> np.ndarray:
        """The weight as (output channels, input channels, kernel...): a view."""
        return np.moveaxis(weight, (self.out_axis, self.in_axis), (0, 1))

    def weight_rows(self, weight: np.ndarray) -> np.ndarray:
        """The weight as float64 (features, outputs) rows, alpha folded in."""
        kernels = self.kernels(weight)
        return kernels.reshape(len(kernels), -1).T.astype(np.float64) * self.alpha

    def rows_to_weight(self, rows: np.ndarray, like: np.ndarray) -> np.ndarray:
        """(features, outputs) rows back into a weight laid out as `like` and of its dtype (float16 and bfloat16
        included: the fit is float64, the model keeps its type); inverse of weight_rows."""
        kernels = (rows / self.alpha).T.reshape(self.kernels(like).shape)
        return np.moveaxis(kernels, (0, 1), (self.out_axis, self.in_axis)).astype(like.dtype)

    def mean_contribution(self, weight: np.ndarray, features: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """What input channels `features` with these `mean` values add to each output on average (a refittable
        layer's outputs are sums over channels, so this is exact for constant channels up to border effects)."""
        kernels = widened(self.kernels(weight)[:, features])
        return self.alpha * (kernels.reshape(len(kernels), len(features), -1).sum(2) @ mean)

    def sample(self, x: np.ndarray, rng: np.random.Generator, positions: int,
               real: np.ndarray | None = None) -> Sample:
        """The layer's input `x` as rows at up to `positions` sampled output positions per image."""
        raise TypeError(f"{self.node.op_type} '{self.node.name}' is not cut into rows")

    def output_rows(self, y: np.ndarray, sample: Sample) -> np.ndarray:
        """(rows, output channels): the layer's output `y` where `sample`'s rows produce it."""
        raise TypeError(f"{self.node.op_type} '{self.node.name}' is not cut into rows")

    def node_at(self, shapes: Sequence[Sequence[int]], inputs: list[str], output: str) -> onnx.NodeProto:
        """The node alone at other widths (`shapes`: its inputs' then its output's), inputs and output renamed: a
        grouped (de)convolution's group follows the widths (the weight's axis 1 holds one group's channels)."""
        attrs = {a.name: helper.get_attribute_value(a) for a in self.node.attribute}
        if self.groups != 1:
            side = shapes[0] if self.in_axis == 1 else shapes[-1]
            attrs["group"] = max(1, side[1] // shapes[1][1])
        return helper.make_node(self.node.op_type, inputs, [output], domain=self.node.domain, **attrs)


@dataclass(frozen=True, eq=False)
class MatrixLayer(Layer):
    """Gemm and MatMul: every row of the input (leading axes flattened) times the weight."""

    def sample(self, x: np.ndarray, rng: np.random.Generator, positions: int,
               real: np.ndarray | None = None) -> Sample:
        """Up to `positions * ROWS_PER_POSITION` input rows, padded positions left out."""
        rows = real_positions(x, real)
        rows = rows.reshape(-1, rows.shape[-1])
        limit = positions * ROWS_PER_POSITION
        pick = rng.choice(len(rows), limit, replace=False) if len(rows) > limit else np.arange(len(rows))
        return Sample(rows[pick], pick, real)

    def output_rows(self, y: np.ndarray, sample: Sample) -> np.ndarray:
        y = real_positions(y, sample.real)
        return y.reshape(-1, y.shape[-1])[sample.where]


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel, strides, dilations and pads (begins then ends, as the ONNX attribute) of an N-d convolution, with
    the ONNX defaults where the attributes are left out (the kernel is then the weight's)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    auto_pad: str = "NOTSET"

    @classmethod
    def of(cls, node: onnx.NodeProto, weight_kernel: Sequence[int]) -> "ConvGeometry":
        ones, zeros = (1,) * len(weight_kernel), (0,) * (2 * len(weight_kernel))
        auto_pad = node_attr(node, "auto_pad", b"NOTSET")
        return cls(_ints(node, "kernel_shape", weight_kernel), _ints(node, "strides", ones),
                   _ints(node, "dilations", ones), _ints(node, "pads", zeros),
                   auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad)

    def padding(self, spatial: Sequence[int]) -> tuple[list[int], list[int]]:
        """Pads before and after each spatial axis of an input of size `spatial`, auto_pad resolved."""
        rank = len(self.kernel)
        if self.auto_pad == "VALID":
            return [0] * rank, [0] * rank
        if self.auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
            return list(self.pads[:rank]), list(self.pads[rank:])
        totals = [max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
                  for n, s, k, d in zip(spatial, self.strides, self.kernel, self.dilations)]
        small = [t // 2 for t in totals]
        begins = small if self.auto_pad == "SAME_UPPER" else [t - b for t, b in zip(totals, small)]
        return begins, [t - b for t, b in zip(totals, begins)]

    def output_size(self, padded: Sequence[int]) -> list[int]:
        return [(p - d * (k - 1) - 1) // s + 1 for p, k, s, d in zip(padded, self.kernel, self.strides, self.dilations)]


def _ints(node: onnx.NodeProto, name: str, default: Sequence[int]) -> tuple[int, ...]:
    """An int-list attribute, or `default` where it is absent or empty."""
    return tuple(node_attr(node, name, None) or default)


@dataclass(frozen=True, eq=False)
class ConvLayer(Layer):
    """Conv with any number of spatial axes: each output position is a patch of the (padded) input times the
    kernels."""

    geometry: ConvGeometry | None = None

    def sample(self, x: np.ndarray, rng: np.random.Generator, positions: int,
               real: np.ndarray | None = None) -> Sample:
        """im2col patches (rows, C, kernel...) at up to `positions` random output positions per image."""
        begins, ends = self.geometry.padding(x.shape[2:])
        padded = np.pad(x, [(0, 0), (0, 0), *zip(begins, ends)])
        out = self.geometry.output_size(padded.shape[2:])
        count = min(positions, math.prod(out))
        flat = np.stack([rng.choice(math.prod(out), count, replace=False) for _ in range(len(x))]).reshape(-1)
        images = np.repeat(np.arange(len(x)), count)
        coords = np.unravel_index(flat, out)
        return Sample(padded[self._patch_index(images, x.shape[1], coords)], (images, slice(None), *coords))

    def _patch_index(self, images: np.ndarray, channels: int, coords: tuple[np.ndarray, ...]) -> tuple:
        """Index arrays that broadcast to (rows, C, kernel...) over the padded input."""
        rank = 2 + len(coords)
        index = [_along(images, 0, rank), _along(np.arange(channels), 1, rank)]
        for axis, (start, k, s, d) in enumerate(zip(coords, self.geometry.kernel, self.geometry.strides,
                                                    self.geometry.dilations), start=2):
            taps = start[:, None] * s + np.arange(k) * d  # (rows, k): input coordinates along this axis
            index.append(_along(taps, axis, rank, leading=True))
        return tuple(index)

    def output_rows(self, y: np.ndarray, sample: Sample) -> np.ndarray:
        return y[sample.where]


@dataclass(frozen=True, eq=False)
class TiledConvTranspose(Layer):
    """A ConvTranspose whose kernel equals its strides (no pads, dilations or output padding, one group), as a DB
    text detector's head upsamples: each input position writes its own k x k tile, so output position p reads
    input p // k through kernel tap p % k alone. A row is (C, kernel...) with the input's channels at that tap and
    zeros elsewhere: the rows and the weight's rows (weight_rows) are those of a convolution, so least squares
    re-fits it as it re-fits a Conv."""

    kernel: tuple[int, ...] = ()

    def sample(self, x: np.ndarray, rng: np.random.Generator, positions: int,
               real: np.ndarray | None = None) -> Sample:
        """Rows at up to `positions` random output positions per image."""
        out = [n * k for n, k in zip(x.shape[2:], self.kernel)]
        count = min(positions, math.prod(out))
        flat = np.stack([rng.choice(math.prod(out), count, replace=False) for _ in range(len(x))]).reshape(-1)
        images = np.repeat(np.arange(len(x)), count)
        coords = np.unravel_index(flat, out)
        rows, channels = np.arange(len(images))[:, None], np.arange(x.shape[1])[None, :]
        patches = np.zeros((len(images), x.shape[1], *self.kernel), x.dtype)
        taps = tuple((c % k)[:, None] for c, k in zip(coords, self.kernel))
        patches[(rows, channels, *taps)] = x[(images, slice(None), *(c // k for c, k in zip(coords, self.kernel)))]
        return Sample(patches, (images, slice(None), *coords))

    def output_rows(self, y: np.ndarray, sample: Sample) -> np.ndarray:
        return y[sample.where]


def _along(values: np.ndarray, axis: int, rank: int, leading: bool = False) -> np.ndarray:
    """`values` (and, with `leading`, their first axis kept first) reshaped to lie along `axis` of `rank` axes."""
    shape = [-1 if a == axis else 1 for a in range(rank)]
    if leading:
        shape[0], shape[axis] = len(values), values.shape[-1]
    return values.reshape(shape)


def is_layer(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """A Conv, ConvTranspose, Gemm or MatMul whose weight (input 1) is an initializer of the indexed model, or the
    dequantized integer initializer of a QDQ model (see dequantizer)."""
    return node.op_type in _DESCRIBE and len(node.input) > 1 and _stored_weight(node.input[1], index) is not None


def describe(node: onnx.NodeProto, index: GraphIndex) -> Layer | None:
    """The description of a layer (see is_layer); None for any other node."""
    if not is_layer(node, index):
        return None
    stored = _stored_weight(node.input[1], index)
    layer = _DESCRIBE[node.op_type](node, index, tuple(index.initializers[stored].dims))
    return replace(layer, quantized=True) if layer is not None and stored != node.input[1] else layer


def refittable(node: onnx.NodeProto, index: GraphIndex, quantized: bool = False) -> Layer | None:
    """The node's description where least squares can re-fit it (group 1, no transA, a 2-D MatMul weight); with
    `quantized`, a QDQ model's layer too (recovery re-quantizes its fit, see store_value), which readers of the
    index's arrays leave out."""
    layer = describe(node, index)
    if node.output[0] in index.body_values:  # inside a subgraph: onnxruntime cannot expose its output to fit
        return None
    return layer if layer is not None and layer.refittable and (quantized or not layer.quantized) else None


def _stored_weight(name: str, index: GraphIndex) -> str | None:
    """The initializer that holds a weight: the weight itself, or the integer data it is dequantized from."""
    if name in index.initializers:
        return name
    node = dequantizer(name, index)
    return None if node is None else node.input[0]


def _input_bias(node: onnx.NodeProto, scale: float = 1.0) -> BiasSite | None:
    return BiasSite(node.name, 2, scale) if scale else None  # beta 0: the bias is not used


def _conv(node: onnx.NodeProto, index: GraphIndex, dims: tuple[int, ...]) -> Layer:
    groups = int(node_attr(node, "group", 1))
    return ConvLayer(node, 0, 1, 1, groups, refittable=groups == 1, bias=_input_bias(node),
                     geometry=ConvGeometry.of(node, dims[2:]))


def _conv_transpose(node: onnx.NodeProto, index: GraphIndex, dims: tuple[int, ...]) -> Layer:
    groups, kernel = int(node_attr(node, "group", 1)), tuple(dims[2:])
    if groups == 1 and _tiles(node, kernel):
        return TiledConvTranspose(node, 1, 0, 1, groups, refittable=True, bias=_input_bias(node), kernel=kernel)
    return Layer(node, 1, 0, 1, groups, bias=_input_bias(node))


def _tiles(node: onnx.NodeProto, kernel: tuple[int, ...]) -> bool:
    """Whether a ConvTranspose writes one tile per input position: kernel == strides, nothing padded or dilated, the
    output's size not set by hand."""
    geometry, padding = ConvGeometry.of(node, kernel), _ints(node, "output_padding", (0,))
    return (geometry.kernel == kernel == geometry.strides and not any(geometry.pads) and not any(padding)
            and set(geometry.dilations) == {1} and geometry.auto_pad == "NOTSET"
            and node_attr(node, "output_shape", None) is None)


def _gemm(node: onnx.NodeProto, index: GraphIndex, dims: tuple[int, ...]) -> Layer:
    out_axis, in_axis = weight_axes(node)
    return MatrixLayer(node, out_axis, in_axis, 1, alpha=float(node_attr(node, "alpha", 1.0)),
                       refittable=not node_attr(node, "transA", 0),
                       bias=_input_bias(node, float(node_attr(node, "beta", 1.0))))


def _matmul(node: onnx.NodeProto, index: GraphIndex, dims: tuple[int, ...]) -> Layer:
    rank = len(index.shapes.get(node.output[0]) or ())
    return MatrixLayer(node, -1, -2, rank - 1, refittable=len(dims) == 2, bias=_bias_add(node, index))


def _bias_add(node: onnx.NodeProto, index: GraphIndex) -> BiasSite | None:
    """The Add right after a MatMul, its only reader, holds its bias in its other operand."""
    output = node.output[0]
    readers = {id(n): n for n in index.consumers.get(output, [])}
    if len(readers) != 1:
        return None
    add = next(iter(readers.values()))
    if add.op_type != "Add":
        return None
    return BiasSite(add.name, 1 - list(add.input).index(output), create=False)


def _einsum(node: onnx.NodeProto, index: GraphIndex, dims: tuple[int, ...]) -> Layer | None:
    """A matmul-like Einsum (see the module docstring); None for any other equation."""
    equation = equation_of(node, [len(index.shapes.get(name) or ()) for name in node.input])
    if equation is None or len(equation.inputs) != 2:
        return None
    contracted, produced = equation.weight_letters(1)
    if not contracted or not produced:
        return None
    data, weight, out = *equation.inputs, equation.output
    axes = weight.index(produced[0]), weight.index(contracted[0])
    if len(weight) == 2 and data[-1] == contracted[0] and out == data[:-1] + produced[0]:
        return MatrixLayer(node, *axes, len(out) - 1, refittable=True, bias=_bias_add(node, index))
    return Layer(node, *axes, out.index(produced[0]))


_DESCRIBE = {"Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul, "Einsum": _einsum}


# ------------------------------------------------------------------------------------------------ quantized weights

def dequantizer(name: str, index: GraphIndex) -> onnx.NodeProto | None:
    """The DequantizeLinear that makes tensor `name` out of constants only (integer data, scale, zero point: a QDQ
    model's weight or bias), or None. Blocked quantization is left out (its rule freezes it)."""
    node = index.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    if node_attr(node, "block_size", 0) or not all(i in index.initializers for i in node.input if i):
        return None
    return node


def dequantized(node: onnx.NodeProto, index: GraphIndex) -> np.ndarray:
    """The float64 value of a DequantizeLinear of constants: (data - zero point) * scale, per tensor or per axis."""
    return _dequantize(node, *[index.array(i) if i else None for i in node.input])


def _along_quantized_axis(values: np.ndarray, node: onnx.NodeProto, rank: int) -> np.ndarray:
    """A scale or zero point shaped to broadcast over the data: a scalar, or a vector along the node's axis."""
    values = np.asarray(values).astype(np.float64)
    if values.size == 1:
        return values.reshape(())
    shape = [1] * rank
    shape[int(node_attr(node, "axis", 1)) % rank] = -1
    return values.reshape(shape)


def _dequantizing(name: str, node: onnx.NodeProto, index: GraphIndex) -> bool:
    """`node` is a DequantizeLinear of constants whose data is `name`."""
    return node.input[0] == name and bool(node.output) and dequantizer(node.output[0], index) is node


def constant_values(name: str, index: GraphIndex) -> np.ndarray | None:
    """A constant as the layers that read it see it: a QDQ model's integer weight (or the DequantizeLinear's output
    made of it) dequantized (float64), any other constant as stored; None for a tensor computed at run time."""
    node = dequantizer(name, index) or next(
        (n for n in index.consumers.get(name, []) if _dequantizing(name, n, index)), None)
    return index.array(name) if node is None else dequantized(node, index)


def stored_zero(name: str, index: GraphIndex) -> np.ndarray:
    """The stored values that mean 0 in constant `name`, as an array of its shape and type: the zero point where a
    DequantizeLinear reads it (a removed channel of a QDQ weight is its zero point), 0 elsewhere."""
    array = index.array(name)
    node = next((n for n in index.consumers.get(name, []) if _dequantizing(name, n, index)), None)
    if node is None or len(node.input) < 3 or not node.input[2]:
        return np.zeros(array.shape, array.dtype)
    zero_point = _along_quantized_axis(index.array(node.input[2]), node, array.ndim)
    return np.broadcast_to(zero_point, array.shape).astype(array.dtype)


def weight_readers(name: str, index: GraphIndex) -> list[onnx.NodeProto]:
    """The nodes that read a constant; for integer data a DequantizeLinear turns into a weight, the nodes that read
    the dequantized weight."""
    found = []
    for node in index.consumers.get(name, []):
        found += index.consumers.get(node.output[0], []) if _dequantizing(name, node, index) else [node]
    return found


def weight_roles(name: str, index: GraphIndex) -> dict[int, Role]:
    """The roles the layers reading tensor `name` (a dequantized weight or bias) give its axes, by axis: the
    DequantizeLinear rule passes them on to the integer data, which is what criteria and the exactness harness read
    and what surgery slices."""
    roles: dict[int, Role] = {}
    rank = len(index.shapes.get(name) or ())
    for node in index.consumers.get(name, []):
        layer = describe(node, index)
        if layer is not None and node.input[1] == name and rank:
            roles[layer.out_axis % rank] = Role.W_OUT
            if layer.groups == 1:
                roles[layer.in_axis % rank] = Role.W_IN
        if rank and any(_is_bias_of(layer_node, node, name, index) for layer_node in _layers_before(node, index)):
            roles[rank - 1] = Role.BIAS
    return roles


def _layers_before(node: onnx.NodeProto, index: GraphIndex) -> list[onnx.NodeProto]:
    """The node itself and the nodes producing its inputs: where a bias that `node` reads may belong."""
    return [node] + [index.producer[i] for i in node.input if i in index.producer]


def _is_bias_of(layer_node: onnx.NodeProto, reader: onnx.NodeProto, name: str, index: GraphIndex) -> bool:
    """`reader` reads `name` where `layer_node`'s description keeps its bias."""
    layer = describe(layer_node, index)
    site = layer.bias if layer is not None else None
    return (site is not None and site.node == reader.name and site.input < len(reader.input)
            and reader.input[site.input] == name)


# ------------------------------------------------------------------------------------------------ stored values

def stored_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value a node of `model` computes with when it reads `name` (see StoredTensors.stored_value)."""
    return StoredTensors(model).stored_value(name)


def as_stored(model: onnx.ModelProto, name: str, value: np.ndarray) -> np.ndarray:
    """`value` as store_value would leave it (see StoredTensors.as_stored)."""
    return StoredTensors(model).as_stored(name, value)


def store_value(model: onnx.ModelProto, name: str, value: np.ndarray) -> bool:
    """Write `value` where stored_value reads it (see StoredTensors.store_value)."""
    return StoredTensors(model).store_value(name, value)


class StoredTensors:
    """Reads and writes of the values a model's layers compute with (weights and biases, float or QDQ), for a model
    changed one layer after another: the lookups (initializers and nodes by name, DequantizeLinear nodes by output,
    how many node inputs read each name) are built once and kept up to date by the writes made here, so re-fitting
    N layers costs O(N), not O(N^2). A model changed elsewhere needs a new instance."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.nodes = {n.name: n for n in model.graph.node}
        self.dequantizers = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output}
        self.readers: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self.readers[name] = self.readers.get(name, 0) + 1

    def stored_value(self, name: str) -> np.ndarray | None:
        """The value a node computes with when it reads `name`: an initializer as stored, the output of a
        DequantizeLinear of initializers (a QDQ weight or bias) dequantized (float32); None for anything else."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        found = self._dequantizer(name)
        return None if found is None else _dequantize(found, *self._arrays(found)).astype(np.float32)

    def as_stored(self, name: str, value: np.ndarray) -> np.ndarray:
        """`value` as store_value would leave it: in the initializer's type, or re-quantized with the
        DequantizeLinear's scale and zero point (rounded half to even, clipped to the integer type's range) and
        dequantized again."""
        found = self._dequantizer(name)
        if found is None:
            return value.astype(numpy_helper.to_array(self.inits[name]).dtype) if name in self.inits else value
        arrays = self._arrays(found)
        return _dequantize(found, _quantize(found, value, *arrays), *arrays[1:]).astype(np.float32)

    def store_value(self, name: str, value: np.ndarray) -> bool:
        """Write `value` where stored_value reads it (see as_stored); False, and nothing written, where the integer
        data is shared with other nodes or `name` is neither."""
        found = self._dequantizer(name)
        target = found.input[0] if found is not None else name
        if target not in self.inits or (found is not None and self.readers.get(target, 0) > 1):
            return False
        stored = _quantize(found, value, *self._arrays(found)) if found is not None else self.as_stored(name, value)
        self.inits[target].CopyFrom(numpy_helper.from_array(stored, target))
        return True

    def _dequantizer(self, name: str) -> onnx.NodeProto | None:
        """The DequantizeLinear that makes `name` from initializers only (see dequantizer)."""
        node = self.dequantizers.get(name)
        if node is None or node_attr(node, "block_size", 0) or not all(i in self.inits for i in node.input if i):
            return None
        return node

    def _arrays(self, node: onnx.NodeProto) -> list[np.ndarray | None]:
        return [numpy_helper.to_array(self.inits[i]) if i else None for i in node.input]

    def weight_dtype(self, layer: Layer) -> np.dtype:
        """The numpy dtype of the layer's weight: what a bias created for it is stored as."""
        init = self.inits.get(layer.weight)
        return np.dtype(np.float32) if init is None else np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))

    def current_bias(self, layer: Layer, outputs: int) -> np.ndarray | None:
        """The bias the layer's `outputs` outputs get now (scale applied, float64); zeros where the layer could
        take one but has none; None where there is no place for one (a MatMul without an Add after it, a bias
        computed at run time or not per output)."""
        site = layer.bias
        if site is None:
            return None
        _, name = self._bias_input(site)
        stored = self.stored_value(name) if name else None
        if stored is not None:
            bias = stored.astype(np.float64).reshape(-1) * site.scale
            return bias if bias.shape == (outputs,) else None
        return np.zeros(outputs) if site.create and not name else None

    def bias_in_output(self, layer: Layer, outputs: int) -> np.ndarray | None:
        """The bias least squares fits from and whose change goes to the bias: the current one where the layer's
        own output (the fit's target) carries it (a Conv's or Gemm's input); zeros where an Add after the layer
        adds it (a MatMul), as its output is without it and the fit is then an offset added to that bias; None where
        there is no place for one."""
        bias = self.current_bias(layer, outputs)
        return bias if bias is None or layer.bias.node == layer.node.name else np.zeros(outputs)

    def add_to_bias(self, layer: Layer, delta: np.ndarray) -> int:
        """Add `delta` to what the layer's outputs get as bias: 1 when done, 0 where there is no place for it. A
        bias shared with other nodes is copied first; a Conv or Gemm without one gets one."""
        site = layer.bias
        if site is None:
            return 0
        node, name = self._bias_input(site)
        if name:
            if name not in self.inits and self.stored_value(name) is not None:  # a QDQ bias: re-quantized in place
                return self._update_quantized_bias(name, delta / site.scale)
            return self._update_bias(node, site.input, self.inits.get(name), delta / site.scale)
        if not site.create or layer.quantized:  # a float bias beside integer weights would cost the int8 kernel
            return 0
        bias = numpy_helper.from_array((delta / site.scale).astype(self.weight_dtype(layer)),
                                       f"{node.name}_recovered_bias")
        while len(node.input) <= site.input:
            node.input.append("")
        self._read_instead(node, site.input, bias)
        return 1

    def _update_bias(self, node: onnx.NodeProto, position: int, init: onnx.TensorProto | None,
                     delta: np.ndarray) -> int:
        if init is None:
            return 0  # a bias computed at run time
        bias = numpy_helper.to_array(init)
        if bias.shape[-1:] != delta.shape:
            return 0
        shared = self.readers.get(init.name, 0) != 1
        new_name = f"{init.name}_recovered_{node.name}" if shared else init.name
        updated = numpy_helper.from_array((widened(bias) + delta).astype(bias.dtype), new_name)
        if shared:
            self._read_instead(node, position, updated)
        else:
            init.CopyFrom(updated)
        return 1

    def _read_instead(self, node: onnx.NodeProto, position: int, tensor: onnx.TensorProto) -> None:
        """Add `tensor` as an initializer and make the node's input `position` read it."""
        self.model.graph.initializer.append(tensor)
        self.inits[tensor.name] = self.model.graph.initializer[-1]
        old = node.input[position]
        if old:
            self.readers[old] -= 1
        node.input[position] = tensor.name
        self.readers[tensor.name] = self.readers.get(tensor.name, 0) + 1

    def _update_quantized_bias(self, name: str, delta: np.ndarray) -> int:
        bias = self.stored_value(name)
        if bias.shape[-1:] != delta.shape:
            return 0
        return int(self.store_value(name, bias + delta))

    def _bias_input(self, site: BiasSite) -> tuple[onnx.NodeProto, str]:
        """The node holding the bias, and the bias tensor's name ("" where the input is left out)."""
        node = self.nodes[site.node]
        return node, node.input[site.input] if site.input < len(node.input) else ""


def _dequantize(node: onnx.NodeProto, data: np.ndarray, scale: np.ndarray,
                zero_point: np.ndarray | None = None) -> np.ndarray:
    shift = 0.0 if zero_point is None else _along_quantized_axis(zero_point, node, data.ndim)
    return (data.astype(np.float64) - shift) * _along_quantized_axis(scale, node, data.ndim)


def _quantize(node: onnx.NodeProto, value: np.ndarray, data: np.ndarray, scale: np.ndarray,
              zero_point: np.ndarray | None = None) -> np.ndarray:
    """`value` as integer data of `data`'s type: QuantizeLinear with the node's scale and zero point."""
    shift = 0.0 if zero_point is None else _along_quantized_axis(zero_point, node, data.ndim)
    steps = value.astype(np.float64) / _along_quantized_axis(scale, node, data.ndim)
    if data.dtype.kind not in "iu":  # float8: the cast rounds and saturates
        return (steps + shift).astype(data.dtype)
    steps = np.round(steps) + shift
    limits = np.iinfo(data.dtype)
    return np.clip(steps, limits.min, limits.max).astype(data.dtype)


# ------------------------------------------------------------------------------------------------ dtypes

def widened(array: np.ndarray) -> np.ndarray:
    """A float16 or bfloat16 array as float32, which numpy sums without losing the small terms; other arrays (float32
    and float64 included) unchanged."""
    return array.astype(np.float32) if array.dtype == np.float16 or array.dtype.name == "bfloat16" else array


# ------------------------------------------------------------------------------------------------ bias

def current_bias(model: onnx.ModelProto, layer: Layer, outputs: int) -> np.ndarray | None:
    """The bias the layer's `outputs` outputs get now in `model` (see StoredTensors.current_bias)."""
    return StoredTensors(model).current_bias(layer, outputs)


def add_to_bias(model: onnx.ModelProto, layer: Layer, delta: np.ndarray) -> int:
    """Add `delta` to what the layer's outputs get as bias in `model` (see StoredTensors.add_to_bias)."""
    return StoredTensors(model).add_to_bias(layer, delta)


# ------------------------------------------------------------------------------------------------ positions

def real_positions(value: np.ndarray, real: np.ndarray | None) -> np.ndarray:
    """`value` of shape (batch, sequence, ...) with its padded positions left out: (positions, ...). Other values
    come back unchanged."""
    if real is None or value.ndim < 3 or value.shape[:2] != real.shape:
        return value
    return value[real]
