"""Ops that move, merge, split or cut axes: Reshape family, Transpose, Concat, Split, Slice, Pad, Resize, Gather."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..graph import Dims, node_attr
from .registry import (Barrier, Couple, Expand, FixContext, In, NodeView, Out, Pseudo, Rule, compose, couple, expand,
                       identity_couples, is_static, rule)


def reshape_relations(src: Dims, dst: Dims, tile_splits: bool = False) -> list:
    """Line up the axes of a reshape by products. A 1:1 block couples; several source axes merged into one
    destination axis make it an expansion of the outermost source axis (Flatten into a linear layer); one source axis
    split into several makes it an expansion of the outermost destination axis (heads out of a hidden dimension).
    With `tile_splits`, a split axis is instead its inner part repeated once per index of the outer axis (q/k/v
    packed in one projection, channel shuffle); the inner part is in turn an expansion of its own outermost axis.
    Axes not related this way, and many-to-many blocks, stay frozen."""
    relations = []
    src, dst = _complete(src, dst), _complete(dst, src)
    for src_axes, dst_axes in _reshape_blocks(src, dst):
        if len(src_axes) == 1 and len(dst_axes) == 1:
            relations.append(couple(In(0, src_axes[0]), Out(0, dst_axes[0])))
        elif len(dst_axes) == 1:
            relations.append(expand(Out(0, dst_axes[0]), In(0, src_axes[0]), _product(src, src_axes[1:])))
        elif len(src_axes) == 1 and tile_splits:
            relations += _tiled_split(src_axes[0], dst, dst_axes)
        elif len(src_axes) == 1:
            relations.append(expand(In(0, src_axes[0]), Out(0, dst_axes[0]), _product(dst, dst_axes[1:]),
                                    alternative=Out(0, dst_axes[1])))
    return relations


def _tiled_split(src_axis: int, dst: Dims, dst_axes: list[int]) -> list:
    repeats, rest = dst[dst_axes[0]], dst_axes[1:]
    if len(rest) == 1:
        return [compose(In(0, src_axis), *[Out(0, rest[0])] * repeats)]
    part = Pseudo(f"part{src_axis}", _product(dst, rest))
    return [compose(In(0, src_axis), *[part] * repeats), expand(part, Out(0, rest[0]), _product(dst, rest[1:]))]


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
    # An output axis whose size is computed at run time must keep its size: leave it (and its block) frozen.
    dynamic = {j for j, e in enumerate(entries) if e.value is None}
    relations = [r for r in relations if not any(ref.side == "out" and ref.axis in dynamic for ref in _refs(r))]
    return Rule(*relations, fixup=_fix_reshape_target)


@dataclass(frozen=True)
class _TargetEntry:
    """One entry of a Reshape target: its value (None when computed at run time) and the constant that holds it."""

    value: int | None
    node: onnx.NodeProto
    input_index: int
    position: int


def _target_entries(n: NodeView) -> list[_TargetEntry] | None:
    """The target as constants, also when exporters build it with Concat (`x.view(x.size(0), -1)`); None when it
    cannot be read. A Concat shared with other nodes is not editable, so its constants count as run-time values."""
    target = n.const(1)
    if target is not None:
        return [_TargetEntry(int(v), n.node, 1, k) for k, v in enumerate(target.reshape(-1))]
    concat = n.index.producer.get(n.node.input[1])
    if concat is None or concat.op_type != "Concat":
        return None
    shared = len(n.index.consumers.get(n.node.input[1], [])) > 1
    entries: list[_TargetEntry] = []
    for i, name in enumerate(concat.input):
        piece, shape = n.index.array(name), n.index.shapes.get(name)
        if piece is not None:
            entries += [_TargetEntry(None if shared else int(v), concat, i, k) for k, v in enumerate(piece.reshape(-1))]
        elif shape is not None and len(shape) == 1 and is_static(shape[0]):
            entries += [_TargetEntry(None, concat, i, k) for k in range(shape[0])]
        else:
            return None
    return entries


def _refs(relation) -> tuple:
    if isinstance(relation, Couple):
        return relation.refs
    if isinstance(relation, Expand):
        return relation.fine, relation.coarse
    return (relation.whole, *relation.parts)


def _fix_reshape_target(n: NodeView, ctx: FixContext) -> None:
    pieces: dict[tuple[str, int], tuple[onnx.NodeProto, np.ndarray]] = {}
    for j, entry in enumerate(_target_entries(n)):
        if entry.value is None or entry.value in (0, -1):  # 0 copies the (pruned) input dim, -1 is inferred
            continue
        key = (entry.node.name, entry.input_index)
        if key not in pieces:
            pieces[key] = (entry.node, n.index.array(entry.node.input[entry.input_index]).astype(np.int64).copy())
        pieces[key][1].reshape(-1)[entry.position] = ctx.new_size(Out(0, j))
    for (_, input_index), (node, value) in pieces.items():
        ctx.set_const_input(input_index, value, node=node)


@rule("Shape")
def shape_of(n: NodeView) -> Rule:
    """Shape's output values are the sizes of the axes it reads: those stay as they are; the others are free."""
    rank = len(n.in_shape(0))
    start = _clamp(int(n.attr("start", 0)), rank)
    end = _clamp(int(n.attr("end", rank)), rank) if n.attr("end") is not None else rank
    read = {start + p for p in _read_positions(n, end - start)}
    return Rule(*[couple(In(0, a)) for a in range(rank) if a not in read])


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
    if n.has_input(3) and n.const(3) is None or n.has_input(2) and n.const(2) is None:
        raise Barrier("scales/sizes computed at run time")
    unchanged = [a for a in range(len(src)) if src[a] == dst[a] and is_static(src[a])]
    relations = [couple(In(0, a), Out(0, a)) for a in unchanged]
    return Rule(*relations, fixup=_fix_resize_sizes if n.has_input(3) and n.const(3).size else None)


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
