"""Dependency analysis: channel spaces, their couplings, and the groups of channels that must go together.

A space is one axis of one tensor (activation or constant), or a node-local pseudo space. Rules relate spaces:
`Couple` unites them (union-find), `Compose` and `Expand` relate their index sets (see atoms.py). Each leaf atom at the
end is a `Group`. A group is frozen, with the reasons, when any of its spaces touches a barrier, a graph input or
output, a dimension of unknown size, or an inconsistency.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx

from .atoms import Atoms
from .graph import GraphIndex, ai_onnx_opset, defined_names, nested_graphs, outer_scope_names, subgraphs_of
from .roles import Role
from .rules import Barrier, NodeView, rule_for
from .rules.registry import Compose, Couple, Expand, Ref, is_static
from .zeroflow import Fold, ZeroFlow

Space = tuple[str, int]  # (tensor name or "<node>#<pseudo>", axis)

_MAX_REASONS = 5


@dataclass(frozen=True)
class Member:
    """Where a group's channels sit in one space: channel c covers [offset + c*inner, offset + (c+1)*inner)."""

    space: Space
    offset: int
    inner: int
    role: Role | None
    constant: bool


@dataclass
class Group:
    id: int
    size: int
    members: list[Member] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)

    @property
    def has_weights(self) -> bool:
        return any(m.constant for m in self.members)

    @property
    def is_channel_group(self) -> bool:
        """A group that a layer's weights produce or consume (not a spatial or batch axis)."""
        return any(m.role in (Role.W_OUT, Role.W_IN, Role.SCALE) for m in self.members)

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.size >= 2 and self.has_weights

    def owned_axes(self, shapes: dict) -> list[tuple[str, int]]:
        """Weight axes this group covers entirely: they name the group across pruning steps."""
        return [m.space for m in self.members if m.constant and m.offset == 0
                and self.size * m.inner == shapes[m.space[0]][m.space[1]]]

    def tensors(self) -> list[str]:
        return sorted({m.space[0] for m in self.members if "#" not in m.space[0]})

    def to_dict(self) -> dict:
        return {"id": self.id, "channels": self.size, "prunable": self.prunable, "frozen": self.frozen,
                "inexact": self.inexact, "weights": sorted({m.space[0] for m in self.members if m.constant})}


@dataclass
class Analysis:
    """The groups of a model, and where each group's channels lie in every space."""

    index: GraphIndex
    groups: list[Group]
    layouts: dict[Space, list[tuple[int, int, int]]]  # space -> [(group id, offset, inner)]
    fixups: list[tuple[NodeView, object]]
    barriers: list[str]
    sizes: dict[Space, int | None] = field(default_factory=dict)
    mac_reach: object | None = None  # allocate.MacReach (MACs in prunable groups), set by api.analyze
    folds: list[Fold] = field(default_factory=list)  # constants removed channels carry into layers (zeroflow)

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def kept_indices(self, space: Space, keep: dict[int, np.ndarray]) -> np.ndarray | None:
        """Indices of `space` that survive when group g keeps keep[g]; None when the space is untouched."""
        segments = self.layouts.get(space, [])
        if not any(gid in keep for gid, _, _ in segments):
            return None
        pieces = []
        for gid, offset, inner in segments:
            channels = keep.get(gid)
            if channels is None:
                channels = np.arange(self.groups[gid].size)
            pieces.append(offset + (np.asarray(channels)[:, None] * inner + np.arange(inner)).ravel())
        return np.concatenate(pieces).astype(np.int64)


def analyze(model: onnx.ModelProto, index: GraphIndex | None = None, exclude: tuple[str, ...] = ()) -> Analysis:
    """Find the channel groups of a (normalised) model.

    An axis split in two by a reshape is read as an expansion of the outer part (heads out of a hidden dimension) or
    as the inner part repeated (q/k/v packed in one projection, channel shuffle), and a grouped conv prunes whole
    groups or channel c of every group (a ResNeSt radix conv). The first reading is tried first; nodes whose outer
    part ends up frozen while the inner part is frozen only by readings that switch with them are switched together
    (a split into three axes may go one level deeper, see rules/shape.py), and the switch is kept when it makes more
    weights prunable."""
    index = index or GraphIndex.build(model)
    tiled: dict[str, int] = {}  # node -> how many levels of its split axes are read tiled
    best = _analyze_once(model, index, tiled)
    for _ in range(3):
        flips = _tiling_candidates(*best)
        if not flips:
            break
        deeper = {**tiled, **flips}
        trial = _analyze_once(model, index, deeper)
        if _prunable_weights(trial[0]) <= _prunable_weights(best[0]):
            break
        best, tiled = trial, deeper
    analysis, builder = best
    if exclude:
        _apply_exclusions(analysis, builder.touched_by, exclude)
    return analysis


def _analyze_once(model: onnx.ModelProto, index: GraphIndex, tiled: dict[str, int]) -> tuple[Analysis, "_Builder"]:
    builder = _Builder(index, ai_onnx_opset(model) or 0, tiled)
    for node in model.graph.node:
        builder.visit(node)
    builder.freeze_boundary(model.graph)
    return builder.finish(), builder


def _tiling_candidates(analysis: Analysis, builder: "_Builder") -> dict[str, int]:
    """Nodes to read tiled one level deeper (or, where only the innermost axis of a split is waiting, fully: level
    2): the outer part of a split axis is frozen by something else than these readings, while an inner part is frozen
    only by the nodes that switch together. Split attention reshapes (r*C) into (r, C) in two or three places, and
    each place alone freezes the C of the others. A grouped conv's channels per group are a space of the other
    reading only: nothing to wait for."""
    switching = {node for node, outer, _ in builder.split_choices if _frozen(analysis, outer)}
    while True:
        released = _released_by(analysis, builder, switching)
        kept = {node for node, outer, inners in builder.split_choices if node in switching
                and not released(outer) and (not inners or any(released(s) for s in inners))}
        if kept == switching:
            break
        switching = kept
    levels: dict[str, int] = {}
    for node, _, inners in builder.split_choices:
        if node in switching:
            deeper = builder.tiled.get(node, 0) + 1 if not inners or released(inners[0]) else 2
            levels[node] = max(levels.get(node, 0), deeper)
    return levels


def _frozen(analysis: Analysis, space: Space) -> bool:
    segments = analysis.layouts.get(space, [])
    return bool(segments) and all(analysis.groups[gid].frozen for gid, _, _ in segments)


def _released_by(analysis: Analysis, builder: "_Builder", nodes: set[str]) -> Callable[[Space], bool]:
    """Whether every reason that freezes a space is one of these nodes not carrying an inner part it would carry
    read tiled."""
    freed = [f"'{node}' does not carry axis {space[1]} of '{space[0]}'" for node, _, inners in builder.split_choices
             if node in nodes for space in inners]

    def released(space: Space) -> bool:
        reasons = [r for gid, _, _ in analysis.layouts.get(space, []) for r in analysis.groups[gid].frozen]
        return all(any(f in r for f in freed) for r in reasons)
    return released


def _prunable_weights(analysis: Analysis) -> int:
    """Weight elements in prunable groups: the measure of how much of a model the analysis lets pruning reach."""
    total = 0
    for group in analysis.prunable:
        for m in group.members:
            if m.constant:
                shape = analysis.index.shapes[m.space[0]]
                total += group.size * m.inner * int(np.prod(shape, dtype=np.int64)) // max(shape[m.space[1]], 1)
    return total


class _Builder:
    def __init__(self, index: GraphIndex, opset: int, tiled: dict[str, int]):
        self.index = index
        self.opset = opset
        self.tiled = tiled
        self.split_choices: list[tuple[str, Space, tuple[Space, ...]]] = []  # (node, outer part, inner parts)
        self.parent: dict[Space, Space] = {}
        self.size: dict[Space, int | None] = {}
        self.role: dict[Space, Role] = {}
        self.frozen: dict[Space, list[str]] = {}
        self.frozen_tensors: dict[str, str] = {}
        self.inexact: dict[Space, str] = {}
        self.zeros = ZeroFlow(index)
        self.zero_visits: list[tuple] = []  # (who, relations, node) in the order the zero flow read them
        self.structural: list[tuple[object, str]] = []  # (Compose/Expand over spaces, who)
        self.fixups: list[tuple[NodeView, object]] = []
        self.barriers: list[str] = []
        self.touched_by: dict[str, set[str]] = {}  # tensor -> names of the nodes that touch it

    # ------------------------------------------------------------------ visiting nodes
    def visit(self, node: onnx.NodeProto) -> None:
        tensors = [t for t in list(node.input) + list(node.output) if t]
        for t in tensors:
            self.touched_by.setdefault(t, set()).add(node.name)
        who = f"{node.op_type} '{node.name}'"
        fn = rule_for(node)
        if fn is None or not self._analysable(node):
            for sub in subgraphs_of(node):
                self._freeze_outer_references(sub, who)
            domain = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
            return self._barrier(tensors, f"{who}: " + (f"no rule for op {domain}{node.op_type}" if fn is None else
                                                        "its subgraphs reuse names defined elsewhere in the model"))
        tensors += _boundary(node)
        view = NodeView(node, self.index, self.opset, tile=self.tiled.get(node.name, 0))
        try:
            rule = fn(view)
            resolved = self._resolve(view, rule.relations)
        except Barrier as exc:
            self._barrier(tensors, f"{who}: {exc}")
            return self._visit_bodies(node)
        mentioned = self._add_node(node, resolved, who)
        self._freeze_unmentioned(tensors, mentioned, who)
        if rule.fixup is not None:
            self.fixups.append((view, rule.fixup))

    def _analysable(self, node: onnx.NodeProto) -> bool:
        """Subgraphs whose names are all their own: sibling branches may reuse a name, and spaces are named by
        tensor name, so such subgraphs stay frozen as a whole."""
        graphs = [g for sub in subgraphs_of(node) for g in (sub, *nested_graphs(sub))]
        return not any(defined_names(g) & self.index.reused_names for g in graphs)

    def _add_node(self, node: onnx.NodeProto, resolved: list, who: str) -> set[Space]:
        """Add a node's relations; a control-flow node's subgraph nodes are visited between the relations that
        enter its subgraphs and those that leave them, so that the zero flow follows the data. A value the body
        carries to the next iteration may come back not zero where it went in zero: the body's zero flow is then
        run once more (ZeroFlow keeps what it found first, so a rerun only adds)."""
        if not subgraphs_of(node):
            return self._add_relations(resolved, who, node)
        leaving = [r for r in resolved if any(ref.side == "body_out" for ref in r[1])]
        mentioned = self._add_relations([r for r in resolved if r not in leaving], who, node)
        start = len(self.zero_visits)
        self._visit_bodies(node)
        body_visits = self.zero_visits[start:]
        inside = [s for _, refs, spaces, _ in leaving for r, s in zip(refs, spaces) if r.side == "body_in"]
        before = [s in self.zeros.nonzero for s in inside]
        mentioned |= self._add_relations(leaving, who, node)
        if before != [s in self.zeros.nonzero for s in inside]:
            for visit in body_visits + [(who, _flows(leaving), node)]:
                self.zeros.visit(*visit)
        return mentioned

    def _visit_bodies(self, node: onnx.NodeProto) -> None:
        for sub in subgraphs_of(node):
            for inner in sub.node:
                self.visit(inner)

    def _barrier(self, tensors: list[str], reason: str) -> None:
        self.barriers.append(reason)
        for t in tensors:
            self.frozen_tensors.setdefault(t, reason)

    def _freeze_outer_references(self, graph: onnx.GraphProto, who: str) -> None:
        for name in outer_scope_names(graph):
            self.frozen_tensors.setdefault(name, f"{who}: used inside a subgraph")

    def _resolve(self, view: NodeView, relations: list) -> list:
        """(kind, refs, spaces, relation) of every relation, all resolved before any is added: a Barrier must leave
        no half-added node behind."""
        resolved = []
        for rel in relations:
            refs = _refs(rel)
            kind = "couple" if isinstance(rel, Couple) else "compose" if isinstance(rel, Compose) else "expand"
            resolved.append((kind, refs, [self._space(view, r) for r in refs], rel))
            if kind == "expand" and rel.alternative is not None:
                self.split_choices.append((view.name, resolved[-1][2][1], self._alternative_spaces(view, rel)))
        return resolved

    def _alternative_spaces(self, view: NodeView, rel: Expand) -> tuple[Space, ...]:
        """The inner parts the other readings would keep: the axis after the outer one, and the innermost axis of
        the block (the same for a split in two); none where that is a node-local space of that reading alone."""
        if rel.alternative.side == "pseudo":
            return ()
        first = self._space(view, rel.alternative)
        shape, product, last = self.index.shapes[first[0]], 1, first[1]
        for axis in range(first[1], len(shape)):
            if product == rel.inner or not is_static(shape[axis]):
                break
            product, last = product * shape[axis], axis
        if product != rel.inner or last == first[1]:
            return (first,)
        return first, self._space(view, replace(rel.alternative, axis=last))

    def _add_relations(self, resolved: list, who: str, node: onnx.NodeProto) -> set[Space]:
        mentioned: set[Space] = set()
        self.zero_visits.append((who, _flows(resolved), node))
        self.zeros.visit(*self.zero_visits[-1])
        for kind, _, spaces, rel in resolved:
            mentioned.update(spaces)
            if kind == "couple":
                for s in spaces[1:]:
                    self._union(spaces[0], s)
                if rel.inexact:
                    self.inexact[spaces[0]] = f"{who}: {rel.inexact}"
            else:
                self.structural.append((kind, spaces, rel, who))
        return mentioned

    def _space(self, view: NodeView, ref: Ref) -> Space:
        space, size = resolve(view, ref)
        self._register(space, size, ref.role)
        return space

    def _register(self, space: Space, size: int | None, role: Role | None) -> None:
        if space not in self.parent:
            self.parent[space] = space
            self.size[space] = size
        if role and space[0] in self.index.initializers:
            self.role[space] = role

    def _freeze_unmentioned(self, tensors: list[str], mentioned: set[Space], who: str) -> None:
        for t in tensors:
            shape = self.index.shapes.get(t)
            if shape is None:
                self.frozen_tensors.setdefault(t, f"{who}: shape unknown")
                continue
            for axis in range(len(shape)):
                if (t, axis) not in mentioned:
                    self._register((t, axis), shape[axis] if isinstance(shape[axis], int) else None, None)
                    self._freeze((t, axis), f"{who} does not carry axis {axis} of '{t}'")

    def _freeze(self, space: Space, reason: str) -> None:
        reasons = self.frozen.setdefault(space, [])
        if len(reasons) < _MAX_REASONS:
            reasons.append(reason)

    def freeze_boundary(self, graph: onnx.GraphProto) -> None:
        for vi, what in [(i, "graph input") for i in graph.input] + [(o, "graph output") for o in graph.output]:
            if vi.name in self.index.initializers:
                continue
            for space in [s for s in self.parent if s[0] == vi.name]:
                self._freeze(space, f"{what} '{vi.name}'")

    # ------------------------------------------------------------------ union-find over spaces
    def _find(self, s: Space) -> Space:
        parent = self.parent
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    def _union(self, a: Space, b: Space) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self.parent[rb] = ra

    # ------------------------------------------------------------------ groups
    def finish(self) -> Analysis:
        classes: dict[Space, list[Space]] = {}
        for s in self.parent:
            classes.setdefault(self._find(s), []).append(s)
        class_frozen: dict[Space, list[str]] = {}
        class_size: dict[Space, int | None] = {}
        for root, spaces in classes.items():
            class_size[root] = self._class_size(spaces, class_frozen.setdefault(root, []))
            for s in spaces:
                reason = self.frozen_tensors.get(s[0])
                for r in ([reason] if reason else []) + self.frozen.get(s, []):
                    _add_reason(class_frozen[root], r)
        atoms = Atoms()
        atom_of = {root: atoms.new(size) for root, size in class_size.items() if size is not None}
        for kind, spaces, rel, who in self.structural:
            roots = [self._find(s) for s in spaces]
            if not self._relate(atoms, atom_of, class_size, kind, roots, rel):
                for r in roots:
                    _add_reason(class_frozen[r], f"{who}: channel mapping does not line up")
        return self._collect(atoms, atom_of, classes, class_frozen)

    def _class_size(self, spaces: list[Space], reasons: list[str]) -> int | None:
        """Coupled spaces are the same index set, so one static size tells the size of all: shape inference often
        loses a size downstream of a reshape it could not follow (a run-time batch beside it)."""
        sizes = {self.size[s] for s in spaces} - {None}
        if not sizes:
            _add_reason(reasons, f"size of '{_first_tensor(spaces)}' axis is not static")
            return None
        if len(sizes) > 1:
            _add_reason(reasons, f"coupled sizes disagree {sorted(sizes)} at '{_first_tensor(spaces)}'")
            return None
        return sizes.pop()

    @staticmethod
    def _relate(atoms: Atoms, atom_of: dict, class_size: dict, kind: str, roots: list[Space], rel) -> bool:
        if any(r not in atom_of for r in roots):
            return False
        if kind == "compose":
            whole, parts = roots[0], roots[1:]
            if class_size[whole] != sum(class_size[p] for p in parts):
                return False
            return atoms.equate(atom_of[whole], atoms.concat([atom_of[p] for p in parts]))
        fine, coarse = roots
        if class_size[fine] != class_size[coarse] * rel.inner:
            return False
        return atoms.equate(atom_of[fine], atoms.expanded(atom_of[coarse], rel.inner))

    def _collect(self, atoms: Atoms, atom_of: dict, classes: dict, class_frozen: dict) -> Analysis:
        groups: dict[int, Group] = {}
        layouts: dict[Space, list[tuple[int, int, int]]] = {}
        for root, spaces in classes.items():
            if root not in atom_of:
                continue
            offset = 0
            for leaf, inner in atoms.leaves(atom_of[root]):
                group = groups.get(leaf)
                if group is None:
                    group = groups[leaf] = Group(id=len(groups), size=atoms.size[leaf])
                for reason in class_frozen[root]:
                    _add_reason(group.frozen, reason)
                for s in spaces:
                    for reason in (self.inexact.get(s), self.zeros.lost.get(s)):
                        if reason:
                            _add_reason(group.inexact, reason)
                    constant = s[0] in self.index.initializers
                    group.members.append(Member(s, offset, inner, self.role.get(s), constant))
                    layouts.setdefault(s, []).append((group.id, offset, inner))
                offset += atoms.size[leaf] * inner
        ordered = sorted(groups.values(), key=lambda g: g.id)
        return Analysis(self.index, ordered, layouts, self.fixups, self.barriers, self.size,
                        folds=list(self.zeros.folds.values()))


def resolve(view: NodeView, ref: Ref) -> tuple[Space, int | None]:
    """The space a node's Ref names, and its static size (None when not static)."""
    if ref.side == "pseudo":
        return (f"{view.name}#{ref.index}", 0), ref.size
    if ref.side in ("body_in", "body_out"):
        name, shape = view.body_value(ref), view.body_shape(ref)
    else:
        name = view.node.input[ref.index] if ref.side == "in" else view.node.output[ref.index]
        shape = view.in_shape(ref.index) if ref.side == "in" else view.out_shape(ref.index)
    if not -len(shape) <= ref.axis < len(shape):
        raise Barrier(f"axis {ref.axis} out of range for '{name}'")
    axis = ref.axis % len(shape)
    return (name, axis), shape[axis] if isinstance(shape[axis], int) else None


def _refs(rel: object) -> list[Ref]:
    """A relation's refs: a couple's, a composition's whole then its parts, an expansion's fine then coarse part."""
    if isinstance(rel, Couple):
        return list(rel.refs)
    if isinstance(rel, Compose):
        return [rel.whole, *rel.parts]
    return [rel.fine, rel.coarse]


def _flows(resolved: list) -> list[tuple[list[Ref], list[Space], object]]:
    """The relations as the zero flow reads them: a subgraph's input receives a value as a node output does, and a
    subgraph's output hands one on as a node input does."""
    sides = {"body_in": "out", "body_out": "in"}
    return [([replace(r, side=sides.get(r.side, r.side)) for r in refs], spaces, rel)
            for _, refs, spaces, rel in resolved]


def _boundary(node: onnx.NodeProto) -> list[str]:
    """The inputs and outputs of a node's subgraphs: axes the node's rule does not tie to its own are frozen."""
    return [vi.name for sub in subgraphs_of(node) for vi in list(sub.input) + list(sub.output)]


def _add_reason(reasons: list[str], reason: str) -> None:
    if reason not in reasons and len(reasons) < _MAX_REASONS:
        reasons.append(reason)


def _first_tensor(spaces: list[Space]) -> str:
    return next((s[0] for s in spaces if "#" not in s[0]), spaces[0][0])


def name_matches(name: str, pattern: str) -> bool:
    """An --exclude pattern: a glob, or, without wildcards, any part of the name."""
    return fnmatch.fnmatchcase(name, pattern) if any(c in pattern for c in "*?[") else pattern in name


SLICED = "__sliced"  # suffix of the stream tensors --slice rewrote; the pipeline adds it to the exclusions


def _apply_exclusions(analysis: Analysis, touched_by: dict[str, set[str]], patterns: tuple[str, ...]) -> None:
    """Freeze groups that touch a node or tensor whose name matches a pattern (glob; plain text matches a part)."""
    for group in analysis.groups:
        names = set(group.tensors())
        for t in list(names):
            names |= touched_by.get(t, set())
        hit = next((p for p in patterns for n in names if name_matches(n, p)), None)
        if hit is not None:
            _add_reason(group.frozen, "the hidden width --slice sliced stays whole" if hit == SLICED
                        else f"excluded by --exclude '{hit}'")
