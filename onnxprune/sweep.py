"""One forward sweep through a model for work done layer by layer (least-squares recovery, sequential sparsity).

Re-fitting layer k needs its inputs as the model computes them once the layers before it are re-fitted, so running the
whole model for each layer costs depth^2. A `ForwardSweep` keeps instead, for every calibration batch, the values of
the tensors that nodes still to run will read (the frontier), and reaches each next target by running only the nodes
between the frontier and it: a segment, extracted as a model of its own whose inputs are the cached tensors, run
with onnxruntime on each batch with the weights as they are at that moment. Every node that computes from the data
runs once, so the work is linear in depth; nodes that compute from constants only (a DequantizeLinear of a weight)
are not cached but run in each segment that reads them.

Cached values live in a `SpillStore`: in memory up to a byte budget, beyond it in memory-mapped files in a temporary
folder that is removed when the sweep ends, on an error or on a signal (`files.scratch_folder`).
"""
from __future__ import annotations

import os
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .calibrate import Feed, element_types, other_floats, run_batch
from .errors import OnnxPruneError
from .files import scratch_folder
from .graph import outer_scope_names, subgraphs_of
from .verify import session

MEMORY_BUDGET = 1 << 30  # bytes of cached values held in memory; beyond it they are spilled to disk


class SpillStore:
    """Arrays kept in memory while they fit in `budget` bytes, else written to memory-mapped files in `folder`."""

    def __init__(self, folder: Path, budget: int):
        self.folder, self.budget = folder, budget
        self.in_memory = 0
        self.spilled = 0  # files written so far
        self._held: dict[int, int] = {}  # id of an array held in memory -> its bytes

    def keep(self, value: object) -> object:
        """`value` as it will be read back: the array itself, or a read-only memory map of a copy on disk. Values
        that are not plain arrays (a sequence, strings) stay in memory."""
        if not isinstance(value, np.ndarray) or value.dtype.hasobject or value.size == 0:
            return value
        if self.in_memory + value.nbytes <= self.budget:
            self.in_memory += value.nbytes
            self._held[id(value)] = value.nbytes
            return value
        return self._spill(value)

    def _spill(self, value: np.ndarray) -> np.ndarray:
        path = self.folder / f"{self.spilled}.npy"
        self.spilled += 1
        mapped = np.lib.format.open_memmap(path, mode="w+", dtype=value.dtype, shape=value.shape)
        mapped[...] = value
        mapped.flush()
        return np.load(path, mmap_mode="r")

    def release(self, value: object) -> None:
        """Forget a value no longer needed: its memory counts no more, its file is removed (a map still open keeps
        the data readable until it is dropped)."""
        if id(value) in self._held:
            self.in_memory -= self._held.pop(id(value))
        elif isinstance(value, np.memmap):
            try:
                os.unlink(value.filename)
            except OSError:  # removed with the folder at the end in any case
                pass


@contextmanager
def spill_store(budget: int = MEMORY_BUDGET) -> Iterator[SpillStore]:
    """A SpillStore whose files go to a temporary folder, removed when the body ends."""
    with scratch_folder("onnxprune-sweep-") as folder:
        yield SpillStore(folder, budget)


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The names a node reads: its inputs and what its subgraphs read from the enclosing scope."""
    reads = [name for name in node.input if name]
    for sub in subgraphs_of(node):
        reads += sorted(outer_scope_names(sub))
    return reads


class ForwardSweep:
    """The values of `targets`, asked for in that order, on every batch of `feeds`, each computed from what was
    cached before it, with `model` as it is when it is asked (its weights may change between targets)."""

    def __init__(self, model: onnx.ModelProto, targets: list[str], feeds: list[Feed], store: SpillStore):
        self.model, self.feeds, self.store = model, feeds, store
        self.nodes = list(model.graph.node)
        self.producer = {name: p for p, node in enumerate(self.nodes) for name in node.output if name}
        self.fed = set(feeds[0]) if feeds else set()
        self.data = self._data_tensors()
        self.pending = self._pending_reads(targets)
        self.targets = deque(targets)
        self.computed: set[int] = set()  # positions of the data nodes run so far
        self.cache: dict[str, list] = {}  # per live tensor, its value on each batch
        self.types = element_types(model) if other_floats(model) else {}  # bfloat16 needs its declared type
        self._initializers: dict[str, onnx.TensorProto] = {}

    def _data_tensors(self) -> set[str]:
        """The graph inputs fed and every output of a node that reads one of them, directly or not."""
        data = set(self.fed)
        for node in self.nodes:
            if any(name in data for name in node_reads(node)):
                data.update(name for name in node.output if name)
        return data

    def _pending_reads(self, targets: list[str]) -> dict[str, int]:
        """Per computed tensor, how many times it will still be read: by the data nodes that some target needs, and
        as a target itself. A tensor is dropped from the cache when its count reaches zero."""
        pending: dict[str, int] = {}
        for position in self._ancestors(targets):
            if self._is_data_node(position):
                for name in self._data_reads(position):
                    pending[name] = pending.get(name, 0) + 1
        for name in targets:
            pending[name] = pending.get(name, 0) + 1
        return pending

    def _ancestors(self, names: list[str], stop=lambda name: False) -> set[int]:
        """Positions of the nodes the `names` are computed from, not looking past names where `stop` holds."""
        found: set[int] = set()
        stack = list(names)
        while stack:
            name = stack.pop()
            position = self.producer.get(name)
            if position is None or position in found or stop(name):
                continue
            found.add(position)
            stack.extend(node_reads(self.nodes[position]))
        return found

    def _is_data_node(self, position: int) -> bool:
        return any(name in self.data for name in self.nodes[position].output)

    def _data_reads(self, position: int) -> list[str]:
        """The computed data tensors a node reads (graph inputs are always at hand and not counted)."""
        return [name for name in node_reads(self.nodes[position]) if name in self.data and name not in self.fed]

    def values(self, target: str) -> list:
        """The next target's value on every batch."""
        if not self.targets or self.targets[0] != target:
            raise OnnxPruneError(f"internal error: sweep asked for '{target}' out of order")
        self.targets.popleft()
        if not self.feeds:
            return []
        if target in self.fed:
            return [feed[target] for feed in self.feeds]
        if target not in self.cache:
            self._run(sorted(self._ancestors([target], lambda name: name in self.cache or name in self.fed)))
        if target not in self.cache:  # an initializer: the same value on every batch
            return [numpy_helper.to_array(self._initializer(target))] * len(self.feeds)
        found = self.cache[target]
        self._read_once(target)
        return found

    def _run(self, positions: list[int]) -> None:
        """Run the segment of nodes at `positions` on every batch and cache what later nodes and targets read."""
        if not positions:
            return
        inside = set(positions)
        data_nodes = [p for p in positions if self._is_data_node(p)]
        inputs = sorted({name for p in data_nodes for name in self._data_reads(p) if self.producer[name] not in inside}
                        | {name for p in positions for name in node_reads(self.nodes[p]) if name in self.fed})
        for position in data_nodes:
            self.computed.add(position)
            for name in self._data_reads(position):
                self.pending[name] -= 1
        outputs = [name for p in positions for name in self.nodes[p].output if self.pending.get(name, 0) > 0]
        runner = session(self._segment_model(positions, inputs, outputs), threads=0)
        values: dict[str, list] = {name: [] for name in outputs}
        for batch in range(len(self.feeds)):
            for name, value in zip(outputs, self._run_batch(runner, inputs, outputs, batch)):
                values[name].append(self.store.keep(value))
        self.cache.update(values)
        for name in inputs:
            self._release_if_read(name)

    def _run_batch(self, runner, inputs: list[str], outputs: list[str], batch: int) -> list:
        return run_batch(runner, outputs, {name: self._value(name, batch) for name in inputs})

    def _value(self, name: str, batch: int) -> object:
        return self.feeds[batch][name] if name in self.fed else self.cache[name][batch]

    def _read_once(self, name: str) -> None:
        self.pending[name] -= 1
        self._release_if_read(name)

    def _release_if_read(self, name: str) -> None:
        """Drop a cached tensor that nothing will read any more."""
        if name in self.cache and self.pending.get(name, 0) <= 0:
            for value in self.cache.pop(name):
                self.store.release(value)

    def _segment_model(self, positions: list[int], inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
        """The nodes at `positions` as a model reading `inputs` (as cached) and returning `outputs`, with the
        initializers they read as they are now."""
        nodes = [self.nodes[p] for p in positions]
        produced = {name for node in nodes for name in node.output}
        constants = sorted({name for node in nodes for name in node_reads(node)} - produced - set(inputs))
        initializers = [init for init in map(self._initializer, constants) if init is not None]
        graph = helper.make_graph(nodes, "segment", [self._input_info(name) for name in inputs],
                                  [self._output_info(name) for name in outputs], initializers)
        model = helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        model.functions.extend(self.model.functions)
        return model

    def _initializer(self, name: str) -> onnx.TensorProto | None:
        """The model's initializer `name` now (looked up again when missing: recovery may add a bias)."""
        if name not in self._initializers:
            self._initializers = {init.name: init for init in self.model.graph.initializer}
        return self._initializers.get(name)

    def _input_info(self, name: str) -> onnx.ValueInfoProto:
        value = self._value(name, 0)
        if isinstance(value, list):  # a sequence of tensors, as onnxruntime returns one
            elem = self.types.get(name) or helper.np_dtype_to_tensor_dtype(np.asarray(value[0]).dtype)
            return helper.make_tensor_sequence_value_info(name, elem, None)
        return helper.make_tensor_value_info(name, self.types.get(name) or _element_type(value), None)

    def _output_info(self, name: str) -> onnx.ValueInfoProto:
        """Declared with its type where the model holds other floats than float32 (a bfloat16 value must be
        returned as float32, see verify.numpy_io); else left for onnxruntime to infer."""
        if name in self.types:
            return helper.make_tensor_value_info(name, self.types[name], None)
        return onnx.ValueInfoProto(name=name)


def _element_type(value: np.ndarray) -> int:
    if value.dtype.hasobject:
        return onnx.TensorProto.STRING
    return helper.np_dtype_to_tensor_dtype(value.dtype)
