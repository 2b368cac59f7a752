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
    """The plan in `path`, checked for its structure (one line naming what is wrong) and against this model's
    groups."""
    data = _load_plan(path)
    by_key = {_group_key(g): g for g in analysis.groups}
    plan = Plan()
    for position, entry in enumerate(data["groups"]):
        _check_entry(entry, f"plan {path}: group {position}")
        group = by_key.get(tuple(tuple(w) for w in entry["weights"]))
        if group is None or group.size != entry["channels"]:
            raise OnnxPruneError(f"plan {path} does not match this model (a group of {entry['channels']} channels "
                                 f"over {entry['weights'][0][0]} is not found)")
        if group.id in plan.keep:
            raise OnnxPruneError(f"plan {path} lists the group of {group.size} channels over "
                                 f"{entry['weights'][0][0]} twice")
        keep = np.array(sorted(entry["keep"]), dtype=np.int64)
        if not group.prunable or not len(keep):
            raise OnnxPruneError(f"plan {path} keeps channels that group {group.id} cannot keep")
        plan.keep[group.id] = keep
    return plan


def _load_plan(path: str | Path) -> dict:
    """The plan file's JSON, with its format and a list of groups."""
    try:
        data = json.loads(Path(path).read_text())
    except Exception as exc:
        raise OnnxPruneError(f"cannot read plan {path}: {first_line(exc)}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise OnnxPruneError(f"{path} is not an onnxprune plan ({FORMAT})")
    if not isinstance(data.get("groups"), list):
        raise OnnxPruneError(f"plan {path}: 'groups' is {'missing' if 'groups' not in data else 'not a list'}")
    return data


def _check_entry(entry: object, where: str) -> None:
    """One group of a plan: an object with `weights` (a list of [tensor, axis, offset, inner]), `channels` (a
    positive integer) and `keep` (distinct channel indices below `channels`)."""
    if not isinstance(entry, dict):
        raise OnnxPruneError(f"{where} is not an object")
    missing = [key for key in ("weights", "channels", "keep") if key not in entry]
    if missing:
        raise OnnxPruneError(f"{where} has no '{missing[0]}'")
    weights, channels, keep = entry["weights"], entry["channels"], entry["keep"]
    if not _is_int(channels) or channels < 1:
        raise OnnxPruneError(f"{where}: 'channels' is not a positive integer")
    if not isinstance(weights, list) or not weights or not all(_is_weight_key(w) for w in weights):
        raise OnnxPruneError(f"{where}: 'weights' is not a list of [tensor, axis, offset, inner]")
    if not isinstance(keep, list) or not all(_is_int(i) for i in keep):
        raise OnnxPruneError(f"{where}: 'keep' is not a list of integers")
    outside = [i for i in keep if not 0 <= i < channels]
    if outside:
        raise OnnxPruneError(f"{where}: 'keep' has channel {outside[0]}, outside 0..{channels - 1}")
    seen: set[int] = set()
    twice = [i for i in keep if i in seen or seen.add(i)]
    if twice:
        raise OnnxPruneError(f"{where}: 'keep' lists channel {twice[0]} twice")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_weight_key(value: object) -> bool:
    return (isinstance(value, list) and len(value) == 4 and isinstance(value[0], str)
            and all(_is_int(v) for v in value[1:]))


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
