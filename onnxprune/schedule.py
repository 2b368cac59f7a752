"""Iterative pruning: reach the target in K steps of growing ratio, recovering between steps and re-scoring the
current model each time (the seed's iterative prune + fine-tune, with training-free recovery as the fine-tune)."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx

from .allocate import reference_sizes
from .options import Options, Target
from .pipeline import prepare, run_once
from .plan_io import plan_from_initializers, plan_to_dict
from .report import PruneReport, channel_groups, frozen_reasons, target_outcome


def step_targets(steps: int, target: Target) -> list[Target]:
    """Per-step targets. The fraction removed grows linearly: after step i of K, ratio * i / K of the original
    channels (a ratio of the original sizes: see `reference` in pipeline.allocate), or 1 - (1 - F) * i / K of
    the original cost (MACs or latency) kept, as a fraction of the current model's cost."""
    targets, kept_before = [], 1.0
    for i in range(1, steps + 1):
        if target.budget is not None:
            kept = 1 - (1 - target.budget) * i / steps
            targets.append(Target(target.kind, kept / kept_before))
            kept_before = kept
        else:
            targets.append(Target.ratio(target.value * i / steps))
    return targets


def prune_iteratively(model_or_path: onnx.ModelProto | str | os.PathLike, target: Target,
                      options: Options) -> tuple[onnx.ModelProto, PruneReport]:
    """`options.steps` one-shot prunes of growing ratio, each re-scoring and recovering the current model; the
    report and plan are the whole run's, in the original model's terms."""
    start = prepare(model_or_path, lazy=True)
    original, reference = start.model, reference_sizes(start.analysis)
    current, reports, kept = original, [], {}
    for step in step_targets(options.steps, target):
        current, report = run_once(current, step, options, reference=reference)
        reports.append(report)
        _compose(kept, report.plan_dict["initializers"])
    return current, _combined_report(original, reports, kept, target)


def _compose(kept: dict[str, dict[str, np.ndarray]], step: dict[str, dict[str, list[int]]]) -> None:
    """Indices into the original model: a step's indices select among those kept so far."""
    for name, axes in step.items():
        for axis, indices in axes.items():
            before = kept.setdefault(name, {}).get(axis)
            kept[name][axis] = np.asarray(indices) if before is None else before[np.asarray(indices)]


def _combined_report(original: onnx.ModelProto, reports: list[PruneReport], kept: dict,
                     target: Target) -> PruneReport:
    analysis = prepare(original, lazy=True).analysis
    plan = plan_from_initializers(analysis, kept)
    rows = channel_groups(analysis, {gid: len(k) for gid, k in plan.keep.items()})
    first, last = reports[0], reports[-1]
    combined = dataclasses.replace(
        last, ratio=target.value if target.kind == "ratio" else None, params_before=first.params_before,
        macs_before=first.macs_before, weight_bytes_before=first.weight_bytes_before, groups=rows,
        frozen_reasons=frozen_reasons(rows), seconds=sum(r.seconds for r in reports),
        recovered_layers=sum(r.recovered_layers for r in reports), plan=plan, plan_dict=plan_to_dict(plan, analysis),
        target_latency=_combined_latency(reports, target.value) if target.kind == "latency" else None,
        mac_reach=first.mac_reach)
    combined.target = target_outcome(combined, target.kind, target.value)  # the whole run's, not the last step's
    return combined


def _combined_latency(reports: list[PruneReport], target: float) -> dict:
    """Each step's latency fractions are of the model it started from: the whole run's are their products."""
    steps = [r.target_latency for r in reports]
    return {**steps[-1], "target": target,
            "predicted_kept": float(np.prod([s["predicted_kept"] for s in steps])),
            "measured_kept": float(np.prod([s["measured_kept"] for s in steps])), "layers": steps[0]["layers"],
            "one_layer_models": sum(s["one_layer_models"] for s in steps)}
