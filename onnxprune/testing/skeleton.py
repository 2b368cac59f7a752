"""Weight-free "graph skeletons" of ONNX models.

A skeleton is an ONNX model whose large floating-point tensors have been
dropped: every float initializer (and every ``Constant`` node holding a float
tensor) with at least ``min_elements`` elements is removed and replaced by a
shape/dtype record in ``model.metadata_props["onnxprune.skeleton"]``, a compact
JSON object ``{name: [onnx_dtype_int, [dims...]]}``. Small tensors (shape
constants, integer tensors, tiny floats) and float tensors with at most 16
distinct values (masks, fills) stay as real data, so the graph topology and
every non-weight value is exact.

Why: the test zoo of real exported models lives in git as KBs instead of
hundreds of MB, and tests need no torch. ``materialize`` turns a skeleton back
into a runnable model with seeded random weights, each tensor drawn from a
generator seeded by (seed, crc32(name)) so values do not depend on initializer
order: Kaiming-normal for Conv/ConvTranspose/Gemm/MatMul weights (fan-in from
the op and layout), well-conditioned BatchNorm/LayerNorm parameters (positive
variances), N(0, 0.02) elsewhere. The weight closing a residual branch (last
weight op before an Add whose other operand is computed) gets its Kaiming std
halved (``residual_gain``); otherwise the variance about doubles per block
(efficientnet_v2_s outputs ~1e6 instead of ~1e2). Random weights are right for
structure and exactness tests (pruned vs. reference outputs), not for accuracy.

Note: a skeleton is not runnable (and ``onnx.checker`` reports the missing
initializers as undefined inputs); call ``materialize`` first. Large float
``Constant`` nodes come back as initializers, not as ``Constant`` nodes.
Only the main graph is stripped; tensors inside subgraphs are kept.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

__all__ = [
    "METADATA_KEY",
    "strip_weights",
    "is_skeleton",
    "skeleton_records",
    "materialize",
    "load_materialized",
]

METADATA_KEY = "onnxprune.skeleton"
# Kaiming std multiplier for weights closing a residual branch (see materialize).
RESIDUAL_GAIN = 0.5

_FLOAT_TYPES = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64,
    TensorProto.BFLOAT16: None,  # generated as float32, stored as bfloat16 bits
}
_DEFAULT_DOMAINS = ("", "ai.onnx")

# Ops through which a weight flows unchanged in value distribution when looking
# for the op that really consumes it (e.g. a weight transposed before MatMul).
_PASSTHROUGH = {"Identity", "Cast", "Transpose"}
_PASSTHROUGH_DEPTH = 8

# Single-consumer ops a residual branch may pass through between its last
# weight op and the residual Add (with a constant other operand where binary).
_BRANCH_TAIL = {"BatchNormalization", "Identity", "Dropout", "Reshape", "Transpose",
                "Squeeze", "Unsqueeze", "Flatten"}
_BRANCH_TAIL_BINARY = {"Add", "Sub", "Mul", "Div"}

Records = dict[str, tuple[int, list[int]]]
Consumers = dict[str, list[tuple[onnx.NodeProto, int]]]
Kind = Literal["he", "bn_scale", "bn_bias", "bn_mean", "bn_var", "ln_scale", "ln_bias", "small"]
# (kind, fan_in, weight node): the weight node is the Conv/Gemm/MatMul consuming an "he" tensor.
Role = tuple[Kind, float, onnx.NodeProto | None]
_SMALL: Role = ("small", 0, None)
_BN_KINDS: dict[int, Kind] = {1: "bn_scale", 2: "bn_bias", 3: "bn_mean", 4: "bn_var"}
_LN_KINDS: dict[int, Kind] = {1: "ln_scale", 2: "ln_bias"}
_NORMS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization")


# --------------------------------------------------------------------------- #
# records
# --------------------------------------------------------------------------- #
def _numel(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """An attribute's Python value, or ``default`` (kept local: this module needs only onnx and numpy)."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def skeleton_records(model: onnx.ModelProto) -> Records:
    """Return ``{name: (onnx_dtype, dims)}`` recorded in a skeleton ({} if none)."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            raw = json.loads(prop.value)
            return {k: (int(v[0]), [int(d) for d in v[1]]) for k, v in raw.items()}
    return {}


def is_skeleton(model: onnx.ModelProto) -> bool:
    """True if ``model`` carries skeleton records (i.e. needs ``materialize``)."""
    return any(p.key == METADATA_KEY for p in model.metadata_props)


def _set_records(model: onnx.ModelProto, records: Records) -> None:
    keep = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    if records:
        value = json.dumps(
            {k: [int(v[0]), [int(d) for d in v[1]]] for k, v in records.items()},
            separators=(",", ":"),
        )
        model.metadata_props.add(key=METADATA_KEY, value=value)


def _record(t: TensorProto) -> tuple[int, list[int]]:
    return int(t.data_type), [int(d) for d in t.dims]


# --------------------------------------------------------------------------- #
# strip
# --------------------------------------------------------------------------- #
def _few_distinct(t: TensorProto, max_distinct: int) -> bool:
    """True if the tensor's values take at most ``max_distinct`` distinct values
    (masks, index-like or fill constants folded by the exporter, e.g. Swin's
    shifted-window mask)."""
    if max_distinct <= 0 or t.data_location == TensorProto.EXTERNAL:
        return False
    try:
        arr = numpy_helper.to_array(t).ravel()
    except Exception:  # noqa: BLE001 - unreadable data: treat as a weight
        return False
    if np.unique(arr[:4096]).size > max_distinct:
        return False
    return np.unique(arr).size <= max_distinct


def _weight_test(min_elements: int, max_distinct: int) -> Callable[[TensorProto], bool]:
    """The test a tensor passes to be stripped: float, large, and not mask-like."""
    def is_weight(t: TensorProto) -> bool:
        return (t.data_type in _FLOAT_TYPES and _numel(t.dims) >= min_elements
                and not _few_distinct(t, max_distinct))
    return is_weight


def _constant_value(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor a one-output ``Constant`` node of the default domain holds in ``value``, else None."""
    if node.op_type != "Constant" or node.domain not in _DEFAULT_DOMAINS or len(node.output) != 1:
        return None
    attr = next((a for a in node.attribute if a.name == "value"), None)
    return attr.t if attr is not None and attr.type == onnx.AttributeProto.TENSOR else None


def _strip_initializers(graph: onnx.GraphProto, is_weight: Callable[[TensorProto], bool],
                        records: Records) -> None:
    kept = []
    for init in graph.initializer:
        if is_weight(init):
            records[init.name] = _record(init)
        else:
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _strip_constant_nodes(graph: onnx.GraphProto, is_weight: Callable[[TensorProto], bool],
                          records: Records) -> None:
    kept = []
    for node in graph.node:
        value = _constant_value(node)
        if value is not None and is_weight(value):
            records[node.output[0]] = _record(value)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def strip_weights(model: onnx.ModelProto, min_elements: int = 64, max_distinct: int = 16) -> onnx.ModelProto:
    """Return a copy of ``model`` with large float tensors replaced by records.

    Every float initializer of the main graph with ``>= min_elements`` elements
    is removed from ``graph.initializer``; every ``Constant`` node whose
    ``value`` is such a tensor is removed. Both are recorded (name, dtype, dims)
    under ``metadata_props["onnxprune.skeleton"]``. Float tensors whose values
    take at most ``max_distinct`` distinct values (masks, fills, index-like
    constants, never real weights) are kept as data so they stay exact; 0
    disables that. Stripping a skeleton again merges the records. The input is
    not modified.
    """
    out = _copy(model)
    records = dict(skeleton_records(out))
    is_weight = _weight_test(min_elements, max_distinct)
    _strip_initializers(out.graph, is_weight, records)
    _strip_constant_nodes(out.graph, is_weight, records)
    _set_records(out, records)
    return out


# --------------------------------------------------------------------------- #
# materialize: what a tensor is for
# --------------------------------------------------------------------------- #
def _iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _iter_nodes(sub)


def _consumers(graph: onnx.GraphProto) -> Consumers:
    """Every tensor name -> the (node, input index) pairs reading it, subgraphs included."""
    consumers: Consumers = {}
    for node in _iter_nodes(graph):
        for i, inp in enumerate(node.input):
            if inp:
                consumers.setdefault(inp, []).append((node, i))
    return consumers


def _constant_names(graph: onnx.GraphProto, records: Records) -> set[str]:
    names = {t.name for t in graph.initializer} | set(records)
    return names | {n.output[0] for n in graph.node if n.op_type == "Constant" and n.output}


def _conv_fan_in(node: onnx.NodeProto, idx: int, dims: list[int]) -> float | None:
    if idx != 1 or len(dims) < 2:
        return None
    return dims[1] * _numel(dims[2:])


def _conv_transpose_fan_in(node: onnx.NodeProto, idx: int, dims: list[int]) -> float | None:
    if idx != 1 or len(dims) < 2:
        return None
    group = int(_attr(node, "group", 1) or 1)
    strides = _attr(node, "strides", None) or [1] * (len(dims) - 2)
    fan = (dims[0] / max(group, 1)) * _numel(dims[2:]) / max(_numel(strides), 1)
    return max(fan, 1.0)


def _gemm_fan_in(node: onnx.NodeProto, idx: int, dims: list[int]) -> float | None:
    if idx not in (0, 1) or len(dims) != 2:
        return None
    if idx == 1:
        return dims[1] if _attr(node, "transB", 0) else dims[0]
    return dims[0] if _attr(node, "transA", 0) else dims[1]


def _matmul_fan_in(node: onnx.NodeProto, idx: int, dims: list[int]) -> float | None:
    if idx not in (0, 1) or len(dims) < 1:
        return None
    if len(dims) == 1:
        return dims[0]
    return dims[-2] if idx == 1 else dims[-1]


_FAN_IN: dict[str, Callable[[onnx.NodeProto, int, list[int]], float | None]] = {
    "Conv": _conv_fan_in,
    "ConvInteger": _conv_fan_in,
    "ConvTranspose": _conv_transpose_fan_in,
    "Gemm": _gemm_fan_in,
    "MatMul": _matmul_fan_in,
}


def _norm_kind(node: onnx.NodeProto, idx: int) -> Kind | None:
    """The parameter a norm op reads at input ``idx`` (scale, bias, mean, variance), else None."""
    if node.op_type == "BatchNormalization":
        return _BN_KINDS.get(idx)
    return _LN_KINDS.get(idx) if node.op_type in _NORMS else None


def _dims_after(node: onnx.NodeProto, dims: list[int]) -> list[int]:
    """A pass-through op's output dims: a Transpose permutes them, Identity and Cast keep them."""
    if node.op_type != "Transpose":
        return list(dims)
    perm = _attr(node, "perm", None) or list(reversed(range(len(dims))))
    return [dims[p] for p in perm]


def _role_at(node: onnx.NodeProto, idx: int, dims: list[int], consumers: Consumers, depth: int) -> Role | None:
    """The role a tensor plays as input ``idx`` of ``node``; None where this use says nothing."""
    fan_rule = _FAN_IN.get(node.op_type)
    fan_in = fan_rule(node, idx, dims) if fan_rule else None
    if fan_in is not None:
        return "he", fan_in, node
    norm = _norm_kind(node, idx)
    if norm is not None:
        return norm, 0, None
    if node.op_type in _PASSTHROUGH and idx == 0 and depth < _PASSTHROUGH_DEPTH:
        found = _role(node.output[0], _dims_after(node, dims), consumers, depth + 1)
        return None if found[0] == "small" else found
    return None


def _role(name: str, dims: list[int], consumers: Consumers, depth: int = 0) -> Role:
    """Classify a tensor by its first meaningful consumer (looking through Identity, Cast, Transpose)."""
    for node, idx in consumers.get(name, []):
        if node.domain in _DEFAULT_DOMAINS:
            found = _role_at(node, idx, dims, consumers, depth)
            if found is not None:
                return found
    return _SMALL


def _branch_step(node: onnx.NodeProto, idx: int, constants: set[str]) -> Literal["residual", "through", "end"]:
    """What ``node``, reading a branch at input ``idx``, does to it: closes it into a residual Add (the other
    operand is computed), passes it on (a bias add, a norm, a reshape, arithmetic with constants), or ends it."""
    if node.domain not in _DEFAULT_DOMAINS or not node.output:
        return "end"
    others = [x for j, x in enumerate(node.input) if j != idx and x]
    constant_others = all(o in constants for o in others)
    if node.op_type in ("Add", "Sum"):
        return "through" if others and constant_others else "residual"
    if node.op_type in _BRANCH_TAIL or (node.op_type in _BRANCH_TAIL_BINARY and constant_others):
        return "through"
    return "end"


def _feeds_residual(node: onnx.NodeProto, consumers: Consumers, constants: set[str], hops: int = 8) -> bool:
    """True if ``node``'s output reaches, through a chain of single-consumer
    linear ops, one operand of an Add/Sum whose other operand is computed (a
    residual connection)."""
    if not node.output:
        return False
    out = node.output[0]
    for _ in range(hops):
        readers = consumers.get(out, [])
        if len(readers) != 1:
            return False
        reader, idx = readers[0]
        step = _branch_step(reader, idx, constants)
        if step != "through":
            return step == "residual"
        out = reader.output[0]
    return False


# --------------------------------------------------------------------------- #
# materialize: values
# --------------------------------------------------------------------------- #
def _tensor_seed(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8"))])


def _sample(kind: Kind, fan_in: float, dims: list[int], rng: np.random.Generator,
            gain: float = 1.0) -> np.ndarray:
    shape = tuple(int(d) for d in dims)
    if kind == "he":
        return rng.normal(0.0, gain * math.sqrt(2.0 / max(float(fan_in), 1.0)), shape)
    if kind in ("bn_scale", "bn_var", "ln_scale"):
        return rng.uniform(0.5, 1.5, shape)
    if kind in ("bn_bias", "bn_mean"):
        return rng.normal(0.0, 0.1, shape)
    return rng.normal(0.0, 0.02, shape)  # ln_bias and small


def _to_bfloat16(name: str, values: np.ndarray) -> TensorProto:
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # round-to-nearest-even to the upper 16 bits
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    tensor = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=list(values.shape))
    tensor.raw_data = rounded.tobytes()
    return tensor


def _to_tensor(name: str, values: np.ndarray, dtype: int) -> TensorProto:
    if dtype == TensorProto.BFLOAT16:
        return _to_bfloat16(name, values)
    return numpy_helper.from_array(np.asarray(values, dtype=_FLOAT_TYPES[dtype]), name=name)


def materialize(model: onnx.ModelProto, seed: int = 0, residual_gain: float = RESIDUAL_GAIN) -> onnx.ModelProto:
    """Return a runnable copy of a skeleton with seeded random weights.

    Every recorded tensor becomes an initializer (appended to
    ``graph.initializer``) with values drawn from a generator seeded by
    ``(seed, crc32(name))`` -- deterministic and independent of initializer
    order. The distribution depends on how the tensor is consumed (see module
    docstring); weights of the last op of a residual branch get their
    Kaiming std multiplied by ``residual_gain`` (1.0 disables that). The
    metadata record is removed. Non-skeletons are returned as a plain copy.
    """
    out = _copy(model)
    records = skeleton_records(out)
    if not records:
        return out
    consumers = _consumers(out.graph)
    constants = _constant_names(out.graph, records)
    for name, (dtype, dims) in records.items():
        kind, fan_in, weight_node = _role(name, dims, consumers)
        closes_branch = weight_node is not None and residual_gain != 1.0 \
            and _feeds_residual(weight_node, consumers, constants)
        values = _sample(kind, fan_in, dims, _tensor_seed(seed, name), residual_gain if closes_branch else 1.0)
        out.graph.initializer.append(_to_tensor(name, values, dtype))
    _set_records(out, {})
    return out


def load_materialized(path: str | Path, seed: int = 0) -> onnx.ModelProto:
    """Load an ONNX file; materialize it if it is a skeleton."""
    model = onnx.load(str(path))
    return materialize(model, seed=seed) if is_skeleton(model) else model
