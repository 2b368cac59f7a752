"""Loading, saving and indexing ONNX graphs.

`load_model` reads a file (external data included, or left on disk: lazy_tensors), `normalize` rewrites exporter
quirks into the plain form the analysis expects (weights held in `Constant` nodes become initializers, `Identity`
nodes on constants are bypassed), and `GraphIndex` gives the analysis shapes, constants, producers and consumers in
one place.
"""
from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import external_data_helper, numpy_helper

from . import files, fold, lazy_tensors
from .errors import OnnxPruneError, first_line

log = logging.getLogger("onnxprune")

MIN_OPSET = 11
SKELETON_KEY = "onnxprune.skeleton"  # metadata of a weight-free skeleton (onnxprune.testing.skeleton)
Dims = tuple  # tuple of int | str | None per axis
# Initializers up to this many elements travel into shape inference with their values (shape constants, axes);
# bigger ones only as typed inputs, so inference never copies the weights.
_SMALL_CONSTANT = 4096


def load_model(path: str | os.PathLike, lazy: bool = False) -> onnx.ModelProto:
    """Read an ONNX file, its external data too; raise OnnxPruneError with a one-line reason if it cannot.

    `lazy`: a model with external data is opened without reading its weights; they are read one tensor at a time
    when a step needs them (lazy_tensors), from the file's folder."""
    p = Path(path)
    if not p.exists():
        raise OnnxPruneError(f"model not found: {p}")
    if not p.is_file():
        raise OnnxPruneError(f"not a file: {p}")
    try:
        model = onnx.load(str(p), load_external_data=not lazy)
        if lazy and any(lazy_tensors.is_external(t) for t in lazy_tensors.all_tensors(model)):
            lazy_tensors.open_lazily(model, p.parent)
    except OnnxPruneError:
        raise
    except Exception as exc:  # protobuf raises several unrelated types on corrupt input
        raise OnnxPruneError(f"cannot read {p} as an ONNX model: {first_line(exc)}") from None
    check_loadable(model, str(p))
    return model


def check_loadable(model: onnx.ModelProto, what: str = "model") -> None:
    """Reject protos that parsed but are not usable models (protobuf parses many random byte strings), and the
    weight-free skeletons the tests use."""
    if not model.graph.node or not model.graph.output:
        raise OnnxPruneError(f"{what} is not a valid ONNX model (no graph nodes or outputs)")
    _check_text(model, what)
    _check_tensor_sizes(model, what)
    if any(prop.key == SKELETON_KEY for prop in model.metadata_props):
        raise OnnxPruneError(f"{what} is a weight-free skeleton (metadata {SKELETON_KEY}); materialise it first "
                             "(onnxprune.testing.skeleton.materialize)")
    opset = ai_onnx_opset(model)
    if opset is None:
        raise OnnxPruneError(f"{what} declares no ai.onnx opset")
    if opset < MIN_OPSET:
        raise OnnxPruneError(
            f"{what} uses opset {opset}; onnxprune needs opset {MIN_OPSET} or newer "
            f"(convert with onnx.version_converter.convert_version)")


def _check_text(model: onnx.ModelProto, what: str) -> None:
    """Every text field holds UTF-8 (weights are never read): protobuf parses a proto2 string that is not UTF-8 and
    hands it to Python as bytes, which fails the first time the pruning writes a name back."""
    where = _bad_text(model, "model")
    if where:
        raise OnnxPruneError(f"{what} is not a valid ONNX model: {where} is not UTF-8 text")


def _bad_text(message: Message, path: str) -> str | None:
    """The path of the first string field that is not valid UTF-8, or None."""
    for name, repeated, is_text in _text_fields(message.DESCRIPTOR):
        if is_text:
            values = getattr(message, name) if repeated else [getattr(message, name)]
            if not all(isinstance(v, str) for v in values):
                return f"{path}.{name}"
            continue
        items = getattr(message, name) if repeated else [getattr(message, name)] if message.HasField(name) else []
        for k, item in enumerate(items):
            found = _bad_text(item, f"{path}.{name}[{k}]" if repeated else f"{path}.{name}")
            if found:
                return found
    return None


@functools.lru_cache(maxsize=None)
def _text_fields(descriptor) -> tuple[tuple[str, bool, bool], ...]:
    """(name, repeated, is text) of a message type's string and message fields (the rest holds no text)."""
    found = []
    for fd in descriptor.fields:
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == FieldDescriptor.LABEL_REPEATED
        if fd.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
            found.append((fd.name, repeated, fd.type == FieldDescriptor.TYPE_STRING))
    return tuple(found)


_PACKED_4BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def _check_tensor_sizes(model: onnx.ModelProto, what: str) -> None:
    """Every initializer and Constant tensor of the main graph holds as many values as its dims say, in a known
    type: else every reader of the weights (analysis, criteria, surgery, recovery) would fail its own way."""
    constants = (a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.HasField("t"))
    for tensor in itertools.chain(model.graph.initializer, constants):
        problem = _tensor_problem(tensor)
        if problem:
            raise OnnxPruneError(f"{what} is not a valid ONNX model: tensor '{tensor.name}' {problem}")


def _tensor_problem(t: onnx.TensorProto) -> str | None:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return None  # its data was not loaded (a ModelProto passed in without it): onnxruntime says so
    if any(d < 0 for d in t.dims):
        return f"has a negative dimension {list(t.dims)}"
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        values = onnx.helper.tensor_dtype_to_field(t.data_type)
    except (KeyError, ValueError, TypeError):
        return f"has an unknown data type {t.data_type}"
    count = math.prod(t.dims)
    if t.data_type in _PACKED_4BIT:
        count, itemsize = (count + 1) // 2, 1
    if t.data_type != onnx.TensorProto.STRING and t.HasField("raw_data"):
        have, need = len(t.raw_data), count * itemsize  # copies one tensor's bytes, once
    else:
        have, need = len(getattr(t, values)), count * (2 if t.data_type in _COMPLEX else 1)
    return None if have == need else f"holds {have} {'bytes' if t.HasField('raw_data') else 'values'} " \
                                     f"where its shape {list(t.dims)} needs {need}"


_COMPLEX = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}


def validate(model: onnx.ModelProto, what: str = "model") -> None:
    """The ONNX checker and strict shape inference on the model without its weights (cheap): a model that breaks
    the ONNX spec is refused with the reason instead of failing somewhere inside the pruning."""
    light = _light_copy(model)
    try:
        onnx.checker.check_model(light)
    except Exception as exc:
        raise OnnxPruneError(f"{what} is not valid ONNX: {first_line(exc)}") from None
    check_shapes(light, what)


def check_shapes(light: onnx.ModelProto, what: str = "model") -> None:
    """Strict shape and type inference without the declared intermediate shapes, as the pruned model gets it: a
    declared output whose shape or type disagrees with what the nodes compute, or an op given a type it does not
    take, is refused here, said of the input, rather than found in the pruned model."""
    del light.graph.value_info[:]
    try:
        _infer(light, strict=True)
    except Exception as exc:
        reason = _declared_output_mismatch(light) or first_line(exc)
        raise OnnxPruneError(f"{what} fails strict ONNX shape inference: {reason}") from None


def _declared_output_mismatch(light: onnx.ModelProto) -> str | None:
    """'it declares output 'y' with shape (1, 5), but its nodes compute (1, 10)', or None where the declared outputs
    agree with what inference computes without them."""
    try:
        computed = _infer(_light_copy(light, list(light.graph.input)), strict=False)
    except Exception:
        return None
    for out in light.graph.output:
        found = computed.get(out.name)
        declared_type, found_type = out.type.tensor_type.elem_type, found.type.tensor_type.elem_type if found else 0
        if declared_type and found_type and declared_type != found_type:
            names = [_type_name(t) for t in (declared_type, found_type)]
            return f"it declares output '{out.name}' as {names[0]}, but its nodes compute {names[1]}"
        declared, inferred = _dims_of(out.type), _dims_of(found.type) if found else None
        if declared and inferred and (len(declared) != len(inferred) or any(
                isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(declared, inferred))):
            return f"it declares output '{out.name}' with shape {_text(declared)}, but its nodes compute {_text(inferred)}"
    return None


def _type_name(elem_type: int) -> str:
    """FLOAT, INT64, ... or the number where the type is none ONNX knows (a corrupt or newer file)."""
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"element type {elem_type}"


def _text(dims: Dims) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def ai_onnx_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


EXTERNAL_DATA_ABOVE = 2**31 - 2**28  # bytes of weights above which a model is saved with external data


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write the model atomically (files.atomic_path: the target is the old file or the complete new one).

    Models over 2 GB are written with their weights in one external-data file beside the model, `OUT.onnx.data`;
    that file is written atomically too, and renamed into place just before the model. So is a model opened lazily
    (weights on disk): its tensors are copied one at a time, and the proto given is not changed.
    """
    if lazy_tensors.weights_folder(model) is not None:
        _save_streamed(model, files.resolve(path))
    elif tensor_bytes(model) > EXTERNAL_DATA_ABOVE:
        _save_with_external_data(model, files.resolve(path))
    else:
        files.write_bytes(path, model.SerializeToString())


def external_data_path(path: str | os.PathLike) -> Path:
    """Where save_model puts the weights of a model over 2 GB saved to `path`."""
    target = files.resolve(path)
    return target.with_name(target.name + ".data")


def _save_with_external_data(model: onnx.ModelProto, target: Path) -> None:
    """The weights go to a temporary file under a temporary location, which the model then names by its final
    name; the proto is changed in place (its weights leave it), as onnx.save_model does."""
    data = external_data_path(target)
    with files.atomic_path(target) as tmp_model, files.atomic_path(data) as tmp_data:
        for tensor in external_data_helper._get_initializer_tensors(model):  # not convert_model_to_external_data:
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:  # it refuses a location that exists
                external_data_helper.set_external_data(tensor, tmp_data.name)  # relative to the working folder
        external_data_helper.write_external_data_tensors(model, str(tmp_data.parent))
        for tensor in external_data_helper._get_all_tensors(model):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data.name
        with open(tmp_model, "wb") as handle:
            handle.write(model.SerializeToString())


def _save_streamed(model: onnx.ModelProto, target: Path) -> None:
    """A lazily opened model: every external tensor, and every tensor in the proto of 1 KiB or more, is copied into
    the output's data file one at a time (never the input's data file); a copy of the proto, without the weights
    folder in its metadata, then points at them."""
    data, folder = external_data_path(target), lazy_tensors.weights_folder(model)
    written = copy.deepcopy(model)  # the weights are on disk: a copy of the proto is small
    lazy_tensors.set_weights_folder(written, None)
    with files.atomic_path(target) as tmp_model, files.atomic_path(data) as tmp_data:
        with lazy_tensors.DataFile(tmp_data) as out:
            for tensor in lazy_tensors.all_tensors(written):
                if lazy_tensors.is_external(tensor):
                    lazy_tensors.point_at(tensor, {**out.add_copy(tensor, folder), "location": data.name})
                elif tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                    lazy_tensors.point_at(tensor, {**out.add_bytes(tensor.raw_data), "location": data.name})
        with open(tmp_model, "wb") as handle:
            handle.write(written.SerializeToString())


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers' data, subgraphs' included: cheap, unlike ModelProto.ByteSize() which walks the
    whole message."""
    total = 0
    for graph in [model.graph, *nested_graphs(model.graph)]:
        for init in graph.initializer:  # never touch raw_data: reading it copies the bytes
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
            total += int(np.prod(init.dims, dtype=np.int64)) * itemsize
    return total


# ----------------------------------------------------------------------------------------------- normalisation

def normalize(model: onnx.ModelProto) -> None:
    """Rewrite exporter quirks in place: Constant nodes -> initializers, Identity on a constant -> bypassed,
    arithmetic on constants -> its result (fold.py)."""
    graph = model.graph
    protected = set(o.name for o in graph.output) | subgraph_references(graph)
    _constants_to_initializers(graph, protected)
    _bypass_constant_identities(graph, protected)
    _normalize_subgraphs(graph, {init.name for init in graph.initializer})
    if model.ir_version >= 4:
        _initializers_out_of_inputs(graph)
    fold.fold_constants(model, protected)


def _initializers_out_of_inputs(graph: onnx.GraphProto) -> None:
    """Older exporters also list every weight as a graph input (an overridable default). Weights are what pruning
    slices, so they become plain constants; the data inputs are untouched."""
    weights = {init.name for init in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in weights]
    if len(inputs) != len(graph.input):
        log.info("%d weights listed as graph inputs are treated as constants", len(graph.input) - len(inputs))
        del graph.input[:]
        graph.input.extend(inputs)


def _constants_to_initializers(graph: onnx.GraphProto, protected: set[str]) -> None:
    keep = []
    for node in graph.node:
        value = constant_node_value(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if value is None or node.output[0] in protected:
            keep.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _normalize_subgraphs(graph: onnx.GraphProto, visible: set[str]) -> None:
    """Inside If branches and Loop and Scan bodies too, Constant nodes become initializers (of their subgraph: the
    name stays, so values nested subgraphs read convert as well) and Identity nodes on a constant the subgraph sees
    are bypassed, so the analysis reads a body's weights and shape constants as it reads the main graph's; a
    subgraph's outputs stay as they are. `visible`: the initializers of the enclosing graphs."""
    for node in graph.node:  # a graph's nodes are rebuilt before its subgraphs are read, so none goes stale
        for sub in subgraphs_of(node):
            outputs = {o.name for o in sub.output}
            _constants_to_initializers(sub, outputs)
            _bypass_constant_identities(sub, outputs | subgraph_references(sub), visible)
            _normalize_subgraphs(sub, visible | {init.name for init in sub.initializer})


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse_value, value_string(s): left as they are


def _bypass_constant_identities(graph: onnx.GraphProto, protected: set[str], outer: set[str] = frozenset()) -> None:
    """Exporters wrap shared weights in Identity nodes; point the consumers at the initializer itself (the graph's
    own or, in a subgraph, an `outer` one)."""
    constants = {init.name for init in graph.initializer} | outer
    rename: dict[str, str] = {}
    keep = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        if (node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input[0] in constants
                and node.output[0] not in protected):
            rename[node.output[0]] = node.input[0]
            continue
        keep.append(node)
    if rename:
        del graph.node[:]
        graph.node.extend(keep)


def subgraph_references(graph: onnx.GraphProto) -> set[str]:
    """Names used inside If/Loop/Scan bodies, outer-scope references included."""
    names: set[str] = set()
    for node in graph.node:
        for sub in subgraphs_of(node):
            for sub_node in sub.node:
                names.update(sub_node.input)
            names.update(o.name for o in sub.output)
            names |= subgraph_references(sub)
    return names


def outer_scope_names(sub: onnx.GraphProto) -> set[str]:
    """Names a subgraph (or its own subgraphs) reads from an enclosing scope."""
    defined = {i.name for i in sub.input} | {i.name for i in sub.initializer}
    used: set[str] = {o.name for o in sub.output}
    for node in sub.node:
        used.update(node.input)
        for nested in subgraphs_of(node):
            used |= outer_scope_names(nested)
        defined.update(node.output)
    return {n for n in used - defined if n}


_GRAPH_OPS = ("If", "Loop", "Scan", "SequenceMap")  # the ai.onnx ops with graph attributes


def subgraphs_of(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs a node holds in its attributes (an ai.onnx op other than _GRAPH_OPS holds none: reading every
    node's attributes would cost more than the analysis of a small model)."""
    if node.op_type not in _GRAPH_OPS and node.domain in ("", "ai.onnx"):
        return []
    subs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            subs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            subs.extend(attr.graphs)
    return subs


def named_subgraphs(node: onnx.NodeProto) -> dict[str, onnx.GraphProto]:
    """A control-flow node's subgraphs by attribute name: 'then_branch' and 'else_branch' of If, 'body' of Loop and
    Scan."""
    return {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}


def nested_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """Every subgraph inside `graph`, at any depth (not `graph` itself)."""
    found: list[onnx.GraphProto] = []
    for node in graph.node:
        for sub in subgraphs_of(node):
            found += [sub, *nested_graphs(sub)]
    return found


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes of `graph` and of its subgraphs, each subgraph's nodes before the node that holds them."""
    found: list[onnx.NodeProto] = []
    for node in graph.node:
        for sub in subgraphs_of(node):
            found += all_nodes(sub)
        found.append(node)
    return found


# ----------------------------------------------------------------------------------------------- shapes

def infer_shapes(model: onnx.ModelProto) -> dict[str, Dims]:
    """Shapes of every tensor that ONNX shape inference can reach; None for an unknown dimension."""
    return infer(model)[0]


def infer(model: onnx.ModelProto) -> tuple[dict[str, Dims], dict[str, np.ndarray]]:
    """Shapes, and the values of small integer tensors that shape arithmetic computes from static shapes and
    constants (Shape -> Slice -> Concat into a Reshape target)."""
    values: dict[str, np.ndarray] = {}
    try:
        infos = inferred_value_infos(model, values=values)
    except Exception as exc:
        log.warning("shape inference failed (%s); only declared shapes are used", first_line(exc))
        g = model.graph
        infos = {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}
    shapes = _shapes_of(infos)
    _fill_from_probes(model, shapes)
    return _with_initializers(model, shapes), values


def runtime_dims(model: onnx.ModelProto) -> list[str]:
    """The graph inputs' dimensions known only at run time, other than a leading batch: 'input_ids[1] (sequence)'."""
    inits = {i.name for i in model.graph.initializer}
    return [f"{vi.name}[{k}]" + (f" ({d})" if d else "") for vi in model.graph.input if vi.name not in inits
            for k, d in enumerate(_dims_of(vi.type) or ()) if k > 0 and not isinstance(d, int)]


def batched_inputs(model: onnx.ModelProto) -> set[str]:
    """Graph inputs whose leading dimension is known only at run time (a batch)."""
    return {vi.name for vi in model.graph.input if (dims := _dims_of(vi.type)) and not isinstance(dims[0], int)}


def shapes_at(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, Dims]:
    """Shapes of every tensor when the graph inputs have these sizes (a calibration sample's): what the MACs and
    the latency of a model with run-time sizes are counted at."""
    fixed = copy.deepcopy(model.graph.input)
    for vi in fixed:
        if vi.name in input_shapes:
            vi.type.tensor_type.shape.ClearField("dim")
            for size in input_shapes[vi.name]:
                vi.type.tensor_type.shape.dim.add().dim_value = int(size)
    return _with_initializers(model, _shapes_of(inferred_value_infos(model, inputs=fixed)))


def _with_initializers(model: onnx.ModelProto, shapes: dict[str, Dims]) -> dict[str, Dims]:
    for g in [model.graph, *nested_graphs(model.graph)]:
        for init in g.initializer:
            shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes


def _shapes_of(infos: dict[str, onnx.ValueInfoProto]) -> dict[str, Dims]:
    shapes: dict[str, Dims] = {}
    for name, vi in infos.items():
        dims = _dims_of(vi.type)
        if dims is not None:
            shapes[name] = dims
    return shapes


# Sizes given to run-time input dimensions in the two probe inferences: distinct primes, unlikely to meet a channel
# count by accident.
_PROBE_SIZES = ((3, 7, 13, 17), (5, 11, 19, 23))


def _fill_from_probes(model: onnx.ModelProto, shapes: dict[str, Dims]) -> None:
    """Sizes shape inference leaves unknown because they sit behind a run-time batch or sequence length: infer twice
    more with those input dimensions fixed to different numbers, and take each size that comes out the same both
    times (it does not depend on them). Only sizes are taken, never values: the model keeps its dynamic shapes."""
    dynamic = [(i, k, d if d else f"#{i}.{k}") for i, vi in enumerate(model.graph.input)
               for k, d in enumerate(_dims_of(vi.type) or ()) if not isinstance(d, int)]
    if not dynamic or all(all(isinstance(d, int) for d in dims) for dims in shapes.values()):
        return
    symbols = sorted({name for _, _, name in dynamic})  # one size per name: inputs that share "batch" agree
    probes = []
    for sizes in _PROBE_SIZES:
        input_shapes = {vi.name: list(dims) for vi in model.graph.input if (dims := _dims_of(vi.type)) is not None}
        for i, k, name in dynamic:
            input_shapes[model.graph.input[i].name][k] = sizes[symbols.index(name) % len(sizes)]
        try:
            probes.append(shapes_at(model, input_shapes))
        except Exception:
            return
    for name, dims in list(shapes.items()) + [(n, None) for n in probes[0] if n not in shapes]:
        first, second = probes[0].get(name), probes[1].get(name)
        if first is None or second is None or len(first) != len(second) or (dims and len(dims) != len(first)):
            continue
        current = dims or (None,) * len(first)
        shapes[name] = tuple(d if isinstance(d, int) else (a if isinstance(a, int) and a == b else d)
                             for d, a, b in zip(current, first, second))


def inferred_value_infos(model: onnx.ModelProto, strict: bool = False, values: dict[str, np.ndarray] | None = None,
                         inputs=None) -> dict[str, onnx.ValueInfoProto]:
    """Run ONNX shape inference on a light copy in which large initializers are typed graph inputs, so the weights
    are never serialised; small ones keep their values because Reshape, Slice and friends read them.

    Unless strict, shape arithmetic on static shapes is folded in the copy (never in the model) and inference runs
    again; the folded values are stored in `values`."""
    light = _light_copy(model, inputs)
    infos = _infer(light, strict)
    if strict:
        return infos
    for _ in range(4):  # a nested Loop's start value gets its shape once the outer body has one
        if not _declare_carried_shapes(light.graph, infos):
            break
        infos = _infer(light, strict)
    known = {i.name: numpy_helper.to_array(i) for i in light.graph.initializer}
    for _ in range(4):  # folding makes shapes static, which lets more Shape nodes fold
        if not _fold_shape_arithmetic(light, infos, known):
            break
        infos = _infer(light, strict)
    if values is not None:
        initializers = {i.name for i in model.graph.initializer}
        values.update({k: v for k, v in known.items() if k not in initializers})
    return infos


def _infer(light: onnx.ModelProto, strict: bool) -> dict[str, onnx.ValueInfoProto]:
    """The inferred value infos of the main graph, then those of its subgraphs (If branches, Loop and Scan bodies)."""
    inferred = onnx.shape_inference.infer_shapes(light, check_type=strict, strict_mode=strict, data_prop=True)
    infos = {}
    for g in [inferred.graph, *nested_graphs(inferred.graph)]:
        infos.update((vi.name, vi) for vi in list(g.value_info) + list(g.input) + list(g.output)
                     if vi.name not in infos)
    return infos


def _declare_carried_shapes(graph: onnx.GraphProto, infos: dict[str, onnx.ValueInfoProto]) -> bool:
    """ONNX inference gives a Loop body's carried inputs and the Loop's carried outputs no shape (it may change
    between iterations), so nothing in the body or after the Loop gets one. In the light copy only, give each such
    input the shape of the value the Loop starts it from, and the output that shape too where the body hands the
    same shape back. Returns whether anything changed."""
    changed = False
    for g in [graph, *nested_graphs(graph)]:
        for node in g.node:
            if node.op_type == "Loop" and "body" in named_subgraphs(node):
                changed |= _declare_loop_shapes(g, node, named_subgraphs(node)["body"], infos)
    return changed


def _declare_loop_shapes(graph: onnx.GraphProto, node: onnx.NodeProto, body: onnx.GraphProto,
                         infos: dict[str, onnx.ValueInfoProto]) -> bool:
    changed = False
    for k in range(2, min(len(node.input), len(body.input), len(body.output) + 1)):
        start = infos.get(node.input[k])
        if start is None or _dims_of(start.type) is None:
            continue
        if _dims_of(body.input[k].type) is None:
            body.input[k].type.CopyFrom(start.type)
            changed = True
        after, result = infos.get(body.output[k - 1].name), node.output[k - 2] if k - 2 < len(node.output) else ""
        if (result and after is not None and _dims_of(after.type) == _dims_of(start.type)
                and (result not in infos or _dims_of(infos[result].type) is None)):
            graph.value_info.append(onnx.helper.make_value_info(result, start.type))
            changed = True
    return changed


# Ops evaluated on small known values, and the size up to which an input counts as shape data.
_SHAPE_ARITHMETIC = {"Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Add", "Sub", "Mul",
                     "Div", "Reshape", "Identity", "Constant", "Range", "Equal", "Where", "Expand",
                     "ConstantOfShape", "Floor", "Ceil", "Sqrt", "Mod", "ReduceProd", "Max", "Min", "Neg", "Abs"}
_SHAPE_DATA_LIMIT = 64


def _fold_shape_arithmetic(light: onnx.ModelProto, infos: dict[str, onnx.ValueInfoProto],
                           known: dict[str, np.ndarray]) -> bool:
    """Replace, in the light copy only, every shape-arithmetic node whose inputs are known small values (or, for
    Shape, whose input has a fully static shape) by a Constant. The model keeps these nodes; the Shape rule keeps
    the axes a Shape reads unchanged, so the folded values stay true after pruning."""
    from onnx.reference import ReferenceEvaluator

    folded = False
    partial: dict[str, np.ndarray] = {}  # Shape outputs with run-time sizes in them (a batch), as _UNKNOWN
    for position, node in enumerate(light.graph.node):
        if node.op_type not in _SHAPE_ARITHMETIC or node.domain not in ("", "ai.onnx") or node.op_type == "Constant":
            continue
        try:
            outputs = _evaluate_small(node, infos, known, ReferenceEvaluator, partial)
        except Exception:  # an op the reference evaluator rejects: leave it to inference
            outputs = None
        if outputs is None:
            continue
        known.update(zip(node.output, outputs))
        constants = [onnx.helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(v)))
                     for name, v in zip(node.output, outputs)]
        light.graph.node[position].CopyFrom(constants[0])
        folded = True
    return folded


def _evaluate_small(node: onnx.NodeProto, infos: dict, known: dict, evaluator,
                    partial: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    if node.op_type == "Shape":
        return _shape_value(node, infos, partial)
    if node.op_type in ("Gather", "Slice") and node.input[0] in partial:
        return _static_part(node, known, evaluator, partial)
    inputs = [i for i in node.input if i]
    if len(node.output) != 1 or not inputs or not all(i in known and known[i].size <= _SHAPE_DATA_LIMIT
                                                      for i in inputs):
        return None
    result = evaluator(node).run(None, {i: known[i] for i in inputs})
    if any(np.asarray(r).size > _SHAPE_DATA_LIMIT for r in result):
        return None
    return [np.asarray(r) for r in result]


_UNKNOWN = -(2**62)  # a run-time size inside a partly known shape value; Gather and Slice only move it


def _shape_value(node: onnx.NodeProto, infos: dict, partial: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    """A Shape's value when its input's shape is static; one with run-time sizes in it (a batch) goes to
    `partial`, from which a Gather or Slice may still pick static sizes (`x.shape[1]` beside a run-time batch)."""
    dims = _dims_of(infos[node.input[0]].type) if node.input[0] in infos else None
    if dims is None or len(node.output) != 1:
        return None
    attrs = {a.name: a.i for a in node.attribute}
    value = np.array([d if isinstance(d, int) else _UNKNOWN for d in dims], dtype=np.int64)
    value = value[attrs.get("start", 0):attrs.get("end", len(dims))]
    if (value == _UNKNOWN).any():
        partial[node.output[0]] = value
        return None
    return [value]


def _static_part(node: onnx.NodeProto, known: dict, evaluator, partial: dict) -> list[np.ndarray] | None:
    """A Gather or Slice of a partly known shape value: known when it picks static sizes only, else partly known."""
    others = [i for i in node.input[1:] if i]
    if len(node.output) != 1 or not all(i in known for i in others):
        return None
    feeds = {node.input[0]: partial[node.input[0]], **{i: known[i] for i in others}}
    result = np.asarray(evaluator(node).run(None, feeds)[0])
    if (result == _UNKNOWN).any():
        partial[node.output[0]] = result
        return None
    return [result]


def _light_copy(model: onnx.ModelProto, inputs=None) -> onnx.ModelProto:
    """The graph without its large weights (typed inputs instead). `inputs` replaces the graph inputs (probes);
    declared intermediate shapes are then dropped, as they may contradict the fixed sizes."""
    g = model.graph
    light_graph = onnx.helper.make_graph([], g.name, list(inputs if inputs is not None else g.input),
                                         list(g.output) if inputs is None else [onnx.ValueInfoProto(name=o.name)
                                                                               for o in g.output])
    light_graph.node.extend(g.node)
    if inputs is None:
        light_graph.value_info.extend(g.value_info)
    input_names = {i.name for i in g.input}
    for init in g.initializer:
        if int(np.prod(init.dims, dtype=np.int64)) <= _SMALL_CONSTANT and init.data_location != onnx.TensorProto.EXTERNAL:
            light_graph.initializer.append(init)
        elif init.name not in input_names:
            light_graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    light = onnx.helper.make_model(light_graph, opset_imports=list(model.opset_import))
    light.ir_version = model.ir_version
    light.functions.extend(model.functions)
    return light


def _dims_of(type_proto: onnx.TypeProto) -> Dims | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:  # a negative one (Paddle's -1) is a run-time size
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


# ----------------------------------------------------------------------------------------------- index

@dataclass
class GraphIndex:
    """Read-only lookups over a model's graph and its subgraphs (If branches, Loop and Scan bodies), built once per
    analysis. Names are looked up across all graphs: `initializers` holds the subgraphs' too, `graph_outputs` the
    values every graph hands out, `body_values` the names defined inside subgraphs (onnxruntime cannot expose them
    as outputs), `reused_names` the names defined more than once (sibling branches may reuse a name)."""

    model: onnx.ModelProto
    shapes: dict[str, Dims]
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    graph_inputs: set[str] = field(default_factory=set)
    graph_outputs: set[str] = field(default_factory=set)
    known_values: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # folded shape arithmetic
    body_values: set[str] = field(default_factory=set)
    reused_names: set[str] = field(default_factory=set)
    nodes: list[onnx.NodeProto] = field(default_factory=list)  # all_nodes: the subgraphs' nodes too
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, model: onnx.ModelProto, shapes: dict[str, Dims] | None = None) -> "GraphIndex":
        g = model.graph
        values: dict[str, np.ndarray] = {}
        if shapes is None:
            shapes, values = infer(model)
        index = cls(model=model, shapes=shapes, known_values=values)
        index.initializers = {init.name: init for init in g.initializer}
        index.graph_inputs = {i.name for i in g.input if i.name not in index.initializers}
        index.graph_outputs = {o.name for o in g.output}
        index.nodes = all_nodes(g)
        for node in index.nodes:
            for name in node.output:
                if name:
                    index.producer[name] = node
            for name in node.input:
                if name:
                    index.consumers.setdefault(name, []).append(node)
        seen = defined_names(g)
        for sub in nested_graphs(g):
            defined = defined_names(sub)
            index.reused_names |= defined & (seen | index.body_values)
            index.body_values |= defined
            index.initializers.update((init.name, init) for init in sub.initializer)
            index.graph_outputs.update(o.name for o in sub.output)
        return index

    def array(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor, or None when the tensor is computed at run time. Small integer tensors
        that shape arithmetic computes from static shapes count as constants."""
        if name not in self.initializers:
            return self.known_values.get(name)
        tensor = self.initializers[name]
        if lazy_tensors.is_external(tensor):  # memory-mapped, not kept: mapped pages would stay resident
            return lazy_tensors.read(tensor, lazy_tensors.weights_folder(self.model))
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(tensor)
        return self._arrays[name]


def defined_names(graph: onnx.GraphProto) -> set[str]:
    """The names one graph (not its subgraphs) defines: its inputs, initializers and node outputs."""
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    return names | {o for n in graph.node for o in n.output if o}


def node_attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """An attribute's Python value, or `default` where the node does not set it."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def node_names(model: onnx.ModelProto) -> None:
    """Give every unnamed node, subgraphs' too, a unique name: reports, --exclude and surgery's fixups refer to
    nodes by name."""
    used = {n.name for n in all_nodes(model.graph) if n.name}
    for graph in [model.graph, *nested_graphs(model.graph)]:
        for i, node in enumerate(graph.node):
            if not node.name:
                name = f"{node.op_type}_{i}"
                while name in used:
                    name += "_"
                node.name = name
                used.add(name)
