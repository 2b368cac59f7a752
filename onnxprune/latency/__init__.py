"""Latency as a budget (`--target-latency`): what the pipeline calls is `counts_for_latency`.

    one_layer.LayerTimer    one layer at given widths, timed alone (timing.ModelTimer) or taken from the cache
    cache.LatencyCache      those measurements by what they compute, kept in a JSON file between runs
    table.LatencyModel      the cost model `allocate.counts_for_target` bisects on: layers + the scaled rest
    correction.fit          searches on the table, each checked by timing the whole pruned model
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import onnx

from ..calibrate import Progress
from ..cost import CostModel, Counts
from ..groups import Analysis
from ..timing import ModelTimer, OrtTimer
from ..verify import random_feeds
from .cache import LatencyCache
from .correction import WholeModel, fit
from .one_layer import LayerTimer
from .table import LatencyModel

__all__ = ["counts_for_latency", "LatencyCache", "LatencyModel", "LayerTimer"]


def counts_for_latency(model: onnx.ModelProto, analysis: Analysis, search: Callable[[tuple[CostModel, float]], Counts],
                       target: float, *, round_to: int, threads: int, table_path: str | os.PathLike | None,
                       progress: bool, feed: dict[str, np.ndarray] | None, shapes: dict | None,
                       timer: ModelTimer | None = None) -> tuple[Counts, dict]:
    """Counts keeping `target` of the measured latency, and the outcome dict (the report's `target_latency`).
    The cache is read from `table_path` (when given) before anything is measured and written back at the end.
    `timer` (default: onnxruntime at `threads`) is replaced in tests by a deterministic one."""
    cache = LatencyCache.load(table_path) if table_path else LatencyCache()
    feed, timer, shown = feed or random_feeds(model), timer or OrtTimer(threads), Progress(enabled=progress)
    table = LatencyModel(model, analysis, LayerTimer(timer, cache, model, shown), round_to, feed, shapes)
    counts, kept = fit(table, WholeModel(model, analysis, feed, timer).kept, search, target)
    shown.close()
    result = outcome(table, target, threads, counts, kept)
    if table_path:
        cache.save(table_path)
    return counts, result


def outcome(table: LatencyModel, target: float, threads: int, counts: Counts, kept: float) -> dict:
    """The report's `target_latency`: what was asked, what the table predicted for the counts chosen and what was
    measured for them, and how much was measured in this run."""
    return {"target": target, "threads": threads, "predicted_kept": table.cost(counts) / table.cost({}),
            "measured_kept": kept, "layers": len(table.layers), "one_layer_models": table.measured,
            "table_entries": len(table.layer_timer.cache)}

