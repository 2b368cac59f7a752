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
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .graph import node_attr

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

# Ops through which a weight flows unchanged in value distribution when looking
# for the op that really consumes it (e.g. a weight transposed before MatMul).
_PASSTHROUGH = {"Identity", "Cast", "Transpose"}


# --------------------------------------------------------------------------- #
# records
# --------------------------------------------------------------------------- #
def _numel(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def skeleton_records(model: onnx.ModelProto) -> Dict[str, Tuple[int, List[int]]]:
    """Return ``{name: (onnx_dtype, dims)}`` recorded in a skeleton ({} if none)."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            raw = json.loads(prop.value)
            return {k: (int(v[0]), [int(d) for d in v[1]]) for k, v in raw.items()}
    return {}


def is_skeleton(model: onnx.ModelProto) -> bool:
    """True if ``model`` carries skeleton records (i.e. needs ``materialize``)."""
    return any(p.key == METADATA_KEY for p in model.metadata_props)


def _set_records(model: onnx.ModelProto, records: Dict[str, Tuple[int, List[int]]]) -> None:
    keep = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    if records:
        value = json.dumps(
            {k: [int(v[0]), [int(d) for d in v[1]]] for k, v in records.items()},
            separators=(",", ":"),
        )
        model.metadata_props.add(key=METADATA_KEY, value=value)


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
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    records = dict(skeleton_records(out))

    def big_float(t: TensorProto) -> bool:
        return (
            t.data_type in _FLOAT_TYPES
            and _numel(t.dims) >= min_elements
            and not _few_distinct(t, max_distinct)
        )

    kept = []
    for init in g.initializer:
        if big_float(init):
            records[init.name] = (int(init.data_type), [int(d) for d in init.dims])
        else:
            kept.append(init)
    if len(kept) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(kept)

    kept_nodes = []
    changed = False
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None and attr.type == onnx.AttributeProto.TENSOR and big_float(attr.t):
                records[node.output[0]] = (int(attr.t.data_type), [int(d) for d in attr.t.dims])
                changed = True
                continue
        kept_nodes.append(node)
    if changed:
        del g.node[:]
        g.node.extend(kept_nodes)

    _set_records(out, records)
    return out


# --------------------------------------------------------------------------- #
# materialize
# --------------------------------------------------------------------------- #
def _iter_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _iter_nodes(sub)


def _role(
    name: str,
    dims: List[int],
    consumers: Dict[str, List[Tuple[onnx.NodeProto, int]]],
    depth: int = 0,
) -> Tuple[str, float, Optional[onnx.NodeProto]]:
    """Classify a tensor by its first meaningful consumer.

    Returns (kind, fan_in, weight_node) with kind in {"he", "bn_scale",
    "bn_bias", "bn_mean", "bn_var", "ln_scale", "ln_bias", "small"};
    weight_node is the Conv/Gemm/MatMul consuming an "he" tensor.
    """
    for node, idx in consumers.get(name, []):
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            continue
        if op in ("Conv", "ConvInteger") and idx == 1 and len(dims) >= 2:
            return "he", dims[1] * _numel(dims[2:]), node
        if op == "ConvTranspose" and idx == 1 and len(dims) >= 2:
            group = int(node_attr(node, "group", 1) or 1)
            strides = node_attr(node, "strides", None) or [1] * (len(dims) - 2)
            fan = (dims[0] / max(group, 1)) * _numel(dims[2:]) / max(_numel(strides), 1)
            return "he", max(fan, 1.0), node
        if op == "Gemm" and idx in (0, 1) and len(dims) == 2:
            if idx == 1:
                fan = dims[1] if node_attr(node, "transB", 0) else dims[0]
            else:
                fan = dims[0] if node_attr(node, "transA", 0) else dims[1]
            return "he", fan, node
        if op == "MatMul" and idx in (0, 1) and len(dims) >= 1:
            if len(dims) == 1:
                return "he", dims[0], node
            return "he", (dims[-2] if idx == 1 else dims[-1]), node
        if op == "BatchNormalization" and idx in (1, 2, 3, 4):
            return ["", "bn_scale", "bn_bias", "bn_mean", "bn_var"][idx], 0, None
        if op in ("LayerNormalization", "InstanceNormalization", "GroupNormalization") and idx in (1, 2):
            return ("ln_scale" if idx == 1 else "ln_bias"), 0, None
        if op in _PASSTHROUGH and idx == 0 and depth < 8:
            new_dims = list(dims)
            if op == "Transpose":
                perm = node_attr(node, "perm", None) or list(reversed(range(len(dims))))
                new_dims = [dims[p] for p in perm]
            found = _role(node.output[0], new_dims, consumers, depth + 1)
            if found[0] != "small":
                return found
    return "small", 0, None


# Single-consumer ops a residual branch may pass through between its last
# weight op and the residual Add (with a constant other operand where binary).
_BRANCH_TAIL = {"BatchNormalization", "Identity", "Dropout", "Reshape", "Transpose",
                "Squeeze", "Unsqueeze", "Flatten"}
_BRANCH_TAIL_BINARY = {"Add", "Sub", "Mul", "Div"}


def _feeds_residual(
    node: onnx.NodeProto,
    consumers: Dict[str, List[Tuple[onnx.NodeProto, int]]],
    const_names: set,
    hops: int = 8,
) -> bool:
    """True if ``node``'s output reaches, through a chain of single-consumer
    linear ops, one operand of an Add/Sum whose other operand is computed (a
    residual connection)."""
    if not node.output:
        return False
    out = node.output[0]
    for _ in range(hops):
        cons = consumers.get(out, [])
        if len(cons) != 1:
            return False
        nxt, idx = cons[0]
        if nxt.domain not in ("", "ai.onnx") or not nxt.output:
            return False
        op = nxt.op_type
        others = [x for j, x in enumerate(nxt.input) if j != idx and x]
        if op in ("Add", "Sum"):
            if others and all(o in const_names for o in others):
                out = nxt.output[0]  # bias add
                continue
            return True
        if op in _BRANCH_TAIL or (op in _BRANCH_TAIL_BINARY and all(o in const_names for o in others)):
            out = nxt.output[0]
            continue
        return False
    return False


def _tensor_seed(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8"))])


def _sample(kind: str, fan_in: float, dims: List[int], rng: np.random.Generator,
            gain: float = 1.0) -> np.ndarray:
    shape = tuple(int(d) for d in dims)
    if kind == "he":
        return rng.normal(0.0, gain * math.sqrt(2.0 / max(float(fan_in), 1.0)), shape)
    if kind in ("bn_scale", "bn_var", "ln_scale"):
        return rng.uniform(0.5, 1.5, shape)
    if kind in ("bn_bias", "bn_mean"):
        return rng.normal(0.0, 0.1, shape)
    if kind == "ln_bias":
        return rng.normal(0.0, 0.02, shape)
    return rng.normal(0.0, 0.02, shape)


def _to_tensor(name: str, values: np.ndarray, dtype: int) -> TensorProto:
    if dtype == TensorProto.BFLOAT16:
        f32 = np.ascontiguousarray(values, dtype=np.float32)
        bits = f32.view(np.uint32)
        # round-to-nearest-even to the upper 16 bits
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        t = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=list(values.shape))
        t.raw_data = rounded.tobytes()
        return t
    np_dtype = _FLOAT_TYPES[dtype]
    return numpy_helper.from_array(np.asarray(values, dtype=np_dtype), name=name)


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
    out = onnx.ModelProto()
    out.CopyFrom(model)
    records = skeleton_records(out)
    if not records:
        return out

    consumers: Dict[str, List[Tuple[onnx.NodeProto, int]]] = {}
    for node in _iter_nodes(out.graph):
        for i, inp in enumerate(node.input):
            if inp:
                consumers.setdefault(inp, []).append((node, i))

    const_names = {t.name for t in out.graph.initializer} | set(records)
    const_names |= {n.output[0] for n in out.graph.node if n.op_type == "Constant" and n.output}

    new_inits = []
    for name, (dtype, dims) in records.items():
        kind, fan_in, wnode = _role(name, dims, consumers)
        gain = 1.0
        if wnode is not None and residual_gain != 1.0 and _feeds_residual(wnode, consumers, const_names):
            gain = residual_gain
        values = _sample(kind, fan_in, dims, _tensor_seed(seed, name), gain)
        new_inits.append(_to_tensor(name, values, dtype))
    out.graph.initializer.extend(new_inits)
    _set_records(out, {})
    return out


def load_materialized(path, seed: int = 0) -> onnx.ModelProto:
    """Load an ONNX file; materialize it if it is a skeleton."""
    model = onnx.load(str(path))
    return materialize(model, seed=seed) if is_skeleton(model) else model
