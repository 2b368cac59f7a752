"""What `allocate.counts_for_target` asks of a budget's cost model (MACs: `allocate.MacModel`; latency:
`latency.table.LatencyModel`)."""
from __future__ import annotations

from typing import Protocol

Counts = dict[int, int]  # channels kept per group id; groups not listed keep all


class CostModel(Protocol):
    steps: int  # bisection steps of the search
    fill_gaps: bool  # fill the budget a jump of `prefer` leaves, group by group, after the bisection

    def cost(self, counts: Counts) -> float:
        """The model's cost when group g keeps counts[g] channels."""

    def prefer(self, counts: Counts) -> Counts:
        """`counts` adjusted where another width costs no more (the identity for a cost without such steps)."""
