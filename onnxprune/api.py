"""The public API: `prune` and `analyze`. The CLI only parses options and calls these."""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import onnx

from . import graph as graph_mod
from .allocate import Plan, uniform_plan
from .criteria import ScoringContext, get_criterion
from .errors import UsageError
from .graph import GraphIndex
from .groups import Analysis, analyze as analyze_graph
from .report import PruneReport, channel_groups, frozen_reasons
from .surgery import apply_plan
from .verify import count_macs, count_params

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
    index = GraphIndex.build(model)
    return Prepared(model, analyze_graph(model, index, tuple(exclude)), size)


def analyze(model_or_path: onnx.ModelProto | str | os.PathLike, exclude: tuple[str, ...] = ()) -> Analysis:
    """The channel groups of a model: which channels must be removed together, which are frozen and why."""
    return prepare(model_or_path, exclude).analysis


def prune(model_or_path: onnx.ModelProto | str | os.PathLike, ratio: float, criterion: str = "l1",
          round_to: int = DEFAULT_ROUND_TO, exclude: tuple[str, ...] = (), seed: int = 0
          ) -> tuple[onnx.ModelProto, PruneReport]:
    """Remove round(ratio * C) channels from every prunable group (keeping at least one, and a multiple of
    `round_to`), ranked by `criterion`. Returns the pruned model and a report; the input is never modified."""
    validate_options(ratio, round_to)
    get_criterion(criterion)
    start = time.perf_counter()
    prepared = prepare(model_or_path, exclude)
    analysis, model = prepared.analysis, prepared.model
    plan = make_plan(analysis, ratio, criterion, round_to, seed)
    params_before, macs_before = count_params(model), count_macs(model, analysis.index.shapes)
    pruned = apply_plan(model, analysis, plan)
    rows = channel_groups(analysis, {gid: len(k) for gid, k in plan.keep.items()})
    report = PruneReport(
        ratio=ratio, criterion=criterion, round_to=round_to,
        params_before=params_before, params_after=count_params(pruned),
        macs_before=macs_before, macs_after=count_macs(pruned),
        weight_bytes_before=prepared.weight_bytes, weight_bytes_after=graph_mod.tensor_bytes(pruned),
        groups=rows, frozen_reasons=frozen_reasons(rows), barriers=analysis.barriers,
        seconds=time.perf_counter() - start, plan=plan)
    return pruned, report


def make_plan(analysis: Analysis, ratio: float, criterion: str = "l1", round_to: int = DEFAULT_ROUND_TO,
              seed: int = 0) -> Plan:
    """Score every prunable group with `criterion` and keep the best channels of each."""
    score = get_criterion(criterion)
    context = ScoringContext(analysis.index, seed=seed)
    scores = {g.id: score(g, context) for g in analysis.prunable}
    return uniform_plan(analysis, scores, ratio, round_to)


def validate_options(ratio: float, round_to: int) -> None:
    if not 0 <= ratio < 1:
        raise UsageError(f"ratio must be in [0, 1), got {ratio}")
    if round_to < 1:
        raise UsageError(f"round-to must be a positive integer, got {round_to}")
