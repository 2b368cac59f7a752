"""Where the channels a plan removes are not zero (issue 10).

The exactness harness zeroes a removed channel where it is produced (weights, bias, norm scale and shift); pruning
must then not change the outputs. An op with f(0) != 0 (Sigmoid, Exp, Clip with min > 0, Add of a constant: the
rules declare it with `Couple.at_zero`) turns a zero channel into a constant, and where a layer consumes that constant
(a Conv, Gemm or MatMul input axis: a couple with no output) its contribution f(0)·W[:, c] is lost with the channel.
`ZeroFlow` follows the rules' relations node by node (the graph is in topological order) and names those consumers;
their groups are marked inexact. A constant that a zero multiplies first (a squeeze-excite gate, x * sigmoid(x))
is zero again.
"""
from __future__ import annotations

from dataclasses import dataclass

from .roles import Role
from .rules.registry import Couple, Ref

Space = tuple[str, int]

# Constant roles that multiply the channel: zeroed with it, they make the output zero whatever the input.
_MULTIPLYING = (Role.W_OUT, Role.SCALE)


@dataclass(frozen=True)
class NonZero:
    """Why a removed channel is not zero in a space; `finite` False for inf or NaN (that a zero does not cancel)."""

    reason: str
    finite: bool = True


class ZeroFlow:
    def __init__(self, constants: set[str] | dict):
        self.constants = constants
        self.nonzero: dict[Space, NonZero] = {}
        self.lost: dict[Space, str] = {}  # a consumer's input space -> why its group is inexact

    def visit(self, who: str, relations: list[tuple[list[Ref], list[Space], object]]) -> None:
        """One node's resolved relations: (refs, the spaces they name, the relation)."""
        for refs, spaces, rel in relations:
            inputs = [s for r, s in zip(refs, spaces) if r.side == "in" and s[0] not in self.constants]
            outputs = [s for r, s in zip(refs, spaces) if r.side == "out"]
            if outputs:
                roles = {r.role for r, s in zip(refs, spaces) if s[0] in self.constants}
                state = self._output_state(who, roles, inputs, rel)
                for s in outputs:
                    if state is not None:
                        self.nonzero.setdefault(s, state)
            elif isinstance(rel, Couple):
                self._consumed(who, spaces, inputs)

    def _output_state(self, who: str, roles: set, inputs: list[Space], rel: object) -> NonZero | None:
        """`roles`: those of the constants in the relation."""
        if isinstance(rel, Couple) and rel.at_zero:
            return NonZero(f"{who}: {rel.at_zero}", rel.finite)
        if roles & set(_MULTIPLYING):
            return None
        states = [self.nonzero.get(s) for s in inputs]
        if isinstance(rel, Couple) and rel.product:
            if Role.CONST in roles or not all(states):
                return next((s for s in states if s is not None and not s.finite), None)
        return next((s for s in states if s is not None), None)

    def _consumed(self, who: str, spaces: list[Space], inputs: list[Space]) -> None:
        """A couple with no output (a layer's input axis and its weight's): the channel is summed away here."""
        state = next((self.nonzero[s] for s in inputs if s in self.nonzero), None)
        if state is not None:
            self.lost.setdefault(spaces[0], f"{state.reason}, and {who} sums it in: a removed channel's constant "
                                            f"contribution is lost")
