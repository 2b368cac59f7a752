"""Weights that stay on disk, for models past RAM.

A model with external data is opened without its weights (`graph.load_model(path, lazy=True)`): each tensor is
memory-mapped when a step reads it (`read`) and unmapped when that step drops it, so reading every weight once (a
criterion's norms) holds one tensor at a time. Surgery writes every external tensor of the pruned model, sliced or
copied, into one new data file (`DataFile`) in the run's scratch folder, and `graph.save_model` copies the tensors of
such a model tensor by tensor into the output's data file: no step holds the model's weights in memory. Runs that
execute the model or change weights in place read them into the proto first (`load_weights`, pipeline.prepare).

The working model keeps ONNX's own form (locations relative to a folder: the checker and onnxruntime refuse absolute
ones); that folder travels in the model's metadata under FOLDER_KEY, so copies of the model (copy.deepcopy) keep it,
and save_model leaves the key out of the file it writes.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from .errors import OnnxPruneError

FOLDER_KEY = "onnxprune.weights_folder"
ALIGNMENT = 4096  # tensors start on page boundaries in the files written here, so onnxruntime can map them
_CHUNK = 1 << 24  # bytes copied at a time between data files
# Elements up to which an external tensor is read into the proto when the model is opened: shape inference and the
# analysis read such values (Reshape targets, axes, scales) from there, as they do for a loaded model. Constant
# nodes' values are read too, whatever their size (normalisation reads them as nodes).
IN_PROTO_UP_TO = 4096
# Element types whose external bytes are a little-endian numpy array of the same type (the rest are converted by
# onnx's numpy_helper: bfloat16, float8, 4-bit types, strings).
_PLAIN = {t: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)).newbyteorder("<") for t in (
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
    onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL)}


def is_external(tensor: onnx.TensorProto) -> bool:
    """The tensor's data is in a file, not in the proto."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: initializers and attribute tensors, subgraphs' included."""
    return external_data_helper._get_all_tensors(model)


def weights_folder(model: onnx.ModelProto) -> Path | None:
    """The folder the model's external tensors are read from, for a model opened lazily; else None."""
    found = [p.value for p in model.metadata_props if p.key == FOLDER_KEY]
    return Path(found[0]) if found else None


def set_weights_folder(model: onnx.ModelProto, folder: Path | None) -> None:
    """Record (or with None, forget) where the model's external tensors are read from."""
    kept = [p for p in model.metadata_props if p.key != FOLDER_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if folder is not None:
        model.metadata_props.add(key=FOLDER_KEY, value=os.fspath(folder))


def open_lazily(model: onnx.ModelProto, folder: Path) -> None:
    """Make a model loaded without its external data read its tensors from `folder` on demand; a tensor whose file
    is missing or too short is refused now, as loading the weights would have refused it."""
    for tensor in all_tensors(model):
        if is_external(tensor):
            _check_range(tensor, folder)
    small = (t for t in all_tensors(model) if is_external(t) and np.prod(t.dims, dtype=np.int64) <= IN_PROTO_UP_TO)
    for tensor in [*external_data_helper._get_attribute_tensors(model), *small]:
        if is_external(tensor):
            _load(tensor, folder)
    set_weights_folder(model, folder.resolve())


def _check_range(tensor: onnx.TensorProto, folder: Path) -> None:
    info = external_data_helper.ExternalDataInfo(tensor)
    path = folder / info.location
    try:
        size = path.stat().st_size
    except OSError as err:
        raise OnnxPruneError(f"cannot read the data of tensor '{tensor.name}' ({path}): {err.strerror}") from None
    length = info.length if info.length else size - info.offset
    if info.offset + length > size or _stored_bytes(tensor) != length:
        raise OnnxPruneError(f"tensor '{tensor.name}' needs {_stored_bytes(tensor)} bytes; its external data names "
                             f"{length} at offset {info.offset} of {path}, which holds {size}")


def _stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of the tensor's data as stored (a 4-bit type packs two values to a byte)."""
    count = int(np.prod(tensor.dims, dtype=np.int64))
    bits = 4 if tensor.data_type in _FOUR_BIT else 8 * np.dtype(
        onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return (count * bits + 7) // 8


_FOUR_BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def read(tensor: onnx.TensorProto, folder: Path | None) -> np.ndarray:
    """The tensor's value: a read-only memory map of its bytes for external data in a plain numeric type (released
    when the caller drops it), a converted copy for other types, numpy_helper's array for data in the proto."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    if folder is None:
        raise OnnxPruneError(f"tensor '{tensor.name}' keeps its data in an external file, and the model was not "
                             "loaded from a path (graph.load_model) that says where it lies")
    info = external_data_helper.ExternalDataInfo(tensor)
    dtype, shape = _PLAIN.get(tensor.data_type), tuple(int(d) for d in tensor.dims)
    if dtype is None or not shape or 0 in shape:
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        _load(copy, folder)
        return numpy_helper.to_array(copy)
    return np.memmap(folder / info.location, dtype=dtype, mode="r", offset=info.offset, shape=shape)


def _in_proto(tensor: onnx.TensorProto, data: bytes) -> onnx.TensorProto:
    """A copy of an external tensor's description with its data in the proto."""
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    del copy.external_data[:]
    copy.data_location = onnx.TensorProto.DEFAULT
    copy.raw_data = data
    return copy


def _read_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def load_weights(model: onnx.ModelProto) -> None:
    """Read every external tensor of a lazily opened model into the proto: the steps that run the model on data or
    change weights in place (calibration, recovery, sparsity) read them from there."""
    folder = weights_folder(model)
    if folder is None:
        return
    for tensor in all_tensors(model):
        if is_external(tensor):
            _load(tensor, folder)
    set_weights_folder(model, None)


def _load(tensor: onnx.TensorProto, folder: Path) -> None:
    """Read an external tensor's data into its proto."""
    info = external_data_helper.ExternalDataInfo(tensor)
    tensor.CopyFrom(_in_proto(tensor, _read_bytes(folder / info.location, info.offset, _stored_bytes(tensor))))


class DataFile:
    """An external-data file being written: tensors appended at page-aligned offsets, each tensor's description
    pointed at its bytes by `entries_for` (the caller decides when the proto changes)."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = open(path, "wb")

    @classmethod
    def in_folder(cls, folder: Path, stem: str = "weights") -> "DataFile":
        """A new file of a unique name in `folder`."""
        fd, name = tempfile.mkstemp(prefix=f"{stem}-", suffix=".data", dir=folder)
        os.close(fd)
        return cls(Path(name))

    def add_array(self, tensor: onnx.TensorProto, value: np.ndarray) -> dict[str, str]:
        """Append `value` stored as `tensor`'s type; the external-data entries that point at it."""
        dtype = _PLAIN.get(tensor.data_type)
        if dtype is not None:
            return self.add_bytes(memoryview(np.ascontiguousarray(value, dtype=dtype)).cast("B"))
        return self.add_bytes(numpy_helper.from_array(np.asarray(value), tensor.name).raw_data)

    def add_bytes(self, data: bytes | memoryview) -> dict[str, str]:
        """Append bytes already in the tensor's stored form."""
        offset = self._start()
        self._handle.write(data)
        return self._entries(offset, len(data))

    def add_copy(self, tensor: onnx.TensorProto, folder: Path) -> dict[str, str]:
        """Append the bytes of an external tensor read from `folder`, copied in chunks."""
        info, length = external_data_helper.ExternalDataInfo(tensor), _stored_bytes(tensor)
        offset = self._start()
        with open(folder / info.location, "rb") as source:
            source.seek(info.offset)
            for start in range(0, length, _CHUNK):
                self._handle.write(source.read(min(_CHUNK, length - start)))
        return self._entries(offset, length)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "DataFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> int:
        offset = -self._handle.tell() % ALIGNMENT + self._handle.tell()
        self._handle.seek(offset)
        return offset

    def _entries(self, offset: int, length: int) -> dict[str, str]:
        return {"location": self.path.name, "offset": str(offset), "length": str(length)}


def point_at(tensor: onnx.TensorProto, entries: dict[str, str], dims: tuple[int, ...] | None = None) -> None:
    """Make `tensor` an external tensor whose bytes lie where `entries` say (with new dims after slicing)."""
    tensor.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    if dims is not None:
        del tensor.dims[:]
        tensor.dims.extend(dims)
    del tensor.external_data[:]
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    tensor.data_location = onnx.TensorProto.EXTERNAL
