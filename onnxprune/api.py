"""The public API: `prune` and `analyze`. The CLI only parses options and calls these."""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass

import onnx

from . import graph as graph_mod
from .allocate import ALLOCATIONS, MacModel, Plan, counts_for_target, plan_from_counts
from .calibrate import Preprocess, Statistics, calibration_batches, collect_stats
from .criteria import NEEDS_DATA, ScoringContext, consumers, get_criterion, probes
from .errors import UsageError
from .graph import GraphIndex, node_attr
from .latency import LatencyTable, load_table, save_table
from .groups import Analysis, analyze as analyze_graph
from .report import PruneReport, channel_groups, frozen_reasons
from .regression import ContributionGram
from .schedule import SCHEDULES, prune_iteratively
from .sensitivity import sensitivity_counts, sensitivity_curves
from .plan_io import plan_to_dict, read_plan
from .recover import RECOVERY, recover_bias, recover_lsq
from .surgery import apply_plan
from .verify import count_macs, count_params, first_sample, layer_macs, sample_shapes

log = logging.getLogger("onnxprune")

DEFAULT_ROUND_TO = 16  # ORT's NCHWc convolution blocks (see BENCHMARKS.md, channel alignment)


@dataclass
class Prepared:
    """A normalised working copy of the model with its analysis."""

    model: onnx.ModelProto
    analysis: Analysis
    weight_bytes: int


def prepare(model_or_path: onnx.ModelProto | str | os.PathLike, exclude: tuple[str, ...] = ()) -> Prepared:
    if isinstance(model_or_path, onnx.ModelProto):
        graph_mod.check_loadable(model_or_path)
        model = copy.deepcopy(model_or_path)
    else:
        model = graph_mod.load_model(model_or_path)
    size = graph_mod.tensor_bytes(model)
    graph_mod.node_names(model)
    graph_mod.normalize(model)
    graph_mod.validate(model)
    index = GraphIndex.build(model)
    return Prepared(model, analyze_graph(model, index, tuple(exclude)), size)


def analyze(model_or_path: onnx.ModelProto | str | os.PathLike, exclude: tuple[str, ...] = ()) -> Analysis:
    """The channel groups of a model: which channels must be removed together, which are frozen and why."""
    return prepare(model_or_path, exclude).analysis


def prune(model_or_path: onnx.ModelProto | str | os.PathLike, ratio: float, criterion: str = "l1",
          round_to: int = DEFAULT_ROUND_TO, exclude: tuple[str, ...] = (), seed: int = 0,
          calib: object = None, calib_size: int | None = None, batch_size: int = 16, recover: str = "none",
          quiet: bool = True, plan: Plan | str | os.PathLike | None = None, allocation: str = "uniform",
          target_macs: float | None = None, schedule: str = "oneshot", steps: int = 1,
          reference: dict | None = None, preprocess: Preprocess | str | None = None,
          target_latency: float | None = None, threads: int = 1,
          latency_table: str | os.PathLike | None = None) -> tuple[onnx.ModelProto, PruneReport]:
    """Remove round(ratio * C) channels from every prunable group (keeping at least one, and a multiple of
    `round_to`), ranked by `criterion`, then optionally recover (`recover="bias"` or `"lsq"`).

    Data-driven criteria and recovery read `calib`: a .npz / .npy path, a folder of images (read as `preprocess`
    says), a `get_next()` reader (onnxruntime.quantization style) or an iterable of feed dicts.
    `allocation="global"` ranks channels across groups by normalised score, `"sensitivity"` by measured damage,
    instead of taking the same ratio from each; `target_macs=F` replaces the ratio by "keep this fraction of the
    MACs", `target_latency=F` by "keep this fraction of the onnxruntime latency measured here" (at `threads`),
    from a per-layer latency table kept in the file `latency_table` when given (reused by later runs).
    `plan` (a Plan or a plan file) replaces ratio and criterion: the same channels are removed again.
    `schedule="iterative"` reaches the target in `steps` steps of growing ratio, with the recovery between steps and
    re-scoring each time (`reference`, the group sizes the steps started from, is the schedule's).
    Returns the pruned model and a report (`report.plan`, and `report.plan_dict` for a file); the input is never
    modified."""
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule '{schedule}' (choose from {', '.join(SCHEDULES)})")
    needs_data = _check_request(ratio, round_to, target_macs, allocation, criterion, recover, plan, calib,
                                target_latency)
    if schedule == "iterative":
        return prune_iteratively(model_or_path, steps, ratio, target_macs, target_latency, criterion=criterion,
                                 round_to=round_to, exclude=exclude, seed=seed, calib=calib, calib_size=calib_size,
                                 batch_size=batch_size, recover=recover, quiet=quiet, plan=plan,
                                 allocation=allocation, preprocess=preprocess, threads=threads,
                                 latency_table=latency_table)
    start = time.perf_counter()
    prepared = prepare(model_or_path, exclude)
    analysis, model = prepared.analysis, prepared.model
    runtime_sized = bool(graph_mod.runtime_dims(model))
    calib = _source(calib, model, calib_size, batch_size, preprocess, replayed=recover != "none" or
                    allocation == "sensitivity" or runtime_sized) if calib is not None else None
    sample, shapes = _counted_at(model, analysis, calib,
                                 "--target-macs" if target_macs else "--target-latency" if target_latency else None)
    stats = _calibrate(prepared, calib, calib_size, batch_size, quiet, criterion) if needs_data else None
    context = ScoringContext(analysis.index, seed=seed, stats=stats)
    latency = None
    if plan is None:
        probe = _sensitivity_feeds(calib, model, batch_size) if allocation == "sensitivity" else None
        latency = LatencyTable(model, analysis, round_to, threads, load_table(latency_table) if latency_table else None,
                               progress=not quiet, feed=sample, shapes=shapes) if target_latency is not None else None
        plan = make_plan(analysis, ratio, criterion, round_to, seed, context, allocation, target_macs, reference,
                         probe, (latency, target_latency) if latency else None, shapes)
        if latency and latency_table:
            save_table(latency_table, latency.table)
    elif not isinstance(plan, Plan):
        plan = read_plan(plan, analysis)
    params_before, macs_before = count_params(model), count_macs(model, shapes)
    original = copy.deepcopy(model) if recover != "none" else None
    pruned = apply_plan(model, analysis, plan)
    replay = lambda: calibration_batches(calib, original, calib_size, batch_size)  # noqa: E731
    if recover == "bias":
        recovered = recover_bias(pruned, analysis, plan, stats, original, replay)
    elif recover == "lsq":
        recovered = recover_lsq(pruned, original, analysis, plan, replay, quiet=quiet)
    else:
        recovered = 0
    rows = channel_groups(analysis, {gid: len(k) for gid, k in plan.keep.items()})
    _warn_fallbacks(criterion, context, analysis)
    return pruned, PruneReport(
        ratio=ratio, criterion=criterion, round_to=round_to,
        params_before=params_before, params_after=count_params(pruned),
        macs_before=macs_before, macs_after=count_macs(pruned, sample_shapes(pruned, sample)),
        weight_bytes_before=prepared.weight_bytes, weight_bytes_after=graph_mod.tensor_bytes(pruned),
        groups=rows, frozen_reasons=frozen_reasons(rows), barriers=analysis.barriers,
        seconds=time.perf_counter() - start, plan=plan, recovery=recover, recovered_layers=recovered,
        calibration_samples=stats.samples if stats else 0, criterion_fallbacks=len(context.fallbacks),
        plan_dict=plan_to_dict(plan, analysis), target_latency=latency.outcome if latency else None,
        padding_mask=stats.mask if stats else None)


def _counted_at(model: onnx.ModelProto, analysis: Analysis, calib: object,
                budget: str | None) -> tuple[dict | None, dict]:
    """Where MACs and latency are counted: at the declared sizes, or, for a model with sizes known only at run time
    (a sequence length) and calibration data, at one calibration sample's (returned as well). A MAC or latency
    target on such a model without calibration data is refused: it would count nothing, or a length of 1."""
    dims = graph_mod.runtime_dims(model)
    if dims and calib is None and budget:
        raise UsageError(f"{budget} needs --calib for this model: the size of {', '.join(dims[:3])} is known only "
                         "at run time, and is taken from a calibration sample")
    sample = next(iter(calibration_batches(calib, model, 1, 1)), None) if dims and calib is not None else None
    sample = first_sample(model, sample) if sample else None  # a reader's batches can be larger than asked for
    return sample, sample_shapes(model, sample) or analysis.index.shapes


def _check_request(ratio, round_to, target_macs, allocation, criterion, recover, plan, calib, target_latency) -> bool:
    """Usage errors before any work; returns whether the run needs calibration data."""
    validate_options(ratio if plan is None else 0.0, round_to, target_macs, allocation, target_latency)
    get_criterion(criterion)
    if recover not in RECOVERY:
        raise UsageError(f"unknown recovery '{recover}' (choose from {', '.join(RECOVERY)})")
    needs_data = (plan is None and (criterion in NEEDS_DATA or allocation == "sensitivity")) or recover != "none"
    if needs_data and calib is None:
        what = (f"criterion {criterion}" if criterion in NEEDS_DATA else
                "allocation sensitivity" if allocation == "sensitivity" else "recovery")
        raise UsageError(f"{what} needs calibration data (--calib)")
    return needs_data


def _warn_fallbacks(criterion: str, context: ScoringContext, analysis: Analysis) -> None:
    if context.fallbacks:
        log.warning("criterion '%s' could not rank %d of %d groups (%s); they were ranked by l1", criterion,
                    len(context.fallbacks), len(analysis.prunable),
                    "no BatchNormalization: folded into the conv?" if criterion == "bn" else "no consumer layer")


def _calibrate(prepared: Prepared, calib: object, size: int | None, batch_size: int, quiet: bool,
               criterion: str) -> Statistics:
    """Per-channel statistics where every prunable group enters its consumer layers (and, for the regression
    criterion, each group's contribution Gram matrix)."""
    index = prepared.analysis.index
    spaces = {m.space for g in prepared.analysis.prunable for m in probes(g, index)}
    grams = {}
    if criterion == "regression":
        for g in prepared.analysis.prunable:
            layers = [(node, m, index.array(node.input[1])) for node, m in consumers(g, index)
                      if node.op_type in ("Conv", "Gemm", "MatMul") and _plain_layer(node, index)]
            if layers:
                grams[g.id] = ContributionGram(g, layers)
    batches = calibration_batches(calib, prepared.model, size, batch_size)
    return collect_stats(prepared.model, spaces, batches, quiet=quiet, extra=grams)


def _plain_layer(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """A layer whose weight is a constant second input read as (out, in, ...) or (in, out): group 1, no transA."""
    weight = index.array(node.input[1])
    return (weight is not None and node_attr(node, "group", 1) == 1 and not node_attr(node, "transA", 0)
            and (node.op_type != "MatMul" or weight.ndim == 2))


def make_plan(analysis: Analysis, ratio: float | None, criterion: str = "l1", round_to: int = DEFAULT_ROUND_TO,
              seed: int = 0, context: ScoringContext | None = None, allocation: str = "uniform",
              target_macs: float | None = None, reference: dict | None = None,
              feeds: list | None = None, budget: tuple | None = None, shapes: dict | None = None) -> Plan:
    """Score every prunable group with `criterion`, decide how many channels each keeps (`allocation`, to meet
    `ratio` or `target_macs`, MACs counted at `shapes` when given) and keep the best ones."""
    score = get_criterion(criterion)
    context = context or ScoringContext(analysis.index, seed=seed)
    scores = {g.id: score(g, context) for g in analysis.prunable}
    mac_model = MacModel(analysis, layer_macs(analysis.index.model, shapes or analysis.index.shapes))
    if allocation == "sensitivity":
        curves = sensitivity_curves(analysis.index.model, analysis, scores, feeds, round_to, mac_model)
        counts = sensitivity_counts(analysis, curves, mac_model, ratio, target_macs)
    else:
        budget = budget or ((mac_model, target_macs) if target_macs else None)
        search = lambda b: counts_for_target(analysis, scores, allocation, round_to, ratio, b, reference)  # noqa: E731
        fit = getattr(budget[0], "fit", None) if budget else None  # a measured cost corrects its own level
        counts = fit(search, budget[1]) if fit else search(budget)
    return plan_from_counts(analysis, scores, counts)


SENSITIVITY_SAMPLES = 64


def _source(calib: object, model: onnx.ModelProto, size: int | None, batch_size: int,
            preprocess: Preprocess | str | None, replayed: bool) -> object:
    """A folder of images becomes a source that reads the images afresh each time; a Python reader that will be
    `replayed` (least squares, sensitivity) is read once and kept; files are re-read."""
    if isinstance(calib, (str, os.PathLike)) and os.path.isdir(calib):
        pre = preprocess if isinstance(preprocess, Preprocess) else Preprocess.parse(preprocess)
        return _Replay(lambda: calibration_batches(calib, model, size, batch_size, pre))
    if replayed and not isinstance(calib, (str, os.PathLike)):
        return list(calibration_batches(calib, model, size, batch_size))
    return calib


class _Replay:
    """An iterable that reads its source afresh each time it is iterated (images are never all in memory)."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return iter(self.make())


def _sensitivity_feeds(calib: object, model: onnx.ModelProto, batch_size: int) -> list:
    """A few calibration batches, kept: each group is pruned alone several times and compared on the same data."""
    return list(calibration_batches(calib, model, SENSITIVITY_SAMPLES, batch_size))


def validate_options(ratio: float | None, round_to: int, target_macs: float | None = None,
                     allocation: str = "uniform", target_latency: float | None = None) -> None:
    """The target (a channel ratio, a MAC or a latency fraction), allocation and rounding of a run."""
    if target_latency is not None:
        if not 0 < target_latency <= 1:
            raise UsageError(f"target-latency must be in (0, 1], got {target_latency}")
        if allocation == "sensitivity":
            raise UsageError("target-latency needs uniform or global allocation, not sensitivity")
    if target_macs is not None and not 0 < target_macs <= 1:
        raise UsageError(f"target-macs must be in (0, 1], got {target_macs}")
    if target_macs is None and target_latency is None and (ratio is None or not 0 <= ratio < 1):
        raise UsageError(f"ratio must be in [0, 1), got {ratio}")
    if allocation not in ALLOCATIONS:
        raise UsageError(f"unknown allocation '{allocation}' (choose from {', '.join(ALLOCATIONS)})")
    if round_to < 1:
        raise UsageError(f"round-to must be a positive integer, got {round_to}")


def sensitivity(model_or_path: onnx.ModelProto | str | os.PathLike, calib: object, criterion: str = "l1",
                round_to: int = DEFAULT_ROUND_TO, batch_size: int = 16, exclude: tuple[str, ...] = (),
                preprocess: Preprocess | str | None = None) -> dict:
    """Per prunable group, the damage (relative squared error of the outputs on calibration data) of pruning that
    group alone at each candidate ratio, with the MACs it saves: {"groups": [{"id", "channels", "weights",
    "points": [{"ratio", "kept", "channels", "macs_saved", "damage"}]}]}."""
    validate_options(0.0, round_to)
    prepared = prepare(model_or_path, exclude)
    analysis = prepared.analysis
    calib = _source(calib, prepared.model, None, batch_size, preprocess, replayed=True)
    needs_stats = criterion in NEEDS_DATA
    stats = _calibrate(prepared, calib, None, batch_size, True, criterion) if needs_stats else None
    context = ScoringContext(analysis.index, stats=stats)
    scores = {g.id: get_criterion(criterion)(g, context) for g in analysis.prunable}
    _, shapes = _counted_at(prepared.model, analysis, calib, None)
    mac_model = MacModel(analysis, layer_macs(analysis.index.model, shapes))
    curves = sensitivity_curves(prepared.model, analysis, scores, _sensitivity_feeds(calib, prepared.model, batch_size),
                                round_to, mac_model)
    return {"criterion": criterion, "round_to": round_to, "macs": mac_model.cost({}),
            "groups": [{"id": gid, "channels": analysis.groups[gid].size,
                        "weights": sorted({m.space[0] for m in analysis.groups[gid].members if m.constant})[:4],
                        "points": points} for gid, points in curves.items()]}
