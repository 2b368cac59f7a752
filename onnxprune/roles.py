"""What a constant tensor is to the op that reads it, on one axis: the closed set of member roles.

Rules tag the constant axes they couple with a role (`rules/`); criteria, the exactness harness and the groups read
them. A `StrEnum`, so a role compares equal to its name and prints as it (reports and plans are unchanged)."""
from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    W_OUT = "w_out"  # a weight's output-channel axis: the channel is produced here
    W_IN = "w_in"  # a weight's input-channel axis: the channel is consumed here
    BIAS = "bias"
    SCALE = "scale"  # a norm's scale (gamma)
    SHIFT = "shift"  # a norm's shift (beta)
    STAT = "stat"  # a norm's running mean / variance
    CONST = "const"  # an element-wise operand that may be zeroed with the channel
    DIVISOR = "divisor"  # element-wise operands that may not: zeroing them would not zero the channel
    EXPONENT = "exponent"
    SLOPE = "slope"
    CONDITION = "condition"
