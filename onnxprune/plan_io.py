"""Plans as files: `--plan-out` writes what a run removed, `--plan-in` applies it again.

The file lists, for every original initializer, the kept indices along each pruned axis (what a user needs to
apply the same pruning to the model in their training framework and fine-tune there), and per channel group the
kept channels, keyed by the group's weights so that a plan finds its groups again in the same model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .allocate import Plan
from .errors import OnnxPruneError, first_line
from .files import write_text
from .groups import Analysis, Group

FORMAT = "onnxprune-plan/1"


def _group_key(group: Group) -> tuple:
    return tuple(sorted((m.space[0], m.space[1], m.offset, m.inner) for m in group.members if m.constant))


def plan_to_dict(plan: Plan, analysis: Analysis) -> dict:
    initializers: dict[str, dict[str, list[int]]] = {}
    for name in analysis.index.initializers:
        for axis in range(len(analysis.index.shapes[name])):
            kept = analysis.kept_indices((name, axis), plan.keep)
            if kept is not None:
                initializers.setdefault(name, {})[str(axis)] = [int(i) for i in kept]
    groups = [{"weights": [list(k) for k in _group_key(analysis.groups[gid])], "channels": analysis.groups[gid].size,
               "keep": [int(i) for i in keep]} for gid, keep in sorted(plan.keep.items())]
    return {"format": FORMAT, "initializers": initializers, "groups": groups}


def write_plan_dict(path: str | Path, data: dict) -> None:
    """Compact JSON, one initializer or group per line; written atomically (files.write_text)."""
    lines = [f'{{"format": "{data["format"]}",', '"initializers": {']
    lines.append(",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in data["initializers"].items()))
    lines += ["},", '"groups": [', ",\n".join(json.dumps(g) for g in data["groups"]), "]}"]
    write_text(path, "\n".join(lines) + "\n", "plan")


def read_plan(path: str | Path, analysis: Analysis) -> Plan:
    """The plan in `path`, checked against this model's groups."""
    try:
        data = json.loads(Path(path).read_text())
    except Exception as exc:
        raise OnnxPruneError(f"cannot read plan {path}: {first_line(exc)}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise OnnxPruneError(f"{path} is not an onnxprune plan ({FORMAT})")
    by_key = {_group_key(g): g for g in analysis.groups}
    plan = Plan()
    for entry in data.get("groups", []):
        group = by_key.get(tuple(tuple(w) for w in entry["weights"]))
        if group is None or group.size != entry["channels"]:
            raise OnnxPruneError(f"plan {path} does not match this model (a group of {entry['channels']} channels "
                                 f"over {entry['weights'][0][0]} is not found)")
        keep = np.array(sorted(entry["keep"]), dtype=np.int64)
        if not group.prunable or not len(keep) or keep.min() < 0 or keep.max() >= group.size:
            raise OnnxPruneError(f"plan {path} keeps channels that group {group.id} cannot keep")
        plan.keep[group.id] = keep
    return plan


def plan_from_initializers(analysis: Analysis, kept: dict[str, dict[str, np.ndarray]]) -> Plan:
    """The group-level plan that leaves the given indices of each initializer axis (e.g. composed over the steps of
    an iterative schedule): a group keeps the channels that one of its weights keeps."""
    plan = Plan()
    for group in analysis.prunable:
        for m in group.members:
            indices = kept.get(m.space[0], {}).get(str(m.space[1])) if m.constant else None
            if indices is None:
                continue
            inside = indices[(indices >= m.offset) & (indices < m.offset + group.size * m.inner)]
            channels = np.unique((inside - m.offset) // m.inner)
            if len(channels) < group.size:
                plan.keep[group.id] = channels
            break
    return plan
