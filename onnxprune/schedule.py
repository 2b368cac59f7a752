"""Iterative pruning: reach the target in K steps of growing ratio, recovering between steps and re-scoring the
current model each time (the seed's iterative prune + fine-tune, with training-free recovery as the fine-tune)."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx

from .allocate import Plan, reference_sizes
from .errors import UsageError
from .report import PruneReport, channel_groups, frozen_reasons

SCHEDULES = ("oneshot", "iterative")


def step_targets(steps: int, ratio: float | None, budget: float | None) -> list[tuple[float | None, float | None]]:
    """Per-step (ratio, budget). The fraction removed grows linearly: after step i of K, ratio * i / K of the
    original channels (a ratio of the original sizes, see api.prune's `reference`), or 1 - (1 - F) * i / K of the
    original cost (MACs or latency) kept, as a fraction of the current model's cost."""
    targets, kept_before = [], 1.0
    for i in range(1, steps + 1):
        if budget is not None:
            kept = 1 - (1 - budget) * i / steps
            targets.append((None, kept / kept_before))
            kept_before = kept
        else:
            targets.append((ratio * i / steps, None))
    return targets


def prune_iteratively(model_or_path: onnx.ModelProto | str | os.PathLike, steps: int, ratio: float | None,
                      target_macs: float | None, target_latency: float | None = None,
                      **options) -> tuple[onnx.ModelProto, PruneReport]:
    from .api import prepare, prune  # the one-shot pruner is what each step runs

    if steps < 1:
        raise UsageError(f"steps must be at least 1, got {steps}")
    if options.get("plan") is not None:
        raise UsageError("an iterative schedule chooses its own plan; --plan-in applies one in a single step")
    start = prepare(model_or_path)
    original, reference = start.model, reference_sizes(start.analysis)
    current, reports, kept = original, [], {}
    budget_name, budget = ("target_latency", target_latency) if target_latency is not None else \
        ("target_macs", target_macs)
    for step_ratio, step_budget in step_targets(steps, ratio, budget):
        current, report = prune(current, ratio=step_ratio, reference=reference, **{budget_name: step_budget},
                                **options)
        reports.append(report)
        _compose(kept, report.plan_dict["initializers"])
    return current, _combined_report(original, reports, kept, ratio, prepare, target_latency)


def _compose(kept: dict[str, dict[str, np.ndarray]], step: dict[str, dict[str, list[int]]]) -> None:
    """Indices into the original model: a step's indices select among those kept so far."""
    for name, axes in step.items():
        for axis, indices in axes.items():
            before = kept.setdefault(name, {}).get(axis)
            kept[name][axis] = np.asarray(indices) if before is None else before[np.asarray(indices)]


def _combined_report(original: onnx.ModelProto, reports: list[PruneReport], kept: dict, ratio: float | None,
                     prepare, target_latency: float | None) -> PruneReport:
    from .plan_io import plan_from_initializers, plan_to_dict

    analysis = prepare(original).analysis
    plan = plan_from_initializers(analysis, kept)
    rows = channel_groups(analysis, {gid: len(k) for gid, k in plan.keep.items()})
    first, last = reports[0], reports[-1]
    return dataclasses.replace(
        last, ratio=ratio, params_before=first.params_before, macs_before=first.macs_before,
        weight_bytes_before=first.weight_bytes_before, groups=rows, frozen_reasons=frozen_reasons(rows),
        seconds=sum(r.seconds for r in reports), recovered_layers=sum(r.recovered_layers for r in reports),
        plan=plan, plan_dict=plan_to_dict(plan, analysis), target_latency=_combined_latency(reports, target_latency))


def _combined_latency(reports: list[PruneReport], target: float | None) -> dict | None:
    """Each step's latency fractions are of the model it started from: the whole run's are their products."""
    if target is None:
        return None
    steps = [r.target_latency for r in reports]
    return {**steps[-1], "target": target, "predicted_kept": float(np.prod([s["predicted_kept"] for s in steps])),
            "measured_kept": float(np.prod([s["measured_kept"] for s in steps])), "layers": steps[0]["layers"],
            "one_layer_models": sum(s["one_layer_models"] for s in steps)}


__all__ = ["SCHEDULES", "Plan", "prune_iteratively", "step_targets"]
