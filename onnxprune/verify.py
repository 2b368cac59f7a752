"""Verification and measurement: validity checks, parameter and MAC counts, onnxruntime runs, the exactness
harness (zero the channels a plan removes, so the original and pruned models must agree)."""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .allocate import Plan
from .errors import OnnxPruneError, first_line
from .graph import (Dims, batched_inputs, infer_shapes, nested_graphs, node_attr, runtime_dims, shapes_at,
                    subgraphs_of)
from .groups import Analysis
from .layers import macs as node_macs, stored_zero
from .lazy_tensors import weights_folder
from .roles import Role

# Roles whose removed channels are zeroed so that the channel's activation is exactly zero (see elementwise._ROLES).
PRODUCER_ROLES = (Role.W_OUT, Role.BIAS, Role.SCALE, Role.SHIFT, Role.CONST)


def check_valid(model: onnx.ModelProto) -> None:
    """The pruned model passes the full checker (strict shape inference included). A model whose weights are on
    disk (lazy_tensors) is checked as a file beside them: the checker reads external data, and models past 2 GB,
    only from a path."""
    folder = weights_folder(model)
    try:
        if folder is None:
            onnx.checker.check_model(model, full_check=True)
        else:
            _check_beside_weights(model, folder)
    except Exception as exc:
        raise OnnxPruneError(f"internal error: pruned model fails the ONNX checker: {first_line(exc)}") from None


def _check_beside_weights(model: onnx.ModelProto, folder: Path) -> None:
    """The full checker on the proto (weights not in it) written to a temporary file in the weights' folder."""
    fd, name = tempfile.mkstemp(prefix=".onnxprune-check-", suffix=".onnx", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(model.SerializeToString())
        onnx.checker.check_model(name, full_check=True)
    finally:
        os.unlink(name)


def io_signature(model: onnx.ModelProto) -> list[tuple[str, str, int, tuple]]:
    inits = {i.name for i in model.graph.initializer}
    sig = []
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for vi in values:
            if vi.name not in inits:
                t = vi.type.tensor_type
                dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
                sig.append((kind, vi.name, t.elem_type, dims))
    return sig


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every initializer, those of If branches and Loop and Scan bodies included."""
    graphs = [model.graph, *nested_graphs(model.graph)]
    return int(sum(np.prod(init.dims, dtype=np.int64) for graph in graphs for init in graph.initializer))


def count_macs(model: onnx.ModelProto, shapes: dict[str, Dims] | None = None) -> int:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul at batch 1, from inferred shapes.

    A leading symbolic dimension counts as the batch (1); a node with any other unknown size counts 0."""
    return int(sum(layer_macs(model, shapes).values()))


def first_sample(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The first sample of a batch of feeds (batch 1, as MACs are counted)."""
    batched = batched_inputs(model)
    return {k: v[:1] if k in batched else v for k, v in feeds.items()}


def sample_shapes(model: onnx.ModelProto, sample: dict[str, np.ndarray] | None) -> dict[str, Dims] | None:
    """For a model with sizes known only at run time (a sequence length), every tensor's shape at `sample`'s
    sizes: what its MACs are counted at. None otherwise (the declared shapes serve)."""
    if not sample or not runtime_dims(model):
        return None
    return shapes_at(model, {k: np.shape(v) for k, v in sample.items()})


def layer_macs(model: onnx.ModelProto, shapes: dict[str, Dims] | None = None) -> dict[str, int]:
    """MACs per node name, for the nodes count_macs counts. A layer inside a Loop body counts once per iteration
    where the trip count is a constant (an upper bound: the condition may end the loop sooner), inside a Scan body
    once per step where the scanned length is static, else once (an If branch: as if that branch ran)."""
    shapes = shapes if shapes is not None else infer_shapes(model)
    found: dict[str, int] = {}
    constants = {i.name: i for g in [model.graph, *nested_graphs(model.graph)] for i in g.initializer}
    _count_macs(model.graph, shapes, constants, 1, found)
    return found


def _count_macs(graph: onnx.GraphProto, shapes: dict[str, Dims], constants: dict, runs: int,
                found: dict[str, int]) -> None:
    """Each node's MACs times `runs`, the runs of the subgraph it sits in; a subgraph's nodes before its node."""
    for node in graph.node:
        for sub in subgraphs_of(node):
            _count_macs(sub, shapes, constants, runs * _iterations(node, shapes, constants), found)
        try:
            count = node_macs(node, lambda name: _batch1(shapes.get(name)))
        except (TypeError, KeyError, IndexError):
            continue
        if count is not None:
            found[node.name] = count * runs


def _iterations(node: onnx.NodeProto, shapes: dict[str, Dims], constants: dict) -> int:
    """How often a Loop or Scan runs its body where that is known before running it; 1 otherwise."""
    if node.op_type == "Loop" and node.input and node.input[0] in constants:
        trips = numpy_helper.to_array(constants[node.input[0]]).reshape(-1)
        return int(trips[0]) if trips.size == 1 and 0 <= trips[0] < 2**31 else 1
    if node.op_type == "Scan":
        scanned = node.input[len(node.input) - int(node_attr(node, "num_scan_inputs", 0) or 0):]
        axis = (node_attr(node, "scan_input_axes", None) or [0])[0]
        dims = shapes.get(scanned[0]) if scanned else None
        return dims[axis] if dims and -len(dims) <= axis < len(dims) and isinstance(dims[axis], int) else 1
    return 1


def _batch1(dims: Dims | None) -> tuple[int, ...]:
    if dims is None:
        raise KeyError("unknown shape")
    dims = tuple(1 if (k == 0 and not isinstance(d, int)) else d for k, d in enumerate(dims))
    if not all(isinstance(d, int) for d in dims):
        raise TypeError("symbolic shape")
    return dims


def zero_removed_channels(model: onnx.ModelProto, analysis: Analysis, plan: Plan) -> onnx.ModelProto:
    """A copy of the analysed model in which every channel the plan removes is exactly zero where it is produced
    (weights, bias, norm scale and shift, per-channel constants). Pruning this copy must not change its outputs."""
    zeroed = copy.deepcopy(model)
    arrays = zeroed_constants(analysis, plan)
    for graph in [zeroed.graph, *nested_graphs(zeroed.graph)]:
        for init in graph.initializer:
            if init.name in arrays:
                init.CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))
    return zeroed


def zeroed_constants(analysis: Analysis, plan: Plan) -> dict[str, np.ndarray]:
    """The constants zero_removed_channels changes, by name, as they are with the plan's removed channels zeroed."""
    removed = {gid: np.setdiff1d(np.arange(analysis.groups[gid].size), keep) for gid, keep in plan.keep.items()}
    arrays: dict[str, np.ndarray] = {}
    for gid, channels in removed.items():
        members = analysis.groups[gid].members
        # A group no weight produces (channels gathered from a frozen tensor) is silenced where it is consumed.
        roles = PRODUCER_ROLES if any(m.role in PRODUCER_ROLES for m in members) else PRODUCER_ROLES + (Role.W_IN,)
        # A group whose ops give no roles (an Einsum's operands) is zeroed in every constant that holds it.
        roles = roles if any(m.role is not None for m in members) else (None,)
        for m in members:
            if not m.constant or m.role not in roles:
                continue
            name, axis = m.space
            array = arrays.setdefault(name, analysis.index.array(name).copy())
            idx = m.offset + (channels[:, None] * m.inner + np.arange(m.inner)).ravel()
            index = [slice(None)] * array.ndim
            index[axis] = idx
            array[tuple(index)] = stored_zero(name, analysis.index)[tuple(index)]  # a QDQ weight: its zero point
    return arrays


# ------------------------------------------------------------------------------------------------ onnxruntime

def session(model: onnx.ModelProto, threads: int = 1):
    """An onnxruntime CPU session on `model` as numpy can feed it (see numpy_io); a model onnxruntime cannot load
    is a one-line error."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    folder = weights_folder(model)
    if folder is not None:  # a lazily opened model: onnxruntime maps its external data from there
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    try:
        return ort.InferenceSession(numpy_io(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxPruneError(f"onnxruntime cannot load the model: {first_line(exc)}") from None


# Element types numpy has no dtype for, so onnxruntime's Python API can neither feed nor return them.
NO_NUMPY_TYPES = (onnx.TensorProto.BFLOAT16,)


def numpy_io(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as numpy can run it: a bfloat16 graph input is fed as float32 and cast inside, a bfloat16 graph
    output (or probe) comes back as float32; names are unchanged. A model without such inputs and outputs is
    returned as it is, not copied."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [vi.name for vi in model.graph.input if vi.name not in inits and _no_numpy(vi)]
    outputs = [vi.name for vi in model.graph.output if _no_numpy(vi) and vi.name not in inputs]
    if not inputs and not outputs:
        return model
    model = copy.deepcopy(model)
    graph, first, last = model.graph, [], []
    for name in inputs:
        first.append(onnx.helper.make_node("Cast", [name], [_rename(graph, name)], to=_elem_type(graph.input, name)))
    for name in outputs:
        last.append(onnx.helper.make_node("Cast", [_rename(graph, name)], [name], to=onnx.TensorProto.FLOAT))
    nodes = first + list(graph.node) + last
    del graph.node[:]
    graph.node.extend(nodes)
    for vi in list(graph.input) + list(graph.output):
        if vi.name in inputs or vi.name in outputs:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return model


def _no_numpy(vi: onnx.ValueInfoProto) -> bool:
    return vi.type.tensor_type.elem_type in NO_NUMPY_TYPES


def _elem_type(values, name: str) -> int:
    return next(vi.type.tensor_type.elem_type for vi in values if vi.name == name)


def _rename(graph: onnx.GraphProto, name: str) -> str:
    """Every node (subgraphs included) and value_info that reads or writes `name` uses a new name instead, which is
    returned; graph inputs and outputs keep theirs."""
    new = f"{name}__onnxprune_cast"
    for node in graph.node:
        node.input[:] = [new if i == name else i for i in node.input]
        node.output[:] = [new if o == name else o for o in node.output]
        for sub in subgraphs_of(node):
            _rename(sub, name)
    for vi in graph.value_info:
        if vi.name == name:
            vi.name = new
    return new


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


_NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
             onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
             onnx.TensorProto.BOOL: np.bool_}


def random_feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """Random inputs for every graph input; symbolic dimensions become `batch` (first axis) or 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (batch if k == 0 else 1)
                for k, d in enumerate(t.shape.dim)]
        dtype = _NP_TYPES.get(t.elem_type, np.float32)
        if np.issubdtype(dtype, np.integer):
            feeds[vi.name] = rng.integers(0, 2, size=dims).astype(dtype)
        else:
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
    return feeds
