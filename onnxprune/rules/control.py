"""Control flow: If branches, Loop and Scan bodies.

The analysis visits the nodes inside a subgraph like any other (groups.py), so channels that stay inside a body prune
as anywhere else. These rules tie a subgraph's inputs and outputs (`BodyIn`, `BodyOut`) to the node's: an If output
is each branch's output, a carried value is the same tensor before, inside and after the loop, and a scanned value
gains (or loses) the iteration axis, which no rule mentions and which is therefore frozen.
"""
from __future__ import annotations

from dataclasses import replace

from ..roles import Role
from .registry import Barrier, BodyIn, BodyOut, In, NodeView, Out, Ref, Rule, couple, rule

BRANCHES = ("then_branch", "else_branch")


@rule("If")
def if_(n: NodeView) -> Rule:
    """Output k is output k of whichever branch runs: both branches' outputs carry the same channels."""
    relations = []
    for k in range(len(n.node.output)):
        if not n.has_output(k):
            continue
        rank = _same_rank(n, Out(k, 0), *[BodyOut(b, k, 0) for b in BRANCHES])
        relations += [couple(Out(k, a), *[_at(BodyOut(b, k, 0), a) for b in BRANCHES]) for a in range(rank)]
    return Rule(*relations)


@rule("Loop")
def loop(n: NodeView) -> Rule:
    """Inputs (M, cond, v...), body inputs (iteration, cond, v...), body outputs (cond, v..., scanned...), outputs
    (v..., scanned...): carried value j is input j+2, body input j+2, body output j+1 and output j; scanned output j
    stacks body output 1+carried+j along a new leading axis."""
    carried = len(n.node.input) - 2
    relations = []
    for j in range(carried):
        relations += _carried(n, In(2 + j, 0), BodyIn("body", 2 + j, 0), BodyOut("body", 1 + j, 0), Out(j, 0))
    for j in range(len(n.subgraph("body").output) - 1 - carried):
        relations += _scanned(n, Out(carried + j, 0), BodyOut("body", 1 + carried + j, 0), 0)
    return Rule(*relations)


@rule("Scan")
def scan(n: NodeView) -> Rule:
    """Inputs (states..., scanned...), body inputs (states..., one element of each scanned input), body outputs
    (states..., elements), outputs (states..., stacked elements) along the scan axes of the attributes."""
    if n.opset < 9:
        raise Barrier("Scan before opset 9 (batch axis and sequence lengths) is not analysed")
    scanned_in = int(n.attr("num_scan_inputs", 0))
    states = len(n.node.input) - scanned_in
    scanned_out = len(n.node.output) - states
    in_axes = list(n.attr("scan_input_axes") or [0] * scanned_in)
    out_axes = list(n.attr("scan_output_axes") or [0] * scanned_out)
    if states < 0 or scanned_out < 0 or len(in_axes) != scanned_in or len(out_axes) != scanned_out:
        raise Barrier("scan inputs, outputs and axes do not add up")
    relations = []
    for k in range(states):
        relations += _carried(n, In(k, 0), BodyIn("body", k, 0), BodyOut("body", k, 0), Out(k, 0))
    for j in range(scanned_in):
        relations += _scanned(n, In(states + j, 0), BodyIn("body", states + j, 0), in_axes[j])
    for j in range(scanned_out):
        relations += _scanned(n, Out(states + j, 0), BodyOut("body", states + j, 0), out_axes[j])
    return Rule(*relations)


def _carried(n: NodeView, start: Ref, inside: Ref, after: Ref, result: Ref) -> list:
    """A value carried from iteration to iteration: the start value enters the body; what the body hands back is the
    next iteration's input and, after the last, the node's output. The zero flow reads the two couples in that
    order (groups.py visits the body between them)."""
    leaving = [after, inside] + ([result] if n.has_output(result.index) else [])
    rank = _same_rank(n, start, *leaving)
    return ([couple(_at(start, a), _at(inside, a)) for a in range(rank)]
            + [couple(*[_at(r, a) for r in leaving]) for a in range(rank)])


def _scanned(n: NodeView, stacked: Ref, element: Ref, scan_axis: int) -> list:
    """A node value stacking (or split into) the body's per-iteration `element` along `scan_axis`: every other axis
    of the stacked value is the element's axis, in order."""
    if stacked.side == "out" and not n.has_output(stacked.index):
        return []
    rank = len(_shape(n, element))
    if len(_shape(n, stacked)) != rank + 1:
        raise Barrier(f"a scanned value has rank {len(_shape(n, stacked))}, its body element {rank}")
    if not -(rank + 1) <= scan_axis <= rank:
        raise Barrier(f"scan axis {scan_axis} out of range")
    axis = scan_axis % (rank + 1)
    return [couple(_at(stacked, b if b < axis else b + 1), _at(element, b)) for b in range(rank)]


def _at(ref: Ref, axis: int) -> Ref:
    """The ref at `axis`. A constant that crosses the boundary (a branch returning an initializer, a state starting
    from one) holds the channels as an element-wise operand does: it is zeroed with them (Role.CONST)."""
    return replace(ref, axis=axis, role=Role.CONST if ref.side != "out" else None)


def _same_rank(n: NodeView, *refs: Ref) -> int:
    ranks = {len(_shape(n, r)) for r in refs}
    if len(ranks) != 1:
        raise Barrier(f"ranks differ across the subgraph boundary: {sorted(ranks)}")
    return ranks.pop()


def _shape(n: NodeView, ref: Ref) -> tuple:
    if ref.side == "body_out":
        _not_made_of_constants(n, ref)
    if ref.side in ("body_in", "body_out"):
        return n.body_shape(ref)
    return n.in_shape(ref.index) if ref.side == "in" else n.out_shape(ref.index)


def _not_made_of_constants(n: NodeView, ref: Ref) -> None:
    """A subgraph output that a node computes from constants alone (Identity or Cast of an initializer): its removed
    channels are not zero where the exactness harness zeroes the channels, and no rule gives that constant a role
    to zero it with them (an initializer handed out directly is zeroed, see _at)."""
    producer = n.index.producer.get(n.body_value(ref))
    if producer is not None and producer.input and all(not i or i in n.index.initializers for i in producer.input):
        raise Barrier(f"{ref.graph} output {ref.index} is computed from constants alone ({producer.op_type} "
                      f"'{producer.name}')")

