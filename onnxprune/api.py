"""The public API: `prune`, `analyze` and `sensitivity`. The CLI only parses options and calls these."""
from __future__ import annotations

import logging
import os

import onnx

from .calibrate import Calibration, CalibrationSource
from .errors import UsageError
from .groups import Analysis
from .options import DEFAULT_ROUND_TO, Options, Target, validate
from .pipeline import (Inputs, collect_statistics, counted_at, group_curves, mac_model_of, prepare, run_once, score,
                       statistics_needed, type_report)
from .recipe import run_recipe
from .report import PruneReport, target_text
from .schedule import prune_iteratively
from .sparsity.spec import parse_pattern

ModelSource = onnx.ModelProto | str | os.PathLike
log = logging.getLogger("onnxprune")


def analyze(model_or_path: ModelSource, exclude: tuple[str, ...] = ()) -> Analysis:
    """The channel groups of a model: which channels must be removed together, which are frozen and why; and
    `mac_reach` (allocate.MacReach): the share of the MACs in layers a prunable group touches, and the MACs left
    with every prunable group at its floor (at the default --round-to). An external-data model's weights stay on
    disk (lazy_tensors): the analysis reads them one at a time where it reads them at all."""
    prepared = prepare(model_or_path, exclude, lazy=True)
    inputs = Inputs(prepared, None, None, prepared.analysis.index.shapes)
    prepared.analysis.mac_reach = mac_model_of(inputs).reach(DEFAULT_ROUND_TO)
    return prepared.analysis


def prune(model_or_path: ModelSource, target: Target | float | None,
          options: Options | None = None) -> tuple[onnx.ModelProto, PruneReport]:
    """Prune a model (a ModelProto or a path) to `target` — `Target.ratio(R)` (or just R: remove round(R * C)
    channels from every prunable group), `Target.macs(F)`, `Target.latency(F)` or `Target.plan(plan)` — as
    `options` say (criterion, rounding, allocation, recovery, schedule, calibration data). Returns the pruned
    model and a report (`report.plan`, and `report.plan_dict` for a file); the input is never modified. With
    `options.granularity` unstructured, the ratio (or `Target.params(F)`) is the share of weights zeroed; an N:M
    granularity takes None, its pattern sets the share."""
    options = options or Options()
    target = _target_of(target, options)
    validate(target, options)
    if options.recipe == "accurate":
        pruned, report = run_recipe(model_or_path, target, options)
    elif options.schedule == "iterative":
        pruned, report = prune_iteratively(model_or_path, target, options)
    else:
        pruned, report = run_once(model_or_path, target, options)
    if report.target is not None and not report.target["met"]:
        log.warning("target not met: %s", target_text(report.target))
    return pruned, report


def _target_of(target: Target | float | None, options: Options) -> Target:
    """A number is a ratio; no target at all is an N:M granularity's own share of zeros."""
    if isinstance(target, Target):
        return target
    pattern = parse_pattern(options.granularity)
    if target is None and pattern is not None and not pattern.unstructured:
        return Target.ratio(pattern.share)
    return Target.ratio(target)


def sensitivity(model_or_path: ModelSource, options: Options, by_type: bool = False) -> dict:
    """Per prunable group, the damage (relative squared error of the outputs on `options.calib`) of pruning that
    group alone at each candidate ratio, with the MACs it saves: {"groups": [{"id", "channels", "weights",
    "points": [{"ratio", "kept", "channels", "macs_saved", "damage"}]}]}. With `by_type`, instead of the curves,
    each group's place in the network ("type", "stride", "layers_to_output": group_types.place_groups) and
    "types": per type, its groups pruned together at a few ratios ({"type", "groups", "channels",
    "points": [{"ratio", "macs_saved", "damage"}]})."""
    validate(Target.ratio(0.0), options)
    if options.calib is None:
        raise UsageError("sensitivity needs calibration data (--calib)")
    prepared = prepare(model_or_path, options.exclude)
    calibration = Calibration(options.calib, prepared.model, replayable=True)
    sample, shapes = counted_at(prepared, calibration, None)
    inputs = Inputs(prepared, calibration, sample, shapes)
    reads = statistics_needed(Target.ratio(0.0), options)
    stats = collect_statistics(inputs, reads, options.quiet) if reads else None
    mac_model = mac_model_of(inputs)
    scores = score(inputs, options, stats).values
    if by_type:
        return {"criterion": options.criterion, "round_to": options.round_to, "macs": mac_model.cost({}),
                **type_report(inputs, scores, options.round_to, mac_model)}
    curves = group_curves(inputs, scores, options.round_to, mac_model)
    return {"criterion": options.criterion, "round_to": options.round_to, "macs": mac_model.cost({}),
            "groups": [_curve_entry(prepared.analysis, gid, points) for gid, points in curves.items()]}


def _curve_entry(analysis: Analysis, gid: int, points: list[dict]) -> dict:
    group = analysis.groups[gid]
    return {"id": gid, "channels": group.size, "weights": sorted({m.space[0] for m in group.members
                                                                  if m.constant})[:4], "points": points}


__all__ = ["CalibrationSource", "Options", "Target", "analyze", "prune", "sensitivity"]
