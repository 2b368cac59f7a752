"""The norms of a residual stream: LayerNormalization over the last axis, and its decomposed forms (LayerNorm as
ReduceMean / Sub / Pow / ReduceMean / Add / Sqrt / Div, RMSNorm without the mean), each with its scale and shift.

A norm is described by what slicing needs: the tensor it reads and the one it writes, gamma and beta over the last
axis, epsilon, whether it subtracts the mean, and the nodes that compute it (replaced by the sliced RMS norm)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..graph import GraphIndex, node_attr


@dataclass(frozen=True, eq=False)
class Norm:
    nodes: tuple[onnx.NodeProto, ...]
    input: str
    output: str
    gamma: np.ndarray  # (width,) float64
    beta: np.ndarray  # (width,) float64
    epsilon: float
    centers: bool  # LayerNorm subtracts the mean; RMSNorm does not

    @property
    def width(self) -> int:
        return len(self.gamma)


def find_norms(index: GraphIndex) -> list[Norm]:
    """Every norm over the last axis of the main graph, in graph order."""
    found, claimed = [], set()
    for node in index.model.graph.node:
        if id(node) in claimed:  # the variance of a decomposed LayerNorm is no RMSNorm of its own
            continue
        norm = layer_normalization(node, index) if node.op_type == "LayerNormalization" else None
        norm = norm or (decomposed(node, index) if node.op_type == "ReduceMean" else None)
        norm = norm or (tf_layer_norm(node, index) if node.op_type == "GlobalAveragePool" else None)
        if norm is not None:
            found.append(norm)
            claimed.update(id(n) for n in norm.nodes)
    return found


def layer_normalization(node: onnx.NodeProto, index: GraphIndex) -> Norm | None:
    """A LayerNormalization over the last axis alone whose mean / inv-std outputs are unused."""
    shape = index.shapes.get(node.input[0]) or ()
    if not shape or not isinstance(shape[-1], int) or int(node_attr(node, "axis", -1)) % len(shape) != len(shape) - 1:
        return None
    if any(name and index.consumers.get(name) for name in node.output[1:]) or node.output[0] in index.body_values:
        return None
    width = shape[-1]
    gamma = _vector(index, node.input[1], width)
    beta = _vector(index, node.input[2], width) if len(node.input) > 2 and node.input[2] else np.zeros(width)
    if gamma is None or beta is None:
        return None
    return Norm((node,), node.input[0], node.output[0], gamma, beta, float(node_attr(node, "epsilon", 1e-5)), True)


def decomposed(mean: onnx.NodeProto, index: GraphIndex) -> Norm | None:
    """LayerNorm spelled out from `mean` = ReduceMean(x) over the last axis: Sub(x, mean), a variance, then Add eps
    -> Sqrt -> Div(x - mean, .) and optional Mul gamma and Add beta; the variance as ReduceMean((x - mean)^2) (Pow 2
    or a Mul by itself) or as ReduceMean(x * x) - mean * mean (jax2onnx, clipped at 0 by a Max). An RMSNorm
    (`mean` reads Pow(x, 2) or x * x, and nothing is subtracted) otherwise."""
    squared = index.producer.get(mean.input[0])
    if squared is not None and _squares(squared, index):
        return _rms_norm(squared, mean, index)
    if not _last_axis_mean(mean, index):
        return None
    readers = _readers(index, mean.output[0])
    centred = next((n for n in readers if n.op_type == "Sub" and list(n.input) == [mean.input[0], mean.output[0]]),
                   None)
    if centred is None or mean.output[0] in index.graph_outputs:
        return None
    variance = (_squared_deviation(centred, index) if len(readers) == 1
                else _moments(mean, readers, index) if len(readers) == 2 else None)
    tail = _root_and_divide(variance[-1], centred.output[0], index) if variance else None
    if tail is None:
        return None
    return _with_affine((mean, centred, *variance, *tail[1]), centred.input[0], tail[0], index, True)


def _squared_deviation(centred: onnx.NodeProto, index: GraphIndex) -> tuple[onnx.NodeProto, ...] | None:
    """ReduceMean((x - mean)^2): the square and the mean of it, the centred values read by it and the Div only."""
    readers = _readers(index, centred.output[0])
    squared = next((n for n in readers if _squares(n, index)), None)
    variance = _only_reader(index, squared.output[0], "ReduceMean") if squared is not None else None
    if variance is None or len(readers) != 2 or not _last_axis_mean(variance, index):
        return None
    return squared, variance


def _moments(mean: onnx.NodeProto, readers: list[onnx.NodeProto], index: GraphIndex
             ) -> tuple[onnx.NodeProto, ...] | None:
    """ReduceMean(x * x) - mean * mean: the nodes from the squares to the Sub."""
    x = mean.input[0]
    mean_squared = next((n for n in readers if n.op_type == "Mul" and list(n.input) == [mean.output[0]] * 2), None)
    difference = _only_reader(index, mean_squared.output[0], "Sub") if mean_squared is not None else None
    second = index.producer.get(difference.input[0]) if difference is not None else None
    if second is None or second.op_type != "ReduceMean" or difference.input[1] != mean_squared.output[0]:
        return None
    squares = index.producer.get(second.input[0])
    if (squares is None or not _squares(squares, index) or squares.input[0] != x or not _last_axis_mean(second, index)
            or len(_readers(index, squares.output[0])) != 1 or len(_readers(index, second.output[0])) != 1):
        return None
    return squares, second, mean_squared, difference


def _rms_norm(squared: onnx.NodeProto, mean: onnx.NodeProto, index: GraphIndex) -> Norm | None:
    """x * x (or Pow(x, 2)) -> ReduceMean -> Add eps -> Sqrt -> Div(x, .), then optional Mul gamma."""
    x = squared.input[0]
    if len(_readers(index, squared.output[0])) != 1 or not _last_axis_mean(mean, index):
        return None
    tail = _root_and_divide(mean, x, index)
    if tail is None:
        return None
    return _with_affine((squared, mean, *tail[1]), x, tail[0], index, False)


def _root_and_divide(variance: onnx.NodeProto, numerator: str, index: GraphIndex
                     ) -> tuple[float, tuple[onnx.NodeProto, ...]] | None:
    """[Max(., 0)] -> Add eps -> Sqrt -> Div(numerator, .) after the variance: (epsilon, those nodes)."""
    clip = _only_reader(index, variance.output[0], "Max")
    clipped = clip is not None and _scalar(index, clip.input[1]) == 0.0 and clip.input[0] == variance.output[0]
    start = clip if clipped else variance
    add_eps = _only_reader(index, start.output[0], "Add")
    eps = _scalar(index, add_eps.input[1 - list(add_eps.input).index(start.output[0])]) if add_eps else None
    root = _only_reader(index, add_eps.output[0], "Sqrt") if eps is not None else None
    divide = _only_reader(index, root.output[0], "Div") if root is not None else None
    if divide is None or list(divide.input) != [numerator, root.output[0]]:
        return None
    return eps, ((clip,) if clipped else ()) + (add_eps, root, divide)


def _with_affine(nodes: tuple[onnx.NodeProto, ...], x: str, eps: float, index: GraphIndex,
                 centers: bool) -> Norm | None:
    """The norm with the Mul by gamma and Add of beta that follow its Div, where they do."""
    width = (index.shapes.get(x) or (None,))[-1]
    if not isinstance(width, int) or nodes[-1].output[0] in index.body_values:
        return None
    gamma, beta, nodes = np.ones(width), np.zeros(width), list(nodes)
    for op, kind in (("Mul", "gamma"), ("Add", "beta")):
        follower = _only_reader(index, nodes[-1].output[0], op)
        value = _operand(follower, nodes[-1].output[0], index, width) if follower is not None else None
        if value is None:
            break
        gamma, beta = (value, beta) if kind == "gamma" else (gamma, value)
        nodes.append(follower)
    return Norm(tuple(nodes), x, nodes[-1].output[0], gamma, beta, eps, centers) if _closed(nodes, index) else None


def _closed(nodes: list[onnx.NodeProto], index: GraphIndex) -> bool:
    """Nothing outside the norm's nodes reads a value inside it (the last node's output is the norm's)."""
    inside = {id(n) for n in nodes}
    return not any(o in index.graph_outputs or any(id(r) not in inside for r in index.consumers.get(o, []))
                   for n in nodes[:-1] for o in n.output)


def tf_layer_norm(mean: onnx.NodeProto, index: GraphIndex) -> Norm | None:
    """tf2onnx's LayerNorm of a (batch, sequence, width) tensor: the means by GlobalAveragePool, the variance of
    x - mean, then x * s + (beta - mean * s) with s = gamma / sqrt(variance + eps) (Reciprocal of a Sqrt)."""
    x, shape = mean.input[0], index.shapes.get(mean.input[0]) or ()
    readers = _readers(index, mean.output[0])
    negative = next((n for n in readers if n.op_type == "Neg"), None)
    centred = next((n for n in readers if n.op_type == "Sub" and list(n.input) == [x, mean.output[0]]), None)
    if len(shape) != 3 or not isinstance(shape[-1], int) or len(readers) != 2 or negative is None or centred is None:
        return None
    squared = _only_reader(index, centred.output[0], "Mul")
    variance = _only_reader(index, squared.output[0], "GlobalAveragePool") if squared is not None else None
    tail = _chain(index, variance, ("Add", "Sqrt", "Reciprocal", "Mul")) if variance is not None else None
    if tail is None or not _squares(squared, index):
        return None
    eps, gamma = _scalar(index, tail[0].input[1]), _operand(tail[3], tail[2].output[0], index, shape[-1])
    scaled = [n for n in _readers(index, tail[3].output[0]) if n.op_type == "Mul"]
    shifted = [_only_reader(index, n.output[0], "Add") for n in scaled]
    if eps is None or gamma is None or len(scaled) != 2 or None in shifted:
        return None
    by_mean = next((i for i, n in enumerate(scaled) if negative.output[0] in n.input), None)
    if by_mean is None or list(scaled[1 - by_mean].input).count(x) != 1 or shifted[1 - by_mean] is None:
        return None
    out = shifted[1 - by_mean]
    beta = _operand(shifted[by_mean], scaled[by_mean].output[0], index, shape[-1])
    if beta is None or _only_reader(index, shifted[by_mean].output[0], "Add") is not out:
        return None
    nodes = [mean, negative, centred, squared, variance, *tail, scaled[by_mean], shifted[by_mean],
             scaled[1 - by_mean], out]
    return Norm(tuple(nodes), x, out.output[0], gamma, beta, eps, True) if _closed(nodes, index) else None


def _chain(index: GraphIndex, start: onnx.NodeProto, ops: tuple[str, ...]) -> list[onnx.NodeProto] | None:
    """The nodes of `ops` after `start`, each the only reader of the one before; None where it differs."""
    found, node = [], start
    for op in ops:
        node = _only_reader(index, node.output[0], op)
        if node is None:
            return None
        found.append(node)
    return found


def _operand(node: onnx.NodeProto, tensor: str, index: GraphIndex, width: int) -> np.ndarray | None:
    """The constant other operand of a binary node reading `tensor`, as a (width,) vector."""
    others = [name for name in node.input if name != tensor]
    return _vector(index, others[0], width) if len(others) == 1 else None


def _vector(index: GraphIndex, name: str, width: int) -> np.ndarray | None:
    """A float constant that broadcasts over the last axis only (a scalar, or `width` values along it), as a
    (width,) float64 vector."""
    value = index.array(name) if name else None
    if value is None or value.dtype.kind != "f":
        return None
    if value.size == 1 or (value.size == width and value.shape[-1] == width):
        return np.broadcast_to(value.reshape(-1).astype(np.float64), (width,)).copy()
    return None


def _scalar(index: GraphIndex, name: str) -> float | None:
    value = index.array(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _squares(node: onnx.NodeProto, index: GraphIndex) -> bool:
    if node.op_type == "Mul":
        return len(node.input) == 2 and node.input[0] == node.input[1]
    return node.op_type == "Pow" and _scalar(index, node.input[1]) == 2.0


def _last_axis_mean(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """A ReduceMean over the last axis alone, keeping it (axes as an attribute, or as input 1 from opset 18)."""
    axes = node_attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = index.array(node.input[1])
        axes = None if value is None else value.reshape(-1).tolist()
    rank = len(index.shapes.get(node.input[0]) or ())
    return (axes is not None and len(axes) == 1 and rank > 0 and axes[0] % rank == rank - 1
            and int(node_attr(node, "keepdims", 1)) == 1)


def _only_reader(index: GraphIndex, tensor: str, op_type: str) -> onnx.NodeProto | None:
    """The single node reading `tensor`, where it is an `op_type` and the tensor is no graph output."""
    readers = _readers(index, tensor)
    if len(readers) != 1 or readers[0].op_type != op_type or tensor in index.graph_outputs:
        return None
    return readers[0]


def _readers(index: GraphIndex, tensor: str) -> list[onnx.NodeProto]:
    """The nodes reading `tensor`, each once (x * x reads it twice)."""
    return list({id(n): n for n in index.consumers.get(tensor, [])}.values())
