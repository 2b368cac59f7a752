"""From scores to a Plan: how many channels each group keeps, and which."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .cost import CostModel
from .groups import Analysis, Group
from .layers import describe

ALLOCATIONS = ("uniform", "global", "standardised", "sensitivity")


@dataclass
class Plan:
    """Plain data: per group id, the sorted channel indices to keep. Groups not listed keep everything."""

    keep: dict[int, np.ndarray] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"keep": {str(g): [int(i) for i in idx] for g, idx in sorted(self.keep.items())}}


def step_for(group: Group, round_to: int) -> int:
    """Channels per rounding step: every weight dimension the group spans stays a multiple of `round_to`."""
    step = 1
    for inner in {m.inner for m in group.members if m.constant} or {1}:
        step = math.lcm(step, round_to // math.gcd(round_to, inner))
    return step


def round_count(group: Group, keep: int, round_to: int) -> int:
    """`keep` rounded to the group's step at the alignment `alignment_for` chooses."""
    return _rounded(group, keep, alignment_for(group, keep, round_to))


def alignment_for(group: Group, keep: int, round_to: int) -> int:
    """The largest alignment, `round_to` and then the powers of two below it down to 1, at which the group still
    reaches the count asked: it removes between half and twice the channels that keeping `keep` would remove. A
    block speeds a layer up only where the layer is wide enough to use it (BENCHMARKS.md, channel alignment), so a
    wide group keeps `round_to`, while one that rounding to it would leave whole, or cut far less or far more than
    asked (a small network's 10, 16 or 20 channels at ratio 0.5), takes the widest smaller block that fits."""
    asked = group.size - max(1, keep)
    candidates = [round_to] + [2 ** k for k in range(round_to.bit_length() - 1, -1, -1) if 2 ** k < round_to]
    return next((a for a in candidates if asked <= 2 * (group.size - _rounded(group, keep, a)) <= 4 * asked), 1)


def _rounded(group: Group, keep: int, round_to: int) -> int:
    """`keep` rounded to the group's step, at least one step (or the whole group when it is not larger)."""
    step = step_for(group, round_to)
    keep = max(1, keep)
    if step <= 1:
        return min(keep, group.size)
    if group.size <= step:
        return group.size
    return int(min(max(step, round(keep / step) * step), group.size))


def keep_count(group: Group, ratio: float, round_to: int) -> int:
    """Channels kept after removing round(ratio * size), at least one, rounded so that every weight dimension the
    group spans stays a multiple of `round_to`. A group whose channels are blocks of `inner` (a grouped conv's
    groups, attention heads) needs fewer units per step: 16 channels are 4 groups of 4, or a quarter of a head."""
    return round_count(group, group.size - int(round(ratio * group.size)), round_to)


def plan_from_counts(analysis: Analysis, scores: dict[int, np.ndarray], counts: dict[int, int]) -> Plan:
    """Keep the `counts[g]` best-scoring channels of each group."""
    plan = Plan()
    for group in analysis.prunable:
        n_keep = counts.get(group.id, group.size)
        if n_keep < group.size:
            order = np.argsort(-scores[group.id], kind="stable")
            plan.keep[group.id] = np.sort(order[:n_keep])
    return plan


def uniform_counts(analysis: Analysis, ratio: float, round_to: int,
                   reference: dict[tuple[str, int], int] | None = None) -> dict[int, int]:
    """round(ratio * C) channels fewer in every group; with `reference` (sizes in the model the pruning started
    from, by weight axis), C and the count kept are taken from there, so steps of an iterative schedule land on the
    one-shot counts."""
    counts = {}
    for g in analysis.prunable:
        original = next((reference[a] for a in g.owned_axes(analysis.index.shapes) if a in (reference or {})), None)
        one_shot = g if original is None else dataclasses.replace(g, size=original)  # rounded as one-shot would
        counts[g.id] = min(g.size, keep_count(one_shot, ratio, round_to))
    return counts


def reference_sizes(analysis: Analysis) -> dict[tuple[str, int], int]:
    """Each group's size by the weight axes it owns (see uniform_counts)."""
    return {axis: g.size for g in analysis.prunable for axis in g.owned_axes(analysis.index.shapes)}


def global_counts(analysis: Analysis, scores: dict[int, np.ndarray], threshold: float,
                  round_to: int) -> dict[int, int]:
    """Keep, in every group, the channels whose (normalised, see ranked_scores) score exceeds `threshold`: one
    ranking across groups, so redundant layers give more."""
    return {g.id: round_count(g, int(np.sum(scores[g.id] > threshold)), round_to) for g in analysis.prunable}


def ranked_scores(analysis: Analysis, scores: dict[int, np.ndarray], allocation: str) -> dict[int, np.ndarray]:
    """The scores one threshold ranks across groups: `global` divides each group's by their mean; `standardised`
    takes z-scores within each kind of group (FLAP's adaptive structure, An et al. 2024)."""
    if allocation == "standardised":
        return standardised_scores(scores, {g.id: shape_kind(g) for g in analysis.prunable})
    return {gid: v / (float(np.mean(v)) or 1.0) for gid, v in scores.items()}


def shape_kind(group: Group) -> tuple:
    """Groups of one shape (channel count, and values per channel in each weight: every layer's attention heads,
    every layer's MLP neurons) are one kind, which FLAP standardises together."""
    return group.size, tuple(sorted({m.inner for m in group.members if m.constant}))


def standardised_scores(scores: dict[int, np.ndarray], kinds: dict[int, object]) -> dict[int, np.ndarray]:
    """Scores as z-scores ((s - mean) / std, 0 where all are equal) over all the groups of one kind, shifted by one
    constant so the lowest is 1 (a threshold of 0 removes nothing): layers of one kind compare by their raw scores,
    while kinds whose scores differ in scale (a head's sum over 32 features, a neuron's one) compare by how far a
    channel stands out among its kind."""
    z: dict[int, np.ndarray] = {}
    for kind in set(kinds.values()):
        members = [gid for gid in scores if kinds[gid] == kind]
        pooled = np.concatenate([scores[gid] for gid in members])
        mean, std = float(np.mean(pooled)), float(np.std(pooled)) or 1.0
        z.update({gid: (scores[gid] - mean) / std for gid in members})
    lowest = min((float(v.min()) for v in z.values() if len(v)), default=0.0)
    return {gid: v - lowest + 1.0 for gid, v in z.items()}


def uniform_plan(analysis: Analysis, scores: dict[int, np.ndarray], ratio: float, round_to: int = 1) -> Plan:
    return plan_from_counts(analysis, scores, uniform_counts(analysis, ratio, round_to))


class MacModel:
    """MACs of a plan without building it: a Conv / Gemm / MatMul with a constant weight costs its unpruned MACs times
    the fraction of its weight that survives (output positions times weight size); other layers stay as they are."""

    def __init__(self, analysis: Analysis, layer_macs: dict[str, int]):
        self.analysis = analysis
        self.fixed = 0
        self.layers: list[tuple[int, list[tuple[tuple[str, int], int]]]] = []
        self.prunable = 0  # MACs of the layers a prunable group touches
        shapes = analysis.index.shapes
        spaces = {m.space for g in analysis.prunable for m in g.members}
        for node in analysis.index.nodes:  # layers inside If branches and Loop and Scan bodies too
            macs = layer_macs.get(node.name, 0)
            layer = describe(node, analysis.index)
            if layer is not None:
                self.layers.append((macs, [((layer.weight, a), d) for a, d in enumerate(shapes[layer.weight])]))
            else:
                self.fixed += macs
            tensors = [t for t in list(node.input[:2]) + list(node.output[:1]) if t]
            if macs and any((t, a) in spaces for t in tensors for a in range(len(shapes.get(t) or ()))):
                self.prunable += macs

    def cost(self, counts: dict[int, int]) -> float:
        """MACs of the model when group g keeps counts[g] channels."""
        total = float(self.fixed)
        for macs, axes in self.layers:
            fraction = 1.0
            for space, size in axes:
                kept = self._kept_size(space, counts)
                fraction *= (kept / size) if kept is not None else 1.0
            total += macs * fraction
        return total

    def _kept_size(self, space: tuple[str, int], counts: dict[int, int]) -> int | None:
        """How many indices of `space` survive the counts (which ones does not matter); None where no group that
        lies in it changes."""
        segments = self.analysis.layouts.get(space, [])
        if not any(gid in counts for gid, _, _ in segments):
            return None
        return sum(counts.get(gid, self.analysis.groups[gid].size) * inner for gid, _, inner in segments)

    steps = 40  # bisection steps (cheap: the cost is computed, not measured)
    fill_gaps = False  # MACs change smoothly with the counts; they are what the bisection met

    def prefer(self, counts: dict[int, int]) -> dict[int, int]:
        """The counts as they are: MACs have no width that is cheaper than a narrower one."""
        return counts

    def reach(self, round_to: int) -> "MacReach":
        """How much of the MACs pruning can reach, every prunable group at its floor (what keeping one channel
        rounds to: one block of `round_to`, or less where the group is too small for a block)."""
        floor = {g.id: round_count(g, 1, round_to) for g in self.analysis.prunable}
        return MacReach(self.cost({}), float(self.prunable), self.cost(floor))


TARGET_TOLERANCE = 0.02  # a target missed by less (a fraction of the original's MACs, latency or channels) is met


@dataclass(frozen=True)
class MacReach:
    """A model's MACs (at batch 1), those of the layers a prunable group touches, and those left with every
    prunable group at its floor: the reachable minimum."""

    total: float
    prunable: float
    floor: float

    @property
    def share(self) -> float:
        """The share of the MACs in layers a prunable group touches."""
        return self.prunable / self.total if self.total else 0.0

    @property
    def minimum(self) -> float:
        """The fraction of the MACs left with every prunable group at its floor."""
        return self.floor / self.total if self.total else 1.0

    def can_meet(self, budget: float) -> bool:
        return self.minimum <= budget + TARGET_TOLERANCE

    def to_dict(self) -> dict:
        return {"macs": int(self.total), "prunable_macs": int(self.prunable), "prunable_share": self.share,
                "reachable_minimum": self.minimum}


def capped_when_unreachable(analysis: Analysis, counts: dict[int, int], budget: float, reach: MacReach,
                            round_to: int) -> dict[int, int]:
    """For a MAC budget below the reachable minimum, no group loses a larger share of its channels than the budget
    asks the whole model to lose (`--ratio 1 - budget`): the target cannot be met anyway, and driving the few
    prunable groups to their floor would wreck them for little (a byte embedding kept at 16 of 257 channels)."""
    if reach.can_meet(budget):
        return counts
    return {g.id: max(counts.get(g.id, g.size), keep_count(g, 1 - budget, round_to)) for g in analysis.prunable}


def counts_for_target(analysis: Analysis, scores: dict[int, np.ndarray], allocation: str, round_to: int,
                      ratio: float | None, budget: tuple[CostModel, float] | None = None,
                      reference: dict[tuple[str, int], int] | None = None) -> dict[int, int]:
    """Per-group channel counts: uniform (the same ratio everywhere) or global (one threshold on normalised scores),
    meeting a channel ratio, or a budget: (cost model, fraction of the unpruned cost to keep), by bisection; the
    budget is met or undershot. The cost model's `prefer` may adjust the counts at each step; where that makes its
    cost jump because many groups switch width at once (equal groups move in lockstep under a uniform ratio: the
    latency table), the budget left is filled group by group afterwards (`fill_gaps`)."""
    model = budget[0] if budget is not None else None
    scores = scores if allocation == "uniform" else ranked_scores(analysis, scores, allocation)

    def counts_at(x: float) -> dict[int, int]:  # x grows with pruning
        counts = uniform_counts(analysis, x, round_to, reference) if allocation == "uniform" else \
            global_counts(analysis, scores, x, round_to)
        return model.prefer(counts) if model is not None else counts

    if model is None:
        if allocation == "uniform":
            return counts_at(ratio)
        total = sum(g.size for g in analysis.prunable)
        low, high = _bisect(lambda x: total - sum(counts_at(x).values()) < round(ratio * total), 40,
                            _max_threshold(scores))
        return counts_at(high)
    limit = budget[1] * model.cost({})
    low, high = _bisect(lambda x: model.cost(counts_at(x)) > limit, model.steps,
                        0.999 if allocation == "uniform" else _max_threshold(scores))
    return _fill(model, limit, counts_at(high), counts_at(low)) if model.fill_gaps else counts_at(high)


def _bisect(too_big: Callable[[float], bool], steps: int, high: float) -> tuple[float, float]:
    """The interval [low, high] of the pruning parameter, `steps` halvings from [0, high], where `too_big` turns
    false."""
    low = 0.0
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if too_big(mid) else (low, mid)
    return low, high


def _fill(model: CostModel, limit: float, fits: dict[int, int], wider: dict[int, int]) -> dict[int, int]:
    """`fits` with groups, one at a time, widened to their count in `wider` while the cost stays within `limit`."""
    counts = dict(fits)
    for gid, width in wider.items():
        if width > counts.get(gid, width):
            previous, counts[gid] = counts[gid], width
            if model.cost(counts) > limit:
                counts[gid] = previous
    return counts


def _max_threshold(scores: dict[int, np.ndarray]) -> float:
    return max((float(np.max(v)) for v in scores.values() if len(v)), default=1.0) + 1.0
