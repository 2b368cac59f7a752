"""Ops that move, merge, split or cut axes: Reshape family, Transpose, Concat, Split, Slice, Pad, Resize, Gather."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..graph import Dims, node_attr
from .registry import (Barrier, Compose, Couple, Expand, FixContext, In, NodeView, Out, Pseudo, Rule, compose, couple,
                       expand, identity_couples, is_static, rule)


def reshape_relations(src: Dims, dst: Dims, tile_splits: int = 0) -> list:
    """Line up the axes of a reshape by products. A 1:1 block couples; several source axes merged into one
    destination axis make it an expansion of the outermost source axis (Flatten into a linear layer); one source axis
    split into several makes it an expansion of the outermost destination axis (heads out of a hidden dimension).
    With `tile_splits`, a split axis is instead its inner part repeated once per index of the outer axis (q/k/v
    packed in one projection, channel shuffle); the inner part is in turn an expansion of its own outermost axis, or,
    with `tile_splits` 2, the innermost axis repeated once per index of all the others (split attention's
    (card * r * C) viewed (card, r, C)).
    Merged last axes are then the innermost one repeated (channels last, flattened after a permute).
    Axes not related this way, and many-to-many blocks, stay frozen."""
    relations = []
    src, dst = _complete(src, dst), _complete(dst, src)
    for src_axes, dst_axes in _reshape_blocks(src, dst):
        if len(src_axes) == 1 and len(dst_axes) == 1:
            relations.append(couple(In(0, src_axes[0]), Out(0, dst_axes[0])))
        elif len(dst_axes) == 1 and tile_splits and _flattens_the_last_axes(src, src_axes, dst, dst_axes):
            relations.append(_tiled_merge(dst_axes[0], src, src_axes))
        elif len(dst_axes) == 1:
            last = _flattens_the_last_axes(src, src_axes, dst, dst_axes)
            relations.append(expand(Out(0, dst_axes[0]), In(0, src_axes[0]), _product(src, src_axes[1:]),
                                    alternative=In(0, src_axes[-1]) if last else None))
        elif len(src_axes) == 1 and tile_splits:
            relations += _tiled_split(src_axes[0], dst, dst_axes, tile_splits)
        elif len(src_axes) == 1:
            relations.append(expand(In(0, src_axes[0]), Out(0, dst_axes[0]), _product(dst, dst_axes[1:]),
                                    alternative=Out(0, dst_axes[1])))
    return relations


def _flattens_the_last_axes(src: Dims, src_axes: list[int], dst: Dims, dst_axes: list[int]) -> bool:
    """The block merges the input's last axes into the output's last one (flatten into a linear layer): the only
    merge read the other way round too, where the innermost axis may be the channels (after a permute)."""
    return src_axes[-1] == len(src) - 1 and dst_axes[-1] == len(dst) - 1 and src[src_axes[-1]] != 1


def _tiled_merge(dst_axis: int, src: Dims, src_axes: list[int]) -> Compose:
    """Axes merged into one read as the innermost repeated once per index of the others: channels last, flattened
    with the spatial axes before them (a permute + flatten into a linear layer)."""
    return compose(Out(0, dst_axis), *[In(0, src_axes[-1])] * _product(src, src_axes[:-1]))


def _tiled_split(src_axis: int, dst: Dims, dst_axes: list[int], levels: int) -> list:
    repeats, rest = dst[dst_axes[0]], dst_axes[1:]
    if len(rest) == 1 or levels > 1:
        return [compose(In(0, src_axis), *[Out(0, rest[-1])] * _product(dst, dst_axes[:-1]))]
    part = Pseudo(f"part{src_axis}", _product(dst, rest))
    return [compose(In(0, src_axis), *[part] * repeats),
            expand(part, Out(0, rest[0]), _product(dst, rest[1:]), alternative=Out(0, rest[1]))]


def _product(shape: Dims, axes: list[int]) -> int:
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))


def _leading_dynamic(src: Dims, dst: Dims) -> int:
    """How many leading run-time sizes (batch, sequence) pair up one to one: the same count on both sides, no
    run-time size after them, and equal static products of the rest. Their names may differ where shape
    inference lost track (a Transpose after a reshape it could not follow)."""
    count = next((k for k, d in enumerate(src) if is_static(d)), len(src))
    if count == 0 or count != next((k for k, d in enumerate(dst) if is_static(d)), len(dst)):
        return 0
    if not all(is_static(d) for d in list(src[count:]) + list(dst[count:])):
        return 0
    products = [int(np.prod(shape[count:], dtype=np.int64)) for shape in (src, dst)]
    return count if products[0] == products[1] else 0


def _reshape_blocks(src: Dims, dst: Dims) -> list[tuple[list[int], list[int]]]:
    leading = _leading_dynamic(src, dst)
    blocks = [([k], [k]) for k in range(leading)]
    i = j = leading
    while True:
        while i < len(src) and src[i] == 1:
            i += 1
        while j < len(dst) and dst[j] == 1:
            j += 1
        if i == len(src) or j == len(dst):
            if i != len(src) or j != len(dst):
                raise Barrier("reshape sizes do not line up")
            return blocks
        if src[i] == dst[j] and src[i] is not None or _only_dynamic_left(src, i, dst, j):
            blocks.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        src_axes, dst_axes = [i], [j]
        p, q = _static(src[i]), _static(dst[j])
        i, j = i + 1, j + 1
        while p != q:
            if p < q:
                if i == len(src):
                    raise Barrier("reshape sizes do not line up")
                p *= _static(src[i]); src_axes.append(i); i += 1
            else:
                if j == len(dst):
                    raise Barrier("reshape sizes do not line up")
                q *= _static(dst[j]); dst_axes.append(j); j += 1
        blocks.append((src_axes, dst_axes))


def _complete(shape: Dims, other: Dims) -> Dims:
    """Fill the one unknown size of `shape` from the element count of `other` (a -1 beside a run-time batch, which
    shape inference leaves unnamed). Run-time sizes named the same on both sides cancel out."""
    unmatched = list(other)
    unknown = []
    for k, d in enumerate(shape):
        if is_static(d):
            continue
        if d is not None and d in unmatched:
            unmatched.remove(d)
        else:
            unknown.append(k)
    if len(unknown) != 1 or not all(is_static(d) for d in unmatched):
        return shape
    known = int(np.prod([d for d in shape if is_static(d)], dtype=np.int64))
    total = int(np.prod(unmatched, dtype=np.int64))
    if known == 0 or total % known:
        return shape
    completed = list(shape)
    completed[unknown[0]] = total // known
    return tuple(completed)


def _only_dynamic_left(src: Dims, i: int, dst: Dims, j: int) -> bool:
    """Two run-time sizes face each other and are the last on both sides (a batch axis reshaped with -1): they must
    be equal when the static sizes multiply to the same total."""
    if is_static(src[i]) or is_static(dst[j]):
        return False
    if any(not is_static(d) for d in list(src[i + 1:]) + list(dst[j + 1:])):
        return False
    statics = [int(np.prod([d for d in shape if is_static(d)], dtype=np.int64)) for shape in (src, dst)]
    return sum(not is_static(d) for d in src) == sum(not is_static(d) for d in dst) == 1 and statics[0] == statics[1]


def _static(dim: object) -> int:
    if not is_static(dim):
        raise Barrier("reshape of a dimension with run-time size")
    return int(dim)


@rule("Flatten", "Squeeze", "Unsqueeze")
def reshape_like(n: NodeView) -> Rule:
    # Their axes attributes or inputs only name size-1 axes or a split point: nothing to fix after pruning.
    return Rule(*reshape_relations(n.in_shape(0), _completed_out_shape(n), tile_splits=n.tile))


def _completed_out_shape(n: NodeView) -> Dims:
    out = _complete(n.out_shape(0), n.in_shape(0))
    n.refine_out_shape(0, out)
    return out


@rule("Reshape")
def reshape(n: NodeView) -> Rule:
    entries = _target_entries(n)
    if entries is None:
        raise Barrier("target shape computed at run time")
    if n.attr("allowzero", 0) and any(e.value == 0 for e in entries):
        raise Barrier("allowzero with a zero dimension")
    relations = reshape_relations(n.in_shape(0), _completed_out_shape(n), tile_splits=n.tile)
    # An output axis whose size is computed at run time must keep its size (it and its block stay frozen), unless
    # the size is the product of exactly the input axes merged into it, read by Shape: it then follows pruning.
    dynamic = {j for j, e in enumerate(entries) if e.value is None and not _follows(n, j, e.size, relations)}
    relations = [r for r in relations if not any(ref.side == "out" and ref.axis in dynamic for ref in _refs(r))]
    return Rule(*relations, fixup=_fix_reshape_target)


@dataclass(frozen=True)
class _TargetEntry:
    """One entry of a Reshape target or Expand shape: its value (None when computed at run time), the constant that
    holds it, and what it is made of when it is computed from shapes (`size`)."""

    value: int | None
    node: onnx.NodeProto
    input_index: int
    position: int
    size: "_Size | None" = None


def _target_entries(n: NodeView) -> list[_TargetEntry] | None:
    """The target (input 1) as constants, also when exporters build it with Concat (`x.view(x.size(0), -1)`); None
    when it cannot be read. A Concat shared with other nodes is not editable, so its constants count as run-time
    values. Run-time entries carry what shapes they are computed from."""
    target = n.const(1)
    if target is not None:
        return [_TargetEntry(int(v), n.node, 1, k) for k, v in enumerate(target.reshape(-1))]
    concat = n.index.producer.get(n.node.input[1])
    if concat is None or concat.op_type != "Concat":
        sizes = size_entries(n.index, n.node.input[1])
        return None if sizes is None else [_TargetEntry(None, n.node, 1, k, s) for k, s in enumerate(sizes)]
    shared = len(n.index.consumers.get(n.node.input[1], [])) > 1
    entries: list[_TargetEntry] = []
    for i, name in enumerate(concat.input):
        piece, sizes = n.index.array(name), size_entries(n.index, name)
        if piece is not None:
            entries += [_TargetEntry(None if shared else int(v), concat, i, k) for k, v in enumerate(piece.reshape(-1))]
        elif sizes is not None:
            entries += [_TargetEntry(None, concat, i, k, s) for k, s in enumerate(sizes)]
        else:
            return None
    return entries


def _follows(n: NodeView, j: int, size: "_Size | None", relations: list) -> bool:
    """Output axis j's run-time size is the product of the sizes of exactly the input axes that the reshape maps
    onto it (a 1:1 axis, or the axes merged into it): `x.reshape(B, C, H * W)` from `B, C, H, W = x.shape`."""
    if size is None or size.factor != 1 or not size.axes or any(t != n.node.input[0] for t, _ in size.axes):
        return False
    src = n.in_shape(0)
    axes = sorted(a for _, a in size.axes)
    contiguous = set(range(axes[0], axes[-1] + 1)) - set(axes)
    if any(src[a] != 1 for a in contiguous):
        return False
    for rel in relations:
        if isinstance(rel, Couple) and Out(0, j) in rel.refs:
            return len(axes) == 1 and In(0, axes[0]) in rel.refs
        if isinstance(rel, Expand) and rel.fine == Out(0, j) and rel.coarse == In(0, axes[0]):
            inner = [src[a] for a in axes[1:]]
            return all(is_static(d) for d in inner) and int(np.prod(inner, dtype=np.int64)) == rel.inner
    return False


def _refs(relation) -> tuple:
    if isinstance(relation, Couple):
        return relation.refs
    if isinstance(relation, Expand):
        return relation.fine, relation.coarse
    return (relation.whole, *relation.parts)


def _fix_reshape_target(n: NodeView, ctx: FixContext) -> None:
    _fix_target_entries(n, ctx, first_axis=0)


def _fix_target_entries(n: NodeView, ctx: FixContext, first_axis: int) -> None:
    """Write the new size of output axis first_axis + k into entry k of the target (input 1) where it is a constant
    (or a value the analysis knows), constant by constant; run-time entries follow by themselves."""
    pieces: dict[tuple[str, int], tuple[onnx.NodeProto, np.ndarray]] = {}
    for k, entry in enumerate(_target_entries(n)):
        if entry.value is None or entry.value in (0, -1, 1):  # 0 copies the input dim, -1 is inferred, 1 stays 1
            continue
        key = (entry.node.name, entry.input_index)
        if key not in pieces:
            pieces[key] = (entry.node, n.index.array(entry.node.input[entry.input_index]).astype(np.int64).copy())
        pieces[key][1].reshape(-1)[entry.position] = ctx.new_size(Out(0, first_axis + k))
    for (_, input_index), (node, value) in pieces.items():
        ctx.set_const_input(input_index, value, node=node)


@rule("Shape")
def shape_of(n: NodeView) -> Rule:
    """Shape's output values are the sizes of the axes it reads: those stay as they are, unless every use of a
    size is a Reshape target or Expand shape entry that a fixup rewrites or that follows the axis at run time; the
    axes it does not read are free."""
    rank = len(n.in_shape(0))
    start, end = _shape_bounds(n, rank)
    read = {start + p for p in _read_positions(n, end - start)}
    return Rule(*[couple(In(0, a)) for a in range(rank) if a not in read or _size_follows_pruning(n, a)])


def _shape_bounds(n: NodeView, rank: int) -> tuple[int, int]:
    start = _clamp(int(n.attr("start", 0)), rank)
    end = _clamp(int(n.attr("end", rank)), rank) if n.attr("end") is not None else rank
    return start, end


# ----------------------------------------------------------------------------------------------- sizes from shapes

@dataclass(frozen=True)
class _Size:
    """A size computed from shapes: `factor` times the run-time sizes of `axes` ((tensor, axis) pairs)."""

    factor: int
    axes: tuple[tuple[str, int], ...] = ()

    def times(self, other: "_Size") -> "_Size":
        return _Size(self.factor * other.factor, tuple(sorted(self.axes + other.axes)))


def size_entries(index, name: str, depth: int = 0) -> list[_Size | None] | None:
    """The entries of a small integer value as products of axis sizes, followed from Shape through Gather / Slice /
    Concat / Unsqueeze / Squeeze / Cast / Mul; an entry is None where other arithmetic made it; None when the value
    is not such a list (or its length is unknown)."""
    node, shape = index.producer.get(name), index.shapes.get(name)
    if shape is None or len(shape) > 1:
        return None  # sizes travel as scalars and 1-D lists only
    if name in index.initializers or node is None or depth > 32 or node.domain not in ("", "ai.onnx"):
        value = index.array(name) if name in index.initializers else None
        if value is None or value.dtype.kind not in "iu" or value.size > 64:
            return None
        return [_Size(int(v)) for v in value.reshape(-1)]
    handler = _SIZE_OPS.get(node.op_type)
    return handler(index, node, depth + 1) if handler else _opaque_entries(index, name)


def _opaque_entries(index, name: str) -> list[None] | None:
    shape = index.shapes.get(name)
    if shape is None or len(shape) > 1 or not all(is_static(d) for d in shape):
        return None
    return [None] * int(np.prod(shape, dtype=np.int64))


def _shape_sizes(index, node: onnx.NodeProto, depth: int) -> list[_Size | None] | None:
    shape = index.shapes.get(node.input[0])
    if shape is None:
        return None
    start = _clamp(int(node_attr(node, "start", 0)), len(shape))
    end = _clamp(int(node_attr(node, "end", len(shape))), len(shape))
    return [_Size(1, ((node.input[0], a),)) for a in range(start, end)]


def _gather_sizes(index, node: onnx.NodeProto, depth: int) -> list[_Size | None] | None:
    data, indices = size_entries(index, node.input[0], depth), index.array(node.input[1])
    if data is None or indices is None or node_attr(node, "axis", 0) not in (0, -1) or indices.ndim > 1:
        return None
    return [data[int(i) % len(data)] for i in indices.reshape(-1)] if data else None


def _slice_sizes(index, node: onnx.NodeProto, depth: int) -> list[_Size | None] | None:
    data = size_entries(index, node.input[0], depth)
    bounds = [index.array(i) if i else None for i in list(node.input[1:5]) + [""] * (5 - len(node.input))]
    if data is None or bounds[0] is None or bounds[1] is None or bounds[0].size != 1:
        return None
    axes, steps = (list(x.reshape(-1)) if x is not None else None for x in bounds[2:4])
    if axes not in (None, [0], [-1]) or steps not in (None, [1]):
        return None
    begin, end = (_clamp(int(b.reshape(-1)[0]), len(data)) for b in bounds[:2])
    return data[begin:end]


def _concat_sizes(index, node: onnx.NodeProto, depth: int) -> list[_Size | None] | None:
    parts = [size_entries(index, name, depth) for name in node.input if name]
    return None if any(p is None for p in parts) else [e for p in parts for e in p]


def _same_sizes(index, node: onnx.NodeProto, depth: int) -> list[_Size | None] | None:
    return size_entries(index, node.input[0], depth)


def _mul_sizes(index, node: onnx.NodeProto, depth: int) -> list[_Size | None] | None:
    left, right = (size_entries(index, name, depth) for name in node.input[:2])
    if left is None or right is None or len(left) != len(right) and 1 not in (len(left), len(right)):
        return None
    count = max(len(left), len(right))
    pairs = [(left[k % len(left)], right[k % len(right)]) for k in range(count)]
    return [a.times(b) if a is not None and b is not None else None for a, b in pairs]


_SIZE_OPS = {"Shape": _shape_sizes, "Gather": _gather_sizes, "Slice": _slice_sizes, "Concat": _concat_sizes,
             "Unsqueeze": _same_sizes, "Squeeze": _same_sizes, "Cast": _same_sizes, "Identity": _same_sizes,
             "Reshape": _same_sizes, "Flatten": _same_sizes, "Mul": _mul_sizes}
# The input through which each of these ops passes sizes on (None: every input).
_SIZE_DATA_INPUT = {"Gather": 0, "Slice": 0, "Unsqueeze": 0, "Squeeze": 0, "Cast": 0, "Identity": 0, "Reshape": 0,
                    "Flatten": 0, "Concat": None, "Mul": None}


def _size_follows_pruning(n: NodeView, axis: int) -> bool:
    """Every value computed from the size of this axis ends in Reshape targets and Expand shapes whose entries a
    fixup rewrites with the pruned size or that follow the axis at run time; a graph output, or any other use
    (a size in arithmetic, a Slice bound, a Range, ConstantOfShape) keeps the axis."""
    index, axis_space = n.index, (n.node.input[0], axis)
    todo, seen = [n.node.output[0]], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in index.graph_outputs:
            return False
        for consumer in index.consumers.get(name, []):
            data_input = _SIZE_DATA_INPUT.get(consumer.op_type, -1) if consumer.domain in ("", "ai.onnx") else -1
            if data_input is None or data_input >= 0 and consumer.input[data_input] == name:
                todo += [o for o in consumer.output if o and _reads(index, o, axis_space)]
            elif not _target_follows(n, consumer, name, axis_space):
                return False
    return True


def _reads(index, name: str, axis_space: tuple[str, int]) -> bool:
    sizes = size_entries(index, name)
    return sizes is None or any(s is None or axis_space in s.axes for s in sizes)


def _target_follows(n: NodeView, consumer: onnx.NodeProto, name: str, axis_space: tuple[str, int]) -> bool:
    """`name` is the target of a Reshape or Expand or the sizes of a Resize (the node's rule holds), and each entry
    reading the axis is rewritten by the fixup or follows the axis."""
    position, handled_by = _TARGET_RULES.get(consumer.op_type, (-1, None))
    inputs = list(consumer.input)
    if handled_by is None or consumer.domain not in ("", "ai.onnx") or inputs.count(name) != 1 or \
            inputs.index(name) != position:
        return False
    sizes = size_entries(n.index, name)
    try:
        handled = handled_by(NodeView(consumer, n.index, n.opset))
    except Barrier:
        return False
    return sizes is not None and all(k in handled for k, s in enumerate(sizes) if s is None or axis_space in s.axes)


def _reshape_handled(view: NodeView) -> set[int]:
    """Target entries whose axis the Reshape rule keeps in play: a fixup writes them, or they follow pruning."""
    relations = reshape(view).relations
    return {j for j, e in enumerate(_target_entries(view))
            if e.value is not None or _follows(view, j, e.size, relations)}


def _read_positions(n: NodeView, length: int) -> set[int]:
    """Which entries of a Shape output its consumers read: Gather and Slice with constant indices read a few."""
    read: set[int] = set()
    everything = set(range(length))
    for consumer in n.index.consumers.get(n.node.output[0], []):
        inputs = [n.index.array(i) if i else None for i in consumer.input]
        if consumer.op_type == "Gather" and inputs[1] is not None and node_attr(consumer, "axis", 0) == 0:
            read |= {int(i) % length for i in inputs[1].reshape(-1)}
        elif (consumer.op_type == "Slice" and len(inputs) >= 3 and inputs[1] is not None and inputs[2] is not None
              and all(x is None or list(x.reshape(-1)) in ([0], [1]) for x in inputs[3:5])):
            read |= set(range(_clamp(int(inputs[1][0]), length), _clamp(int(inputs[2][0]), length)))
        else:
            return everything
    if n.node.output[0] in n.index.graph_outputs:
        return everything
    return read


@rule("Expand")
def expand_to(n: NodeView) -> Rule:
    """Broadcast to a shape (aligned on the last axis). An axis the input has at full size couples; an axis
    broadcast from size 1 is a fresh one, whose size its shape entry gives: written by the fixup, or following a
    Shape at run time. A removed channel there holds the broadcast values, not zeros."""
    entries = _target_entries(n)
    if entries is None:
        raise Barrier("shape computed at run time")
    src, dst = n.in_shape(0), n.out_shape(0)
    lead, first = len(dst) - len(src), len(dst) - len(entries)
    handled = {first + k for k in _expand_handled(n)}
    relations = []
    for j in range(len(dst)):
        i = j - lead
        kept = j < first or j in handled or entries[j - first].value == 1
        if i >= 0 and is_static(src[i]) and src[i] == dst[j] != 1 and kept:
            relations.append(couple(In(0, i), Out(0, j)))
        elif j in handled and (i < 0 or src[i] == 1) and dst[j] != 1:
            relations.append(couple(Out(0, j), at_zero="Expand broadcasts the same values into a removed channel"))
    return Rule(*relations, fixup=_fix_expand_shape)


def _expand_handled(view: NodeView) -> set[int]:
    """Shape entries the Expand rule keeps in play: known (the fixup writes them), or the size of the input's own
    axis at that place (`x.expand(x.shape)`), which follows pruning."""
    entries = _target_entries(view) or []
    lead = len(view.out_shape(0)) - len(view.in_shape(0))
    first = len(view.out_shape(0)) - len(entries)
    return {k for k, e in enumerate(entries) if e.value is not None and e.value != 0 or e.size is not None
            and e.size.factor == 1 and e.size.axes == ((view.node.input[0], first + k - lead),)}


def _fix_expand_shape(n: NodeView, ctx: FixContext) -> None:
    _fix_target_entries(n, ctx, first_axis=len(n.out_shape(0)) - len(_target_entries(n)))


@rule("Tile")
def tile(n: NodeView) -> Rule:
    """Each output axis is `repeats` copies of the input axis one after another, as a Concat of the input with
    itself; the repeats do not change with pruning."""
    rank = len(n.in_shape(0))
    repeats = n.ints("repeats", 1)
    if repeats is None or len(repeats) != rank:
        raise Barrier("repeats unknown")
    relations = [couple(In(0, a), Out(0, a)) for a, r in enumerate(repeats) if r == 1]
    relations += [compose(Out(0, a), *[In(0, a)] * r) for a, r in enumerate(repeats) if r > 1]
    return Rule(*relations)


@rule("Transpose")
def transpose(n: NodeView) -> Rule:
    rank = len(n.in_shape(0))
    perm = n.attr("perm") or list(reversed(range(rank)))
    return Rule(*[couple(In(0, int(src)), Out(0, dst)) for dst, src in enumerate(perm)])


@rule("Concat")
def concat(n: NodeView) -> Rule:
    rank = len(n.out_shape(0))
    axis = int(n.attr("axis")) % rank
    inputs = [i for i in range(len(n.node.input)) if n.has_input(i) and n.in_shape(i)[axis] != 0]
    relations = [couple(Out(0, a), *[In(i, a) for i in inputs]) for a in range(rank) if a != axis]
    relations.append(compose(Out(0, axis), *[In(i, axis) for i in inputs]))
    return Rule(*relations)


@rule("Split")
def split(n: NodeView) -> Rule:
    rank = len(n.in_shape(0))
    axis = int(n.attr("axis", 0)) % rank
    outputs = [j for j in range(len(n.node.output))]
    if not all(n.has_output(j) for j in outputs):
        raise Barrier("an output is omitted")
    relations = [couple(In(0, a), *[Out(j, a) for j in outputs]) for a in range(rank) if a != axis]
    relations.append(compose(In(0, axis), *[Out(j, axis) for j in outputs]))
    return Rule(*relations, fixup=_fix_split_sizes)


def _fix_split_sizes(n: NodeView, ctx: FixContext) -> None:
    """Always write explicit sizes: an equal split may become unequal."""
    sizes = np.array([ctx.new_size(Out(j, int(n.attr("axis", 0)))) for j in range(len(n.node.output))], np.int64)
    if n.opset < 13:
        ctx.set_attr("split", [int(s) for s in sizes])
        return
    ctx.remove_attr("num_outputs")
    ctx.set_const_input(1, sizes)


@rule("Slice")
def slice_(n: NodeView) -> Rule:
    """A contiguous cut of an axis: the input axis is [before | output | after]; unsliced axes couple."""
    shape = n.in_shape(0)
    cuts = {a: (begin, end) for _, a, begin, end in _contiguous_cuts(n)}
    sliced = _sliced_axes(n)
    relations = [couple(In(0, a), Out(0, a)) for a in range(len(shape)) if a not in sliced]
    for a, (begin, end) in cuts.items():
        parts = ([Pseudo(f"before{a}", begin)] if begin else []) + [Out(0, a)]
        parts += [Pseudo(f"after{a}", shape[a] - end)] if end < shape[a] else []
        relations.append(compose(In(0, a), *parts))
    return Rule(*relations, fixup=_fix_slice_bounds)


def _sliced_axes(n: NodeView) -> list[int]:
    starts = n.const(1)
    if starts is None or n.const(2) is None:
        raise Barrier("starts/ends computed at run time")
    rank = len(n.in_shape(0))
    return [int(a) % rank for a in (n.ints("axes", 3) or range(starts.size))]


def _contiguous_cuts(n: NodeView) -> list[tuple[int, int, int, int]]:
    """(position in starts, axis, begin, end) for each axis cut with step 1 and a static size; strided or dynamic
    cuts are left out, so those axes stay whole."""
    shape = n.in_shape(0)
    axes = _sliced_axes(n)
    starts, ends = n.const(1).reshape(-1), n.const(2).reshape(-1)
    steps = n.ints("steps", 4) or [1] * starts.size
    cuts = []
    for k, a in enumerate(axes):
        if steps[k] != 1 or not is_static(shape[a]):
            continue
        begin, end = _clamp(int(starts[k]), shape[a]), _clamp(int(ends[k]), shape[a])
        if end > begin:
            cuts.append((k, a, begin, end))
    return cuts


def _clamp(index: int, size: int) -> int:
    index = index + size if index < 0 else index
    return max(0, min(index, size))


def _fix_slice_bounds(n: NodeView, ctx: FixContext) -> None:
    starts, ends = n.const(1).copy().reshape(-1), n.const(2).copy().reshape(-1)
    for k, a, begin, _ in _contiguous_cuts(n):
        new_begin = ctx.new_size(Pseudo(f"before{a}")) if begin else 0
        starts[k], ends[k] = new_begin, new_begin + ctx.new_size(Out(0, a))
    ctx.set_const_input(1, starts)
    ctx.set_const_input(2, ends)


@rule("Pad")
def pad(n: NodeView) -> Rule:
    rank = len(n.in_shape(0))
    pads = n.ints("pads", 1)
    if pads is None:
        raise Barrier("no pads")
    axes = n.ints("axes", 3) if n.opset >= 18 else None
    axes = [int(a) % rank for a in axes] if axes else list(range(rank))
    padded = {a for k, a in enumerate(axes) if pads[k] or pads[k + len(axes)]}
    at_zero = _pad_at_zero(n) if padded else None
    return Rule(*[couple(In(0, a), Out(0, a), at_zero=at_zero) for a in range(rank) if a not in padded])


def _pad_at_zero(n: NodeView) -> str | None:
    """A constant pad value other than 0 fills the border of a removed (zero) channel."""
    mode = n.attr("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return None
    value = n.attr("value", 0.0) if n.opset < 11 else (n.const(2) if n.has_input(2) else 0.0)
    if value is None:
        return "Pad with a value computed at run time fills a removed channel's border"
    return f"Pad fills a removed channel's border with {float(np.asarray(value).reshape(-1)[0]):g}" \
        if np.any(np.asarray(value) != 0) else None


@rule("Resize")
def resize(n: NodeView) -> Rule:
    src, dst = n.in_shape(0), n.out_shape(0)
    if n.has_input(2) and n.const(2) is None:
        raise Barrier("scales computed at run time")
    if n.has_input(3) and n.const(3) is None:  # F.interpolate(x, size=...) beside a run-time batch
        return Rule(*[couple(In(0, a), Out(0, a)) for a in sorted(_resize_following(n))])
    unchanged = [a for a in range(len(src)) if src[a] == dst[a] and is_static(src[a])]
    relations = [couple(In(0, a), Out(0, a)) for a in unchanged]
    return Rule(*relations, fixup=_fix_resize_sizes if n.has_input(3) and n.const(3).size else None)


def _resize_following(n: NodeView) -> set[int]:
    """Axes whose run-time size entry is the size of the input's own axis (read with Shape): unchanged by the
    resize, they follow pruning at run time. The other entries stay as they are, and so do their axes."""
    sizes = size_entries(n.index, n.node.input[3])
    if sizes is None:
        raise Barrier("sizes computed at run time")
    axes = [int(a) % len(n.in_shape(0)) for a in n.attr("axes") or range(len(sizes))]
    return {a for a, size in zip(axes, sizes) if size == _Size(1, ((n.node.input[0], a),))}


def _resize_handled(view: NodeView) -> set[int]:
    """Sizes entries the Resize rule keeps in play: all when they are known (the fixup writes them), else those
    that follow the input's own axis."""
    sizes = size_entries(view.index, view.node.input[3]) or []
    if view.const(3) is not None:
        return set(range(len(sizes)))
    axes = [int(a) % len(view.in_shape(0)) for a in view.attr("axes") or range(len(sizes))]
    following = _resize_following(view)
    return {k for k, a in enumerate(axes) if a in following}


def _fix_resize_sizes(n: NodeView, ctx: FixContext) -> None:
    sizes = n.const(3).astype(np.int64).copy()
    axes = n.attr("axes") or list(range(len(n.in_shape(0))))
    for k, a in enumerate(axes):
        sizes[k] = ctx.new_size(Out(0, int(a)))
    ctx.set_const_input(3, sizes)


@rule("Gather")
def gather(n: NodeView) -> Rule:
    """Output = data[:axis] + indices.shape + data[axis+1:]: every data axis but the gathered one keeps its place."""
    data_rank, idx_rank = len(n.in_shape(0)), len(n.in_shape(1))
    axis = int(n.attr("axis", 0)) % data_rank
    relations = [couple(In(0, a), Out(0, a)) for a in range(axis)]
    relations += [couple(In(1, k), Out(0, axis + k)) for k in range(idx_rank)]
    relations += [couple(In(0, a), Out(0, a - 1 + idx_rank)) for a in range(axis + 1, data_rank)]
    return Rule(*relations)


REDUCE = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


@rule(*REDUCE)
def reduce(n: NodeView) -> Rule:
    """Kept axes couple with the output; each reduced axis is consumed alone, like a layer's input channels: a
    removed (zero) channel adds nothing to a sum, and REDUCED_INEXACT names the ops where it does change the result."""
    rank = len(n.in_shape(0))
    axes = n.ints("axes", 1)
    if not axes and n.attr("noop_with_empty_axes", 0):
        return Rule(*identity_couples(n))
    reduced = {a % rank for a in axes} if axes else set(range(rank))  # no axes: every axis
    at_zero, finite = REDUCE_AT_ZERO.get(n.op, (None, True))
    inexact = REDUCED_INEXACT.get(n.op)
    consumed = [couple(In(0, a), inexact=inexact and f"{n.op} over axis {a} {inexact}") for a in sorted(reduced)]
    return Rule(*_kept_axes(rank, reduced, bool(n.attr("keepdims", 1)), at_zero, finite), *consumed)


# Reductions of zeros that are not zero (of n zeros): what a removed channel becomes, and whether it is finite.
REDUCE_AT_ZERO = {"ReduceLogSumExp": ("ReduceLogSumExp of zeros = log n", True),
                  "ReduceLogSum": ("ReduceLogSum of zeros = -inf", False)}

# Reductions OVER the channels that a removed (zero) channel changes: why. Sum, SumSquare, L1, L2 and LogSum (the log
# of a sum) add nothing for a zero, so pruning the reduced axis is exact for them.
REDUCED_INEXACT = {
    "ReduceMean": "divides by the number of channels, which pruning lowers",
    "ReduceMax": "counts a removed (zero) channel: the maximum where every kept one is negative",
    "ReduceMin": "counts a removed (zero) channel: the minimum where every kept one is positive",
    "ReduceProd": "multiplies in a removed (zero) channel: the original product is 0",
    "ReduceLogSumExp": "adds exp(0) = 1 for each removed (zero) channel",
}


def _kept_axes(rank: int, reduced: set[int], keepdims: bool, at_zero: str | None = None, finite: bool = True) -> list:
    relations, out_axis = [], 0
    for a in range(rank):
        if a not in reduced:
            relations.append(couple(In(0, a), Out(0, out_axis), at_zero=at_zero, finite=finite))
        if a not in reduced or keepdims:
            out_axis += 1
    return relations


@rule("ArgMax", "ArgMin")
def arg_reduce(n: NodeView) -> Rule:
    rank = len(n.in_shape(0))
    return Rule(*_kept_axes(rank, {int(n.attr("axis", 0)) % rank}, bool(n.attr("keepdims", 1))))


@rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(n: NodeView) -> Rule:
    rank = len(n.in_shape(0))
    axis = int(n.attr("axis", -1 if n.opset >= 13 else 1)) % rank
    # Before opset 13 the op flattens every axis from `axis` on into one.
    normalised = {axis} if n.opset >= 13 else set(range(axis, rank))
    at_zero = f"{n.op} over the other axes of a removed (zero) channel is not 0"  # uniform, -log n, one-hot
    return Rule(*[couple(In(0, a), Out(0, a), at_zero=at_zero) for a in range(rank) if a not in normalised])


# The ops whose input (at this position) may hold sizes read with Shape, and which of its entries their rule handles.
_TARGET_RULES = {"Reshape": (1, _reshape_handled), "Expand": (1, _expand_handled), "Resize": (3, _resize_handled)}
