"""The whole-model correction of a latency budget: the table predicts layers well but not the model's level, so
each search on the table is followed by a measurement of the whole pruned model, and the goal given to the next
search is corrected by what the table missed."""
from __future__ import annotations

import copy
import logging
from typing import Callable

import numpy as np
import onnx

from ..allocate import Plan
from ..cost import CostModel, Counts
from ..groups import Analysis
from ..surgery import apply_plan
from ..timing import Feed, ModelTimer
from .table import TIE

log = logging.getLogger("onnxprune")

CORRECTIONS = 4  # searches, each followed by a whole-model measurement that corrects the table's level
WHOLE_RUNS = 11  # interleaved runs of the original and the pruned model per whole-model measurement

Search = Callable[[tuple[CostModel, float]], Counts]
Bound = tuple[float, float] | None  # (goal given to the search, fraction measured)


class WholeModel:
    """The model pruned to given counts (which channels does not matter), timed against the original."""

    def __init__(self, model: onnx.ModelProto, analysis: Analysis, feed: Feed, timer: ModelTimer):
        self.model, self.analysis, self.feed, self.timer = model, analysis, feed, timer

    def kept(self, counts: Counts) -> float:
        """Measured latency of the model pruned to `counts`, as a fraction of the original's."""
        keep = {g: np.arange(n) for g, n in counts.items() if n < self.analysis.groups[g].size}
        pruned = apply_plan(copy.deepcopy(self.model), self.analysis, Plan(keep)) if keep else self.model
        return self.timer.kept(self.model, pruned, self.feed, WHOLE_RUNS)


def fit(table: CostModel, measure: Callable[[Counts], float], search: Search, target: float) -> tuple[Counts, float]:
    """Counts that keep `target` of the measured latency, and the fraction measured for them. `search((table,
    goal))` meets `goal` on the table; `measure` times the counts found. The goal is scaled until one measurement
    falls on each side of the target, then interpolated between them; at most `CORRECTIONS` searches, fewer once a
    measurement is within `TIE` of the target. Returns the tried counts closest to the target from below, or the
    fastest."""
    goal, tried, below, above = target, {}, None, None
    for _ in range(CORRECTIONS):
        counts = search((table, goal))
        key = tuple(sorted(counts.items()))
        if key not in tried:
            tried[key] = (measure(counts), counts)
        kept = tried[key][0]
        log.debug("latency: table goal %.3f predicts %.3f, measured %.3f", goal,
                  table.cost(counts) / table.cost({}), kept)
        if abs(kept - target) <= TIE * target:
            break
        below, above = ((goal, kept), above) if kept < target else (below, (goal, kept))
        goal = next_goal(goal, target, kept, below, above)
    under = [t for t in tried.values() if t[0] <= target * (1 + TIE)]
    kept, counts = max(under, key=lambda t: t[0]) if under else min(tried.values(), key=lambda t: t[0])
    return counts, kept


def next_goal(goal: float, target: float, kept: float, below: Bound, above: Bound) -> float:
    """The goal for the next search: interpolated between a measurement below the target and one above (their
    midpoint where they do not increase with the goal), else this goal scaled by what the table missed."""
    if below and above:
        (g0, k0), (g1, k1) = below, above
        return g0 + (g1 - g0) * (target - k0) / (k1 - k0) if k1 > k0 else (g0 + g1) / 2
    return min(1.0, goal * target / kept)
