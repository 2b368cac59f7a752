"""One prune, as named steps that take and return data:

    prepare ──> open calibration ──> score ──> allocate ──> apply ──> recover ──> report
    (normalise,   (once; every step    (criterion,  (how many    (surgery)  (bias or lsq,  (PruneReport)
     analyse)      reads it from here)  statistics)  per group)              on the data)

`run_once` chains them; `schedule.prune_iteratively` runs it several times.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import onnx

from . import graph as graph_mod, lazy_tensors
from .allocate import MacModel, MacReach, Plan, capped_when_unreachable, counts_for_target, plan_from_counts
from .calibrate import Calibration, Statistics, collect_stats
from .criteria import ScoringContext, consumers, get_criterion, probes
from .errors import UsageError
from .graph import GraphIndex
from .group_types import place_groups, protect_groups
from .groups import Analysis, analyze as analyze_graph
from .latency import counts_for_latency
from .layers import constant_values, refittable
from .options import Options, Target, needs_calibration, sparsity_request, statistics_needed
from .plan_io import plan_to_dict, read_plan
from .recover import recover_bias, recover_lsq, require_finite_weights
from .regression import ContributionGram
from .report import PruneReport, channel_groups, frozen_reasons, target_outcome, unreachable_reason
from .sensitivity import sensitivity_counts, sensitivity_curves, type_damage
from .slicing import SLICED, Sliced, normalised, slice_hidden
from .sparsity.sparsify import count_nonzeros
from .sparsity.spec import Request, parse_pattern
from .sparsity.step import sparsity_step
from .stats_file import fill_statistics
from .surgery import apply_plan
from .verify import count_macs, count_params, layer_macs, sample_shapes

log = logging.getLogger("onnxprune")

SENSITIVITY_SAMPLES = 64  # each group is pruned alone several times and compared on these samples


@dataclass
class Prepared:
    """A normalised working copy of the model with its analysis."""

    model: onnx.ModelProto
    analysis: Analysis
    weight_bytes: int


@dataclass
class Inputs:
    """What every step after `prepare` reads: the model and its analysis, the calibration data (opened once), and
    where MACs and latency are counted (`sample`: one calibration sample for a model with run-time sizes)."""

    prepared: Prepared
    calibration: Calibration | None
    sample: dict[str, np.ndarray] | None
    shapes: dict

    @property
    def analysis(self) -> Analysis:
        return self.prepared.analysis

    @property
    def model(self) -> onnx.ModelProto:
        return self.prepared.model


@dataclass
class Scores:
    """Per prunable group, one score per channel (higher = keep), and what the scoring saw."""

    values: dict[int, np.ndarray]
    context: ScoringContext


def prepare(model_or_path: onnx.ModelProto | str | os.PathLike, exclude: tuple[str, ...] = (),
            lazy: bool = False) -> Prepared:
    """The working copy, normalised and analysed. `lazy`: a model with external data keeps its weights on disk,
    read one tensor at a time (lazy_tensors); otherwise they are read into the copy first, where the steps that
    run the model or change its weights expect them."""
    if isinstance(model_or_path, onnx.ModelProto):
        graph_mod.check_loadable(model_or_path)
        model = copy.deepcopy(model_or_path)  # a lazily opened model's proto holds no weights: a small copy
    else:
        model = graph_mod.load_model(model_or_path, lazy=True)
    if not lazy:
        lazy_tensors.load_weights(model)
    size = graph_mod.tensor_bytes(model)
    graph_mod.node_names(model)
    graph_mod.normalize(model)
    graph_mod.validate(model)
    index = GraphIndex.build(model)
    return Prepared(model, analyze_graph(model, index, tuple(exclude)), size)


def open_inputs(model_or_path: onnx.ModelProto | str | os.PathLike, target: Target, options: Options) -> Inputs:
    """Prepare the model and open its calibration data once: kept in memory for the steps that read it several
    times (recovery, sensitivity, a model whose sizes come from a sample), streamed otherwise."""
    prepared = prepare(model_or_path, options.exclude, lazy=streams_weights(target, options))
    runtime_sized = bool(graph_mod.runtime_dims(prepared.model))
    calibration = None
    if options.calib is not None:
        sparse = parse_pattern(options.granularity) is not None or options.then is not None  # layer by layer
        replayable = options.recover != "none" or options.allocation == "sensitivity" or runtime_sized or sparse
        calibration = Calibration(options.calib, prepared.model, replayable)
    sample, shapes = counted_at(prepared, calibration, target)
    if options.protect:
        protect_groups(prepared.analysis, shapes, options.protect)
    return Inputs(prepared, calibration, sample, shapes)


def streams_weights(target: Target, options: Options) -> bool:
    """Whether the run can leave a model's weights on disk: it reads each weight once (scores) and slices it, and
    runs nothing (no calibration data, statistics file, latency measurement, recovery or sparsity step)."""
    return (not needs_calibration(target, options) and options.stats is None and target.kind != "latency"
            and sparsity_request(target, options) is None)


def counted_at(prepared: Prepared, calibration: Calibration | None, target: Target | None) -> tuple[dict | None, dict]:
    """Where MACs and latency are counted: at the declared sizes, or, for a model with sizes known only at run time
    (a sequence length) and calibration data, at one calibration sample's (returned as well). A MAC or latency
    target on such a model without calibration data is refused: it would count nothing, or a length of 1."""
    dims = graph_mod.runtime_dims(prepared.model)
    if dims and calibration is None and target is not None and target.budget is not None:
        flag = "--target-macs" if target.kind == "macs" else "--target-latency"
        raise UsageError(f"{flag} needs --calib for this model: the size of {', '.join(dims[:3])} is known only "
                         "at run time, and is taken from a calibration sample")
    sample = calibration.first_sample() if dims and calibration is not None else None
    return sample, sample_shapes(prepared.model, sample) or prepared.analysis.index.shapes


def collect_statistics(inputs: Inputs, reads: frozenset[str], quiet: bool, threads: int = 0) -> Statistics:
    """One pass over the calibration data for the statistics asked for (see statistics_probes)."""
    spaces, grams = statistics_probes(inputs.analysis, reads)
    calibration = inputs.calibration
    return collect_stats(inputs.model, spaces, calibration.batches(), quiet=quiet, threads=threads, extra=grams,
                         first=calibration.source.start)


def statistics_probes(analysis: Analysis, reads: frozenset[str]) -> tuple[set[tuple[str, int]], dict]:
    """What the statistics asked for accumulate: "channels", per-channel sums where every prunable group enters its
    consumer layers (the probed (tensor, axis) spaces), and "contributions", each group's contribution Gram
    matrix (empty accumulators by group id)."""
    index = analysis.index
    spaces = {m.space for g in analysis.prunable for m in probes(g, index)} if "channels" in reads else set()
    return spaces, contribution_grams(analysis) if "contributions" in reads else {}


def run_statistics(inputs: Inputs, reads: frozenset[str], options: Options) -> Statistics | None:
    """The statistics the run reads: from the --stats file when one is given (onnxprune calibrate), else one pass
    over the calibration data; None when the run reads none."""
    if not reads:
        return None
    if options.stats is not None:
        return fill_statistics(options.stats, inputs.model, *statistics_probes(inputs.analysis, reads))
    return collect_statistics(inputs, reads, options.quiet)


def contribution_grams(analysis: Analysis) -> dict[int, ContributionGram]:
    """The regression criterion's accumulators, for every group read by a layer that least squares can re-fit."""
    index, grams = analysis.index, {}
    for group in analysis.prunable:
        layers = [(layer, member, constant_values(layer.weight, index)) for node, member in consumers(group, index)
                  if (layer := refittable(node, index, quantized=True)) is not None]
        if layers:
            grams[group.id] = ContributionGram(group, layers)
    return grams


def score(inputs: Inputs, options: Options, stats: Statistics | None) -> Scores:
    context = ScoringContext(inputs.analysis.index, seed=options.seed, stats=stats)
    scorer = get_criterion(options.criterion)
    return Scores({g.id: scorer(g, context) for g in inputs.analysis.prunable}, context)


def allocate(inputs: Inputs, target: Target, options: Options, scores: dict[int, np.ndarray],
             reference: dict | None = None, mac_model: MacModel | None = None) -> tuple[Plan, dict | None]:
    """The plan meeting `target`, and for a latency target what was predicted and measured. `reference` (the
    group sizes an iterative schedule started from) makes a ratio refer to the original sizes. A MAC target
    below the reachable minimum cuts no group beyond its share (allocate.capped_when_unreachable)."""
    analysis, ratio = inputs.analysis, target.value if target.kind == "ratio" else None
    search = lambda budget: counts_for_target(analysis, scores, options.allocation, options.round_to,  # noqa: E731
                                              ratio, budget, reference)
    if target.kind == "latency":
        counts, outcome = counts_for_latency(
            inputs.model, analysis, search, target.value, round_to=options.round_to, threads=options.threads,
            table_path=options.latency_table, progress=not options.quiet, feed=inputs.sample, shapes=inputs.shapes)
        return plan_from_counts(analysis, scores, counts), outcome
    mac_model = mac_model or mac_model_of(inputs)
    if options.allocation == "sensitivity":
        curves = group_curves(inputs, scores, options.round_to, mac_model)
        counts = sensitivity_counts(analysis, curves, mac_model, ratio, target.budget)
    else:
        counts = search((mac_model, target.value) if target.kind == "macs" else None)
    if target.kind == "macs":
        counts = capped_when_unreachable(analysis, counts, target.value, mac_model.reach(options.round_to),
                                         options.round_to)
    return plan_from_counts(analysis, scores, counts), None


def mac_model_of(inputs: Inputs) -> MacModel:
    """MACs of any channel counts, the layers counted where `inputs` says (a calibration sample's sizes)."""
    return MacModel(inputs.analysis, layer_macs(inputs.model, inputs.shapes))


def group_curves(inputs: Inputs, scores: dict[int, np.ndarray], round_to: int,
                 mac_model: MacModel) -> dict[int, list[dict]]:
    """Each group pruned alone at the candidate ratios: damage on the first calibration samples, MACs saved."""
    feeds = list(inputs.calibration.batches(SENSITIVITY_SAMPLES))
    return sensitivity_curves(inputs.model, inputs.analysis, scores, feeds, round_to, mac_model)


def type_report(inputs: Inputs, scores: dict[int, np.ndarray], round_to: int, mac_model: MacModel) -> dict:
    """Each prunable group's place in the network and, per group type, its groups pruned together: damage on the
    first calibration samples, MACs saved (sensitivity --types)."""
    placements = place_groups(inputs.analysis, inputs.shapes)
    feeds = list(inputs.calibration.batches(SENSITIVITY_SAMPLES))
    kinds = {gid: p.kind for gid, p in placements.items()}
    rows = type_damage(inputs.model, inputs.analysis, scores, feeds, round_to, mac_model, kinds)
    groups = [{"id": g.id, "channels": g.size, **placements[g.id].to_dict()} for g in inputs.analysis.prunable]
    return {"groups": groups, "types": rows}


def recover(pruned: onnx.ModelProto, original: onnx.ModelProto, inputs: Inputs, plan: Plan, options: Options,
            stats: Statistics | None) -> int:
    """Training-free recovery of the pruned model against the original on the calibration data; the layers changed.
    Bias recovery from a --stats file alone (no --calib) keeps its change without comparing outputs on data."""
    if options.recover == "bias" and inputs.calibration is None:
        return recover_bias(pruned, inputs.analysis, plan, stats)
    if options.recover == "bias":
        return recover_bias(pruned, inputs.analysis, plan, stats, original, inputs.calibration.batches)
    if options.recover == "lsq":
        return recover_lsq(pruned, original, inputs.analysis, plan, inputs.calibration.batches, quiet=options.quiet)
    return 0


@dataclass
class Choice:
    """What the scoring and allocation steps decided, with what they measured on the way."""

    plan: Plan
    stats: Statistics | None = None
    scores: Scores | None = None
    latency: dict | None = None  # for a latency target: predicted and measured fractions
    reach: MacReach | None = None  # the MACs in prunable groups, and the reachable minimum


def choose(inputs: Inputs, target: Target, options: Options, reference: dict | None = None) -> Choice:
    """Statistics, scores and allocation: the channels to remove (or the plan the target names). A MAC target
    below the reachable minimum is said up front, before any data is read."""
    mac_model = mac_model_of(inputs)
    reach = mac_model.reach(options.round_to)
    if target.kind == "macs" and not reach.can_meet(target.value):
        log.warning("target-macs %g cannot be met: %s", target.value, unreachable_reason(target.value, reach))
    stats = run_statistics(inputs, statistics_needed(target, options), options)
    if target.kind == "plan":
        return Choice(_given_plan(target, inputs.analysis), stats, reach=reach)
    scores = score(inputs, options, stats)
    plan, latency = allocate(inputs, target, options, scores.values, reference, mac_model)
    _warn_fallbacks(options.criterion, scores.context, inputs.analysis)
    return Choice(plan, stats, scores, latency, reach)


def run_once(model_or_path: onnx.ModelProto | str | os.PathLike, target: Target, options: Options,
             reference: dict | None = None) -> tuple[onnx.ModelProto, PruneReport]:
    """One-shot pruning: every step once, then the sparsity step where the options ask for one (with a sparsity
    granularity, the channel steps are given an empty plan). The input is never modified."""
    start = time.perf_counter()
    sparse = sparsity_request(target, options)
    channels = Target.plan(Plan()) if parse_pattern(options.granularity) is not None else target
    sliced, options = slice_first(model_or_path, options)
    inputs = open_inputs(sliced.model if sliced else model_or_path, after_slicing(channels, sliced), options)
    choice = choose(inputs, after_slicing(channels, sliced), options, reference)
    before = (count_params(inputs.model), count_macs(inputs.model, inputs.shapes))
    before = (sliced.params_before, sliced.macs_before) if sliced and sliced.sliced else before
    nonzeros = count_nonzeros(inputs.model) if sparse is not None else 0
    original = _recovery_reference(inputs, sliced) if options.recover != "none" else None
    pruned = apply_plan(inputs.model, inputs.analysis, choice.plan)
    recovered = recover(pruned, original, inputs, choice.plan, options, choice.stats)
    require_finite_weights(pruned, inputs.analysis, choice.plan, options.recover)
    sparsity = sparsify(pruned, inputs, sparse, nonzeros, options.quiet) if sparse is not None else None
    report = build_report(inputs, channels, options, choice, pruned, before)
    report.recovered_layers, report.seconds = recovered, time.perf_counter() - start
    report.sparsity, report.slicing = sparsity, sliced.description if sliced else None
    return pruned, report


def slice_first(model_or_path: onnx.ModelProto | str | os.PathLike,
                options: Options) -> tuple[Sliced | None, Options]:
    """With --slice, the hidden width of a transformer sliced before the channel steps (slicing.slice_hidden, on
    its own pass over the calibration data), and the options for those steps: they leave the sliced stream whole,
    and a Python reader's batches, read here, are handed on. None (and the options) without --slice. A model
    without a recognised residual stream comes back unchanged, `sliced` False, with the reason."""
    if not options.slice:
        return None, options
    model = normalised(model_or_path)
    calibration = Calibration(options.calib, model, replayable=True)
    sliced = slice_hidden(model, calibration.batches, options.slice)
    log.info("slicing: %s", sliced.description)
    calib = options.calib
    if not isinstance(calib.data, (str, os.PathLike)):  # a reader is read once: its batches are kept
        calib = replace(calib, data=list(calibration.batches()))
    exclude = (*options.exclude, SLICED) if sliced.sliced else options.exclude
    return sliced, replace(options, calib=calib, exclude=exclude)


def after_slicing(target: Target, sliced: Sliced | None) -> Target:
    """The channel steps' target: a MAC fraction of the original becomes one of the sliced model."""
    if sliced is None or not sliced.sliced or target.kind != "macs":
        return target
    return Target.macs(min(1.0, target.value / sliced.macs_kept))


def _recovery_reference(inputs: Inputs, sliced: Sliced | None) -> onnx.ModelProto:
    """What recovery fits to: the original model (for a sliced one, with the stream writers' outputs projected into
    the sliced basis, so that least squares fits them to the original's)."""
    return sliced.reference if sliced is not None and sliced.sliced else copy.deepcopy(inputs.model)


def sparsify(pruned: onnx.ModelProto, inputs: Inputs, request: Request, nonzeros: int, quiet: bool) -> dict:
    """Zero weights of the (channel-pruned) model in place; its layers are re-fitted against it as it was."""
    reference = copy.deepcopy(pruned) if request.needs_data else pruned
    batches = inputs.calibration.batches if request.needs_data else None
    return sparsity_step(pruned, reference, request, nonzeros, batches, quiet)


def _given_plan(target: Target, analysis: Analysis) -> Plan:
    return target.value if isinstance(target.value, Plan) else read_plan(target.value, analysis)


def build_report(inputs: Inputs, target: Target, options: Options, choice: Choice, pruned: onnx.ModelProto,
                 before: tuple[int, int]) -> PruneReport:
    """What the run did; `before` is the (parameters, MACs) of the model before surgery."""
    analysis, plan, stats = inputs.analysis, choice.plan, choice.stats
    rows = channel_groups(analysis, {gid: len(k) for gid, k in plan.keep.items()})
    used_data = needs_calibration(target, options)
    report = PruneReport(
        ratio=target.value if target.kind == "ratio" else None, criterion=options.criterion,
        round_to=options.round_to, params_before=before[0], params_after=count_params(pruned),
        macs_before=before[1], macs_after=count_macs(pruned, sample_shapes(pruned, inputs.sample)),
        weight_bytes_before=inputs.prepared.weight_bytes, weight_bytes_after=graph_mod.tensor_bytes(pruned),
        groups=rows, frozen_reasons=frozen_reasons(rows), barriers=analysis.barriers, plan=plan,
        recovery=options.recover, calibration_samples=_samples(inputs, stats) if used_data else 0,
        plan_dict=plan_to_dict(plan, analysis), padding_mask=_mask(inputs, stats) if used_data else None,
        target_latency=choice.latency, runtime_dims=graph_mod.runtime_dims(inputs.model),
        criterion_fallbacks=len(choice.scores.context.fallbacks) if choice.scores is not None else 0,
        mac_reach=choice.reach)
    report.target = target_outcome(report, target.kind, target.value)
    return report


def _samples(inputs: Inputs, stats: Statistics | None) -> int:
    return stats.samples if stats is not None else inputs.calibration.samples


def _mask(inputs: Inputs, stats: Statistics | None) -> str | None:
    """The input whose zeros marked padding: the calibration data's, or the statistics file's without one."""
    return inputs.calibration.mask if inputs.calibration is not None else stats.mask


def _warn_fallbacks(criterion: str, context: ScoringContext, analysis: Analysis) -> None:
    if context.fallbacks:
        log.warning("criterion '%s' could not rank %d of %d groups (%s); they were ranked by l1", criterion,
                    len(context.fallbacks), len(analysis.prunable),
                    "no BatchNormalization: folded into the conv?" if criterion == "bn" else "no consumer layer")

