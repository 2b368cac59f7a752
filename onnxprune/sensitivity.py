"""Sensitivity analysis and allocation: prune each group alone at several ratios, measure how much the model's
outputs change on calibration data, and choose per-group ratios that meet the target at the least total damage."""
from __future__ import annotations

import copy
import logging

import numpy as np
import onnx
from onnx import helper

from .allocate import MacModel, Plan, keep_count, plan_from_counts
from .calibrate import without_padding
from .errors import OnnxPruneError
from .groups import Analysis, Group
from .surgery import apply_plan
from .verify import NO_NUMPY_TYPES, session, zeroed_constants

log = logging.getLogger("onnxprune")

CANDIDATE_RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def sensitivity_curves(model: onnx.ModelProto, analysis: Analysis, scores: dict[int, np.ndarray],
                       feeds: list[dict[str, np.ndarray]], round_to: int, mac_model: MacModel,
                       ratios: tuple[float, ...] = CANDIDATE_RATIOS) -> dict[int, list[dict]]:
    """Per prunable group: for each candidate ratio, the channels kept, the MACs saved and the damage (relative
    squared error of all outputs against the original, on `feeds`, padding cut away where the model has a mask)."""
    feeds = without_padding(model, feeds)
    reference = _require_finite(model, model_outputs(model, feeds))
    full = mac_model.cost({})
    runs = ZeroedRuns(model, analysis)
    curves: dict[int, list[dict]] = {}
    for position, group in enumerate(analysis.prunable):
        points = []
        for ratio, kept in curve_counts(group, round_to, ratios):
            counts = {group.id: kept}
            outputs = runs.outputs(group, plan_from_counts(analysis, scores, counts), feeds)
            points.append({"ratio": ratio, "kept": kept, "channels": group.size,
                           "macs_saved": float(full - mac_model.cost(counts)),
                           "damage": output_damage(reference, outputs)})
        curves[group.id] = points
        log.info("sensitivity: group %d (%d/%d)", group.id, position + 1, len(analysis.prunable))
    return curves


def curve_counts(group: Group, round_to: int, ratios: tuple[float, ...] = CANDIDATE_RATIOS) -> list[tuple[float, int]]:
    """The points of a group's curve: (ratio, channels kept) for each candidate ratio that keeps a count no earlier
    one kept and prunes something."""
    points: dict[int, float] = {}
    for ratio in ratios:
        kept = keep_count(group, ratio, round_to)
        if kept < group.size and kept not in points:
            points[kept] = ratio
    return [(ratio, kept) for kept, ratio in points.items()]


def curve_points(analysis: Analysis, round_to: int) -> tuple[int, int]:
    """How many points the sensitivity curves measure, the cost of --allocation sensitivity: those of exact groups
    (runs of one shared session, see ZeroedRuns) and those of inexact ones (each pruned, in a session of its own)."""
    counts = [(len(curve_counts(group, round_to)), bool(group.inexact)) for group in analysis.prunable]
    return sum(n for n, inexact in counts if not inexact), sum(n for n, inexact in counts if inexact)


class ZeroedRuns:
    """The outputs of the model with one group pruned, from one onnxruntime session for all the points of the exact
    groups: their constants are overridable inputs of a copy of the model, fed the original's values with the
    removed channels zeroed, which gives the outputs pruning gives (the exactness invariant: zero the channels a
    plan removes, then prune, and the outputs match). A group marked inexact, or one whose constants are not
    top-level initializers numpy can hold (in a subgraph, bfloat16), is pruned and run in a session of its own."""

    def __init__(self, model: onnx.ModelProto, analysis: Analysis):
        self.model, self.analysis = model, analysis
        inits = {i.name: i for i in model.graph.initializer if i.data_type not in NO_NUMPY_TYPES}
        names = {m.space[0] for g in analysis.prunable if not g.inexact for m in g.members if m.constant}
        self.names = names & set(inits) - {i.name for i in model.graph.input}
        self.session = None
        if self.names:
            overridable = copy.deepcopy(model)
            overridable.graph.input.extend(helper.make_tensor_value_info(n, inits[n].data_type, inits[n].dims)
                                           for n in sorted(self.names))
            self.session = session(overridable, threads=0)

    def outputs(self, group: Group, plan: Plan, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """Each output over all feeds (see model_outputs) with the plan applied."""
        zeroed = zeroed_constants(self.analysis, plan) if not group.inexact else None
        if zeroed is None or not set(zeroed) <= self.names:
            return model_outputs(apply_plan(copy.deepcopy(self.model), self.analysis, plan), feeds)
        return flattened_outputs([self.session.run(None, f | zeroed) for f in feeds])


def model_outputs(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Each output over all feeds, flattened: batches may differ in run-time sizes (a sequence length), and the
    damage sums over elements anyway."""
    sess = session(model, threads=0)
    return flattened_outputs([sess.run(None, f) for f in feeds])


def flattened_outputs(runs: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Output k of every run, flattened and concatenated, as float64."""
    return [np.concatenate([run[k].ravel() for run in runs]).astype(np.float64) for k in range(len(runs[0]))]


def _require_finite(model: onnx.ModelProto, outputs: list[np.ndarray]) -> list[np.ndarray]:
    """The model's outputs on the calibration data, refused in one line where they hold NaN or Inf: no damage could
    be measured against them."""
    for value, output in zip(outputs, model.graph.output):
        if not np.isfinite(value).all():
            raise OnnxPruneError(f"the model's output '{output.name}' is not finite on the calibration data: its "
                                 "activations overflow or are NaN there")
    return outputs


def output_damage(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """The relative squared error of `outputs` against `reference`, averaged over the outputs."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.mean([np.sum((o - r) ** 2) / max(np.sum(r ** 2), 1e-30)
                              for r, o in zip(reference, outputs)]))


def sensitivity_counts(analysis: Analysis, curves: dict[int, list[dict]], mac_model: MacModel,
                       ratio: float | None, target_macs: float | None) -> dict[int, int]:
    """Greedy: take, one at a time, the next step on some group's curve that costs the least damage per MAC (or per
    channel) saved, until the target is met. Damage is assumed to add up across groups."""
    position = {gid: -1 for gid in curves}  # index of the point taken on each curve; -1 = unpruned
    counts: dict[int, int] = {}
    total = sum(g.size for g in analysis.prunable)
    full = mac_model.cost({})

    def met() -> bool:
        if target_macs is not None:
            return mac_model.cost(counts) <= target_macs * full
        return total - sum(counts.get(g.id, g.size) for g in analysis.prunable) >= round(ratio * total)

    while not met():
        best, best_cost = None, np.inf
        for gid, points in curves.items():
            if position[gid] + 1 >= len(points):
                continue
            nxt, cur = points[position[gid] + 1], points[position[gid]] if position[gid] >= 0 else None
            gain = (nxt["macs_saved"] - (cur["macs_saved"] if cur else 0.0)) if target_macs is not None else \
                (nxt["channels"] - nxt["kept"]) - ((cur["channels"] - cur["kept"]) if cur else 0)
            cost = (nxt["damage"] - (cur["damage"] if cur else 0.0)) / max(gain, 1e-12)
            if gain > 0 and cost < best_cost:
                best, best_cost = gid, cost
        if best is None:
            break  # every curve is used up: the target cannot be met with the candidate ratios
        position[best] += 1
        counts[best] = curves[best][position[best]]["kept"]
    return counts


TYPE_RATIOS = (0.25, 0.5, 0.75)


def type_damage(model: onnx.ModelProto, analysis: Analysis, scores: dict[int, np.ndarray],
                feeds: list[dict[str, np.ndarray]], round_to: int, mac_model: MacModel, kinds: dict[int, str],
                ratios: tuple[float, ...] = TYPE_RATIOS) -> list[dict]:
    """Per group type (`kinds`: group id -> type, group_types.place_groups), all its groups pruned together at each
    ratio: the MACs saved and the output damage, as sensitivity_curves measures it. Which part of a network (a
    detector's head, neck, upsampling paths or backbone) its outputs depend on most."""
    reference = _require_finite(model, model_outputs(model, feeds))
    full = mac_model.cost({})
    rows = []
    for kind in dict.fromkeys(kinds.values()):
        groups = [g for g in analysis.prunable if kinds.get(g.id) == kind]
        points = []
        for ratio in ratios:
            counts = {g.id: keep_count(g, ratio, round_to) for g in groups}
            pruned = apply_plan(copy.deepcopy(model), analysis, plan_from_counts(analysis, scores, counts))
            points.append({"ratio": ratio, "macs_saved": float(full - mac_model.cost(counts)),
                           "damage": output_damage(reference, model_outputs(pruned, feeds))})
        rows.append({"type": kind, "groups": len(groups), "channels": sum(g.size for g in groups), "points": points})
        log.info("sensitivity: type %s (%d groups)", kind, len(groups))
    return rows
