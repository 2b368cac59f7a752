"""Where the channels a plan removes are not zero (issue 10), and what they carry there.

The exactness harness zeroes a removed channel where it is produced (weights, bias, norm scale and shift); pruning
must then not change the outputs. An op with f(0) != 0 (Sigmoid, Exp, Clip with min > 0, Add of a constant: the
rules declare it with `Couple.at_zero`) turns a zero channel into a constant, and where a layer consumes that constant
(a Conv, Gemm or MatMul input axis: a couple with no output) its contribution f(0)·W[:, c] would be lost with the
channel. `ZeroFlow` follows the rules' relations node by node (the graph is in topological order) and names those
consumers. A constant that a zero multiplies first (a squeeze-excite gate, x * sigmoid(x)) is zero again.

Where the op is element-wise, the constant is computed per channel: the node is evaluated (onnx.reference) on its
zero (or already constant) channels and its broadcast constant operands. A layer that sums a known constant the same
way at every output position (a Conv without padding, a Gemm, a MatMul) gets its contribution folded into its bias
when the plan is applied (bias_folding.py), so pruning stays exact; anywhere else (a
padded Conv sees the constant only inside the image, a value no evaluation tells) the group is marked inexact with
the reason. A tensor computed from constants alone (Cast of an initializer that folding left) is not zeroed by
anything: as an element-wise operand it carries its own value into the removed channels.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import onnx
from onnx import helper

from . import lazy_tensors
from .graph import GraphIndex, ai_onnx_opset, subgraphs_of
from .layers import ConvLayer, Layer, MatrixLayer, describe
from .roles import Role
from .rules.compare import comparison
from .rules.conv import pool
from .rules.elementwise import broadcast, clip, dropout, hard_sigmoid, unary, unary_not_zero_at_zero
from .rules.norm import batch_norm
from .rules.registry import Compose, Couple, Ref, rule_for
from .rules.shape import transpose

Space = tuple[str, int]

# Constant roles that multiply the channel: zeroed with it, they make the output zero whatever the input.
_MULTIPLYING = (Role.W_OUT, Role.SCALE)
# Constant roles the exactness harness zeroes with a removed channel (verify.zero_removed_channels).
_ZEROED = (Role.W_OUT, Role.BIAS, Role.SCALE, Role.SHIFT, Role.CONST)
# Rules of ops that act on each element alone (with numpy broadcasting): evaluating them on one element per channel
# tells what they do to a whole constant channel.
_ELEMENTWISE = (unary, unary_not_zero_at_zero, hard_sigmoid, clip, dropout, broadcast, comparison, batch_norm,
                transpose)
# Rules of ops that read space (pooling): evaluated on a channel spread over a spatial extent, where a padded
# average shows at the borders. The real extent where it is static and small, else this many positions.
_SPATIAL = (pool,)
_EXTENT = 24


@dataclass(frozen=True)
class NonZero:
    """Why a removed channel is not zero in a space; `finite` False for inf or NaN (that a zero does not cancel).
    What it is there: ZeroFlow.value."""

    reason: str
    finite: bool = True


@dataclass(frozen=True)
class Fold:
    """Input channel axis `space` of layer `layer` (a node name): a removed channel c carries the constant
    `value[c]` there, which the plan application adds to the layer's bias."""

    layer: str
    space: Space
    value: np.ndarray


class ZeroFlow:
    def __init__(self, index: GraphIndex):
        self.index = index
        self.constants = index.initializers
        self.nonzero: dict[Space, NonZero] = {}
        self.lost: dict[Space, str] = {}  # a consumer's input space -> why its group is inexact
        # (consumer layer, its input space) -> the constants its bias takes; layers reading one space each fold
        self.folds: dict[tuple[str, Space], Fold] = {}
        self.computed: set[str] = set(index.known_values)  # tensors computed from constants alone
        self._types: dict[str, int] | None = None
        self._pending: dict[Space, tuple] = {}  # a not-zero space -> (node, refs, spaces, relation) that made it
        self._values: dict[Space, np.ndarray | None] = {}

    def visit(self, who: str, relations: list[tuple[list[Ref], list[Space], object]],
              node: onnx.NodeProto | None = None) -> None:
        """One node's resolved relations: (refs, the spaces they name, the relation)."""
        for refs, spaces, rel in relations:
            inputs = [(r, s) for r, s in zip(refs, spaces) if r.side == "in" and s[0] not in self.constants]
            outputs = [s for r, s in zip(refs, spaces) if r.side == "out"]
            if outputs:
                roles = {r.role for r, s in zip(refs, spaces) if s[0] in self.constants}
                state = self._output_state(who, roles, inputs, rel)
                for s in outputs:
                    if state is not None and s not in self.nonzero:
                        self.nonzero[s] = state
                        if state.finite and len(outputs) == 1:
                            self._pending[s] = (node, refs, spaces, rel)
            elif isinstance(rel, Couple):
                self._consumed(who, spaces, [s for _, s in inputs], node)
        if node is not None and self._from_constants(node):
            self.computed.update(o for o in node.output if o)

    def _from_constants(self, node: onnx.NodeProto) -> bool:
        inputs = [i for i in node.input if i]
        return bool(inputs) and not subgraphs_of(node) and all(
            i in self.constants or i in self.computed for i in inputs)

    def _input_state(self, ref: Ref, space: Space) -> NonZero | None:
        """A computed constant as an element-wise operand is not zeroed with the channel: it keeps its value."""
        if space[0] in self.computed and ref.role in (Role.CONST, None):
            return NonZero(f"'{space[0]}' is computed from constants alone, so nothing zeroes its removed channels")
        return self.nonzero.get(space)

    def _output_state(self, who: str, roles: set, inputs: list[tuple[Ref, Space]], rel: object) -> NonZero | None:
        """`roles`: those of the constants in the relation."""
        if isinstance(rel, Couple) and rel.at_zero:
            return NonZero(f"{who}: {rel.at_zero}", rel.finite)
        if roles & set(_MULTIPLYING):
            return None
        states = [self._input_state(r, s) for r, s in inputs]
        if isinstance(rel, Couple) and rel.product:
            if Role.CONST in roles or not all(states):
                return next((s for s in states if s is not None and not s.finite), None)
        return next((s for s in states if s is not None), None)

    def _consumed(self, who: str, spaces: list[Space], inputs: list[Space], node: onnx.NodeProto | None) -> None:
        """A couple with no output (a layer's input axis and its weight's): the channel is summed away here."""
        carrier = next((s for s in inputs if s in self.nonzero), None)
        if carrier is None:
            return
        state, value = self.nonzero[carrier], self.value(carrier)
        refusal = self._fold_refusal(who, node, spaces[0], value)
        if refusal is None:
            self.folds.setdefault((node.name, spaces[0]), Fold(node.name, spaces[0], value))
        else:
            self.lost.setdefault(spaces[0], f"{state.reason}, and {who} sums it in: {refusal}")

    # ------------------------------------------------------------------ the constant a removed channel carries
    def value(self, space: Space) -> np.ndarray | None:
        """What each index of a not-zero space holds when its channel is removed (None: not known). Computed when
        first asked, the spaces it is computed from first (a stack, not recursion: residual streams are deep); most
        not-zero spaces (batch and spatial axes) are never asked about."""
        stack = [space]
        while stack:
            top = stack[-1]
            if top not in self._pending:
                stack.pop()
                continue
            _, refs, spaces, _ = self._pending[top]
            waiting = [s for r, s in zip(refs, spaces) if r.side == "in" and s in self._pending and s not in stack]
            if waiting:
                stack.extend(waiting)
                continue
            self._values[top] = self._value(*self._pending.pop(top))
            stack.pop()
        return self._values.get(space)

    def _value(self, node: onnx.NodeProto | None, refs: list[Ref], spaces: list[Space], rel: object
               ) -> np.ndarray | None:
        """Per index of the relation's output space, what the node makes of a removed channel; None where the
        node is not element-wise or an operand is not known."""
        if isinstance(rel, Compose):
            return self._concatenated(refs, spaces)
        if node is None or not isinstance(rel, Couple) or rule_for(node) not in _ELEMENTWISE + _SPATIAL:
            return None
        out_ref, out_space = next((r, s) for r, s in zip(refs, spaces) if r.side == "out")
        feeds, zero_type = {}, self._zero_dtype(node)
        for position, name in enumerate(node.input):
            coupled = [(r, s) for r, s in zip(refs, spaces) if r.side == "in" and r.index == position]
            feed = self._feed(name, coupled, self._dtype(name) or zero_type, rule_for(node) in _SPATIAL)
            if name and feed is None:
                return None
            feeds[name] = feed
        outputs = _evaluate(node, {k: v for k, v in feeds.items() if k}, ai_onnx_opset(self.index.model) or 0)
        return None if outputs is None else _per_index(outputs[out_ref.index], out_space[1], self._size(out_space))

    def _feed(self, name: str, coupled: list[tuple[Ref, Space]], zero_type: np.dtype,
              spatial: bool = False) -> np.ndarray | None:
        """An input as the evaluation sees it: a coupled activation as one element per channel (its constants, or
        zeros of `zero_type`), spread over a spatial extent for a pooling op; a constant as it is (zeros where the
        harness zeroes it with the channel)."""
        array = self.index.array(name) if name else None
        if array is not None:
            zeroed = any(r.role in _ZEROED for r, _ in coupled) and name in self.constants
            return np.zeros_like(array) if zeroed else array
        if not coupled or name in self.computed:
            return None  # an activation broadcast over the channels, or a constant nothing computed
        (_, space), shape = coupled[0], self.index.shapes.get(name) or ()
        values = self._values_in(space, zero_type)
        if values is None:
            return None
        values = values.reshape([-1 if a == space[1] else 1 for a in range(len(shape))])
        extent = [_spatial_extent(d) if spatial and a >= 2 and a != space[1] else 1 for a, d in enumerate(shape)]
        return np.broadcast_to(values, np.broadcast_shapes(values.shape, extent)).copy()

    def _values_in(self, space: Space, zero_type: np.dtype) -> np.ndarray | None:
        """What each removed channel holds in an activation space: zeros where the flow found nothing else."""
        values = self.value(space) if space in self.nonzero else np.zeros(self._size(space) or 0, zero_type)
        return None if values is None or not values.size else values

    def _concatenated(self, refs: list[Ref], spaces: list[Space]) -> np.ndarray | None:
        """A Concat's output axis: its parts' values one after another (parts that are constants: unknown)."""
        if refs[0].side != "out" or any(r.side != "in" or s[0] in self.computed or s[0] in self.constants
                                        for r, s in zip(refs[1:], spaces[1:])):
            return None
        known = [self.value(s) for s in spaces[1:] if s in self.nonzero]
        zero_type = next((v.dtype for v in known if v is not None), np.dtype(np.float32))
        parts = [self._values_in(s, zero_type) for s in spaces[1:]]
        return None if any(p is None for p in parts) else np.concatenate(parts)

    def _size(self, space: Space) -> int | None:
        size = (self.index.shapes.get(space[0]) or ())[space[1]]
        return size if isinstance(size, int) else None

    def _zero_dtype(self, node: onnx.NodeProto) -> np.dtype:
        """The type of a zero activation whose type no value_info declares: that of the node's floating constant
        operands (element-wise operands share one type; a Pow's exponent may not), else of any constant operand,
        else float32. A zero is zero in any type."""
        types = [a.dtype for a in (self.index.array(i) for i in node.input if i in self.constants) if a is not None]
        return next((t for t in types if t.kind == "f"), types[0] if types else np.dtype(np.float32))

    def _dtype(self, name: str) -> np.dtype | None:
        if self._types is None:
            graph = self.index.model.graph
            self._types = {vi.name: vi.type.tensor_type.elem_type
                           for vi in [*graph.input, *graph.output, *graph.value_info]}
        elem = self._types.get(name)
        return helper.tensor_dtype_to_np_dtype(elem) if elem else None

    # ------------------------------------------------------------------ folding into the consumer's bias
    def _fold_refusal(self, who: str, node: onnx.NodeProto | None, space: Space, value: np.ndarray | None
                      ) -> str | None:
        """Why the constant `value` a removed channel carries into `space` cannot be folded into the consuming
        layer's bias; None where it can."""
        lost = "a removed channel's constant contribution is lost"
        layer = describe(node, self.index) if node is not None else None
        if value is None or layer is None or space[0] != node.input[0]:
            return lost
        if not np.all(np.isfinite(value)):
            return f"{lost} (not finite)"
        if layer.quantized or node.output[0] in self.index.body_values:
            return f"{lost} (a quantized layer, or one inside a subgraph, has no float bias to take it)"
        if _bias_stored_outside(layer, self.index):
            return f"{lost} (the bias of {who} stays in the data file of a lazily opened model)"
        return _layer_refusal(layer, self.index, who, lost)


def _bias_stored_outside(layer: Layer, index: GraphIndex) -> bool:
    """The bias is an external tensor of a lazily opened model: surgery copies such tensors, it does not change them."""
    site = layer.bias
    holder = next((n for n in [layer.node, *index.consumers.get(layer.node.output[0], [])]
                   if site is not None and n.name == site.node), None)
    name = holder.input[site.input] if holder is not None and site.input < len(holder.input) else ""
    return name in index.initializers and lazy_tensors.is_external(index.initializers[name])


def _layer_refusal(layer: Layer, index: GraphIndex, who: str, lost: str) -> str | None:
    """A layer sums a constant input channel into each output the same way everywhere, so a bias can take it:
    a matrix layer always; a Conv where no padding cuts its kernel (at the borders it would see fewer constants)."""
    if isinstance(layer, MatrixLayer):
        return None
    if not isinstance(layer, ConvLayer) or layer.groups != 1:
        return f"{lost} ({who} does not sum it the same way at every output)"
    bias = layer.node.input[2] if len(layer.node.input) > 2 else ""
    if bias and bias not in index.initializers:
        return f"{lost} (the bias of {who} is computed at run time)"
    spatial = (index.shapes.get(layer.node.input[0]) or ())[2:]
    if layer.geometry.auto_pad.startswith("SAME") and not all(isinstance(d, int) for d in spatial):
        return f"{lost} (the padding of {who} depends on a run-time size)"
    spatial = [d if isinstance(d, int) else 1 for d in spatial]  # explicit pads: the sizes are not read
    if any(p for side in layer.geometry.padding(spatial) for p in side):
        return (f"{lost}: {who} pads its input with zeros, so at the borders it sums less of the constant than a "
                f"bias would add")
    return None


def _spatial_extent(size: object) -> int:
    return size if isinstance(size, int) and size <= _EXTENT else _EXTENT


def _evaluate(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opset: int) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator  # loaded only where a removed channel carries a constant
    try:
        return ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)
    except Exception:  # noqa: BLE001 - an op the reference cannot evaluate here: the value stays unknown
        return None


def _per_index(result: np.ndarray, axis: int, size: int | None) -> np.ndarray | None:
    """`result` as one value per index of `axis` (`size` of them), where it is the same along every other axis;
    None where it is not (a constant that varies over space) or the sizes do not line up."""
    result = np.asarray(result)
    if size is None or axis >= result.ndim or result.shape[axis] not in (1, size) or result.dtype.kind not in "fiub":
        return None
    rows = np.moveaxis(result, axis, 0).reshape(result.shape[axis], -1)
    if rows.shape[1] == 0 or not np.all(rows == rows[:, :1]):
        return None
    return np.broadcast_to(rows[:, 0], (size,)).copy()
