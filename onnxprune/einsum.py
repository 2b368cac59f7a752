"""Einsum equations read as one letter per operand axis: what the Einsum rule couples and what layers.py describes.

An ellipsis stands for the leading axes an operand has beyond its letters; they are named here by characters that
cannot be letters (digits), right-aligned across operands as broadcasting lines them up. An equation without `->`
has the implicit output: the ellipsis, then the letters used once, in alphabetical order.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from .graph import node_attr

_ELLIPSIS_NAMES = "9876543210"  # the last ellipsis axis is '0', the one before it '1', ...


@dataclass(frozen=True)
class Equation:
    inputs: tuple[str, ...]  # per operand, one letter per axis
    output: str

    def weight_letters(self, weight: int) -> tuple[list[str], list[str]]:
        """Of a two-operand equation whose operand `weight` is the weight: its letters that the other operand's
        channels are summed over (input channels), and those only it brings to the output (output channels)."""
        other = self.inputs[1 - weight]
        term = self.inputs[weight]
        contracted = [c for c in term if c in other and c not in self.output]
        produced = [c for c in term if c in self.output and c not in other]
        return contracted, produced


def equation_of(node: onnx.NodeProto, ranks: list[int]) -> Equation | None:
    """The node's equation with its ellipses named, for operands of these ranks; None where it does not parse
    (a letter repeated within one operand, a diagonal, is read as it is: the rule leaves it out)."""
    text = node_attr(node, "equation", b"")
    text = (text.decode() if isinstance(text, bytes) else str(text)).replace(" ", "")
    lhs, arrow, out = text.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        return None
    named = [_named(term, rank) for term, rank in zip(terms, ranks)]
    if None in named:
        return None
    widest = max((sum(c.isdigit() for c in t) for t in named), default=0)
    if not arrow:
        letters = "".join(named)
        out = "..." + "".join(sorted(c for c in set(letters) if c.isalpha() and letters.count(c) == 1))
    output = out.replace("...", _ELLIPSIS_NAMES[10 - widest:] if widest else "")
    return Equation(tuple(named), output) if "." not in output else None


def _named(term: str, rank: int) -> str | None:
    if "..." not in term:
        return term if len(term) == rank else None
    extra = rank - (len(term) - 3)
    if extra < 0 or extra > len(_ELLIPSIS_NAMES) or term.count("...") > 1:
        return None
    return term.replace("...", _ELLIPSIS_NAMES[10 - extra:] if extra else "")
